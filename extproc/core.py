"""The transport-neutral core: plain data in, plain data out, for both adapters.

The gRPC adapter (`extproc.server`) and the HTTP adapter (`extproc.http`) parse a
`ProcessingRequest` their own way (protobuf, JSON), read the few fields the core needs
with their own accessors, call the functions here, and serialise the `Answer`. Nothing
here imports grpc, protobuf or a JSON library (tests/unit/test_layers.py).

The two phases of one HTTP request share a `Carried`: over gRPC it is a local of the
stream; over HTTP the phases are separate requests, so the request phase writes it into
our dynamic metadata namespace (`CARRIED_KEYS`) and the response-phase filter forwards
it back (`metadata_options.forwarding_namespaces`). The server keeps no state between them.

The clean response, the common case, is decided by `needs_answer` on triaged evidence
(status, grpc-status, three attributes) before anything else is read; the adapters then
answer with a continue they built once.
"""

from __future__ import annotations

import hmac
import math
import time
import traceback
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Protocol

import structlog

from extproc import flags as F
from extproc.annotate import ACTIONS_HEADER, MAX_VALUE, actions_header, diagnosis_headers, printable
from extproc.config import Direction, Policy
from extproc.diagnosis import Diagnosis, Evidence, classify, is_envoy_failure
from extproc.filter_config import ANNOTATION_HEADERS
from extproc.headers import (
    NO_CHANGE,
    REVEAL_HEADER,
    Applied,
    Header,
    NamesFirst,
    RequestDecision,
    decide,
    resolve_direction,
)

log = structlog.get_logger("extproc")

# The attributes Envoy sends under the ext_proc filter's name.
ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"

# Response headers that triage reads; the rest of a clean response is never looked at.
RESPONSE_SIGNS = frozenset(
    {":status", "grpc-status", "x-envoy-upstream-service-time", "x-envoy-overloaded",
     *ANNOTATION_HEADERS}
)  # fmt: skip

# (Evidence field, attribute) read once a response needs an answer: one table for both
# adapters' completion. A carried Host wins over `request.host`.
COMPLETION: tuple[tuple[str, str], ...] = (
    ("transport_failure_reason", "upstream.transport_failure_reason"),
    ("cluster", "xds.cluster_name"),
    ("upstream_address", "upstream.address"),
    ("route", "xds.route_name"),
    ("cluster_metadata", "xds.cluster_metadata"),
    ("host", "request.host"),
    ("upstream_tls_version", "upstream.tls_version"),
)
LISTENER_ATTRIBUTE = "xds.listener_direction"
FLAGS_ATTRIBUTE = "response.flags"
CODE_ATTRIBUTE = "response.code"
DETAILS_ATTRIBUTE = "response.code_details"

# The most of each text attribute the core reads, in characters: a value is cut to this
# before anything looks into it, so one message costs at most a few kilobytes of work
# whatever a peer sends. Each cap leaves Envoy's own strings far inside it (the longest
# recorded in docs/signatures.md is under 200 characters; tests/unit/test_linear.py
# checks they all fit with room to spare), so a cut never changes a real diagnosis.
MAX_TRANSPORT_FAILURE_REASON = 4096  # `TLS_error:`, each queued BoringSSL error as
# `|code:lib:func:REASON` (about 90), a verify detail, `:TLS_error_end` (envoyproxy/envoy
# 02a45cb source/common/tls/ssl_socket.cc, drainErrorQueue); the detail may list the
# peer's SANs (`verify cert failed: SAN matcher, certificate SANs are [...]`,
# cert_validator/default_validator.cc), after the words the catalogue matches on
MAX_CODE_DETAILS = MAX_TRANSPORT_FAILURE_REASON + 128  # the router writes
# `upstream_reset_before_response_started{<reset reason>|<transport failure reason>}`
MAX_NAME = 1024  # cluster and route names: Istio's `outbound|PORT|SUBSET|FQDN` is at
# most 5 + 63 + 253 characters and three `|` (a subset name is a DNS-1123 label:
# istio/istio 86c9f01 pkg/config/validation/validation.go, validateSubsetName);
# Cilium prefixes `namespace/cec-name/`
MAX_ADDRESS = 256  # `IP:port`, `[IPv6]:port` (at most 53) or a pipe path (108, sun_path)
MAX_CLUSTER_METADATA = 16 * 1024  # text-format Metadata: Istio's config path, services
MAX_HOST = 1024  # evidence only; parsed as an authority only up to authority.MAX_LENGTH
MAX_PEER_IDENTITY = 2048  # a SPIFFE ID is at most 2048 bytes (the SPIFFE ID standard, 2.3)
MAX_TLS_VERSION = 16  # `TLSv1.3`: Envoy names the negotiated version, nothing longer
TEXT_CAPS: Mapping[str, int] = {
    DETAILS_ATTRIBUTE: MAX_CODE_DETAILS,
    "upstream.transport_failure_reason": MAX_TRANSPORT_FAILURE_REASON,
    "xds.cluster_name": MAX_NAME,
    "upstream.address": MAX_ADDRESS,
    "xds.route_name": MAX_NAME,
    "xds.cluster_metadata": MAX_CLUSTER_METADATA,
    "request.host": MAX_HOST,
    "connection.uri_san_peer_certificate": MAX_PEER_IDENTITY,
    "upstream.tls_version": MAX_TLS_VERSION,
}

# The keys of our metadata namespace that carry the request phase to the response phase.
CARRIED_ACTIONS = "actions"
CARRIED_HOST = "request_host"
CARRIED_DIRECTION = "direction"
CARRIED_REVEAL = "reveal"
# The key a diagnosis writes into our namespace (`diagnosis_fields`); its presence there
# at response time means another doctor filter diagnosed the response already.
DIAGNOSED_KEY = "reason"

DECLARED = {str(d): d for d in (Direction.EDGE, Direction.OUTBOUND, Direction.INBOUND)}

# The caller's certificate identity (RESPONSE_ATTRIBUTES): a SPIFFE ID marks a workload of
# the mesh, which Istio's inbound mTLS chain has verified against the mesh's CA.
PEER_ATTRIBUTE = "connection.uri_san_peer_certificate"
MESH_IDENTITY_PREFIX = "spiffe://"

# x-extproc-actions entry (reported, counted in extproc_actions_total) for a request whose
# x-extproc-reveal did not carry the policy's token.
REFUSED_REVEAL = "refuse-reveal-token"
FORWARDING_STRIP = "strip-forwarding-headers"

# At most one log line per this many seconds for each event a client can repeat at will
# (a wrong reveal token, forwarding headers at the edge): a guesser must not flood the
# log. The next line says how many were held back; the metrics count every one.
LOG_INTERVAL_SECONDS = 10.0


class Throttle:
    """Admits at most one event per `interval` seconds and counts the ones it holds back."""

    __slots__ = ("_clock", "_held", "_next", "interval")

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next = -math.inf
        self._held = 0

    def admit(self) -> int | None:
        """None: hold this one back; otherwise how many were held back since the last one."""
        now = self._clock()
        if now < self._next:
            self._held += 1
            return None
        held, self._held = self._held, 0
        self._next = now + self.interval
        return held


# Per server process, like the metrics.
REFUSED_REVEAL_LOG = Throttle(LOG_INTERVAL_SECONDS)
FORWARDING_LOG = Throttle(LOG_INTERVAL_SECONDS)


def declared_direction(value: str | bytes | None) -> Direction | None:
    """The direction a rendered filter declared (x-extproc-direction); unknown: None."""
    if value is None:
        return None
    return DECLARED.get(value if isinstance(value, str) else value.decode("latin-1"))


@dataclass(frozen=True, slots=True)
class Carried:
    """What the response phase needs from the request phase of the same HTTP request."""

    actions: str = ""  # the x-extproc-actions value; "" when the request was not changed
    # The authority the request was routed with, after any rewrite; "" for a request
    # answered from its names alone (`UNTOUCHED`): the response phase reads request.host.
    host: str = ""
    direction: Direction | None = None  # where the filter sits, as the request phase saw it
    reveal: bool = False  # the request carried the policy's reveal token
    # Another of the doctor's filters already diagnosed this response (gated mode: the
    # response-gated filter runs before the hygiene one on the response path, and its
    # reason is in our namespace): annotate the actions only, count nothing twice.
    diagnosed: bool = False


NOTHING_CARRIED = Carried()


@dataclass(frozen=True, slots=True)
class Answer:
    """Changes to one message's headers, and the fields for our metadata namespace."""

    overwrite: tuple[Header, ...] = ()
    append: tuple[Header, ...] = ()
    remove: tuple[str, ...] = ()
    clear_route_cache: bool = False
    metadata: Mapping[str, str | int] | None = None

    @property
    def mutates(self) -> bool:
        return bool(self.overwrite or self.append or self.remove)


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """The request phase: the decision (for metrics), what to carry, and the answer (None: continue)."""

    decision: RequestDecision
    carried: Carried
    answer: Answer | None


def on_request(
    policy: Policy,
    headers: Sequence[Header],
    listener: int | None = None,
    declared: Direction | None = None,
) -> RequestOutcome:
    """The request headers' answer. The metadata carries the phase only when something changed:
    otherwise the response phase has all it needs from its own attributes."""
    direction = resolve_direction(policy, listener, declared)
    decision = decide(policy, headers, declared=direction)
    if not decision.applied:
        return RequestOutcome(decision, Carried("", decision.host, direction), None)
    reveal = REVEAL_HEADER in decision.remove and revealed(policy, headers)
    if REVEAL_HEADER in decision.remove and not reveal:
        decision = _refuse_reveal(decision)
    if direction is Direction.EDGE:
        _say_forwarding_stripped(decision)
    actions = actions_header(decision.applied)
    answer = Answer(
        overwrite=decision.overwrite,
        append=decision.append,
        remove=decision.remove,
        clear_route_cache=decision.clear_route_cache,
        metadata={
            CARRIED_ACTIONS: actions,
            # A Host that is not printable ASCII stays behind: the response phase then
            # reads `request.host` (metadata strings must be UTF-8).
            CARRIED_HOST: decision.host if _header_safe(decision.host) else "",
            CARRIED_DIRECTION: str(direction),
            **({CARRIED_REVEAL: 1} if reveal else {}),
        },
    )
    return RequestOutcome(decision, Carried(actions, decision.host, direction, reveal), answer)


# The common, clean request's outcome: nothing changed, nothing carried. Its Host is not
# carried either: the response phase reads `request.host`, as over the HTTP lane, where a
# clean request writes no metadata. Built once (a frozen dataclass costs more to build
# than the rest of a clean request phase).
UNTOUCHED = RequestOutcome(NO_CHANGE, NOTHING_CARRIED, None)


def request_phase(
    policy: Policy,
    first: NamesFirst,
    names: Collection[str],
    read: Callable[[], tuple[Sequence[Header], int | None]],
    declared: Direction | None = None,
) -> RequestOutcome:
    """The request headers' answer, from their names first: the common, clean request (no
    rule looks at any of its names wherever the filter sits: `first`, the policy's
    `headers.names_first`) is `UNTOUCHED`, no value read. Any other is read whole (`read()`:
    the headers, and the listener's direction) and goes to `on_request`."""
    if first.untouched(names):
        return UNTOUCHED
    headers, listener = read()
    return on_request(policy, headers, listener, declared)


def _refuse_reveal(decision: RequestDecision) -> RequestDecision:
    """The decision with the refused token on record; a log line, at most one per interval.

    Neither says what was sent: a near miss must not teach a guesser anything."""
    held = REFUSED_REVEAL_LOG.admit()
    if held is not None:
        log.warning("reveal_token_refused", held_back=held, header=REVEAL_HEADER)
    refused = Applied(REFUSED_REVEAL, (REVEAL_HEADER,), report=True)
    return replace(decision, applied=(*decision.applied, refused))


def _say_forwarding_stripped(decision: RequestDecision) -> None:
    """At the edge, say (at most once per interval) which forwarding headers went and what
    to do if a proxy in front set them: the client never sees x-extproc-actions there."""
    for entry in decision.applied:
        if entry.token == FORWARDING_STRIP:
            held = FORWARDING_LOG.admit()
            if held is not None:
                log.warning(
                    "forwarding_headers_stripped", headers=" ".join(entry.names),
                    report=entry.report, held_back=held,
                    hint="a load balancer or CDN in front of this gateway that sets them? "
                    "set trusted_hops in the policy (Istio: gatewayTopology.numTrustedProxies)",
                )  # fmt: skip
            return


def revealed(policy: Policy, headers: Iterable[Header]) -> bool:
    """Whether an `x-extproc-reveal` header carries the policy's token (compared in
    constant time; any one of several values will do)."""
    token = policy.reveal_token
    return bool(token) and any(
        name == REVEAL_HEADER
        and hmac.compare_digest(value.encode("utf-8", "surrogateescape"), token)
        for name, value in headers
    )


def carried_from(fields: Mapping[str, object] | None) -> Carried:
    """The Carried the request phase wrote into our metadata namespace (HTTP lane).

    Values of the wrong type count as absent: a peer could send anything.
    """
    if not fields:
        return NOTHING_CARRIED
    actions, host = fields.get(CARRIED_ACTIONS), fields.get(CARRIED_HOST)
    direction, reveal = fields.get(CARRIED_DIRECTION), fields.get(CARRIED_REVEAL)
    return Carried(
        actions if isinstance(actions, str) and _header_safe(actions) else "",
        host if isinstance(host, str) else "",
        declared_direction(direction) if isinstance(direction, str) else None,
        # Exactly what on_request writes (Struct numbers arrive as floats); not a bool.
        type(reveal) in (int, float) and reveal == 1,
        DIAGNOSED_KEY in fields,
    )


def _header_safe(value: str) -> bool:
    """Whether a carried value may go into a response header as it is: our own
    `actions_header` output always is; anything else in the namespace is dropped."""
    return len(value) <= 8 * MAX_VALUE and value.isascii() and value.isprintable()


def code_of(raw: bytes | None) -> int | None:
    """A status or grpc-status header value, if it is one."""
    return int(raw) if raw is not None and len(raw) <= 3 and raw.isdigit() else None


def forged_of(signs: Mapping[str, bytes]) -> tuple[str, ...]:
    """The x-extproc-* headers an upstream sent (only the doctor writes them)."""
    if _ANNOTATIONS.isdisjoint(signs):  # the common case, in one set test
        return ()
    return tuple(name for name in ANNOTATION_HEADERS if name in signs)


_ANNOTATIONS = frozenset(ANNOTATION_HEADERS)


def triage(
    signs: Mapping[str, bytes],
    *,
    has_attributes: bool,
    flags: int | None = None,
    code: int | None = None,
    details: str = "",
) -> Evidence:
    """Just enough evidence to tell whether Envoy failed the response.

    `signs`: the response headers named in `RESPONSE_SIGNS`; `flags`, `code`, `details`:
    the three attributes, already range-checked by the adapter.
    """
    status, grpc_status = code_of(signs.get(":status")), code_of(signs.get("grpc-status"))
    answered = "x-envoy-upstream-service-time" in signs
    overloaded = "x-envoy-overloaded" in signs
    if not has_attributes:
        return _triaged(status, grpc_status, answered, overloaded, None)
    return _triaged(status, grpc_status, answered, overloaded, (flags or 0, code, details))


# Clean traffic brings a handful of distinct triage inputs (200 via_upstream, a 404, ...):
# each one's Evidence is built once (a 25-field frozen dataclass costs more than the rest
# of the clean response phase) and shared, which a frozen value allows. A peer sending
# ever new details only evicts; each entry holds at most MAX_CODE_DETAILS characters.
TRIAGE_CACHE_SIZE = 256


@lru_cache(maxsize=TRIAGE_CACHE_SIZE)
def _triaged(
    status: int | None,
    grpc_status: int | None,
    answered: bool,
    overloaded: bool,
    attributes: tuple[int, int | None, str] | None,
) -> Evidence:
    """`triage`'s Evidence; `attributes`: (flags, response.code, details), None without them."""
    if attributes is None:
        return Evidence(status=status, grpc_status=grpc_status, upstream_answered=answered,
                        overloaded=overloaded)  # fmt: skip
    bits, code, details = attributes
    # A newer Envoy's flag bits this table does not know are kept as evidence, not matched.
    return Evidence(
        status=status if status is not None else code,
        flags=bits & F.ALL_FLAGS,
        unknown_flags=F.unknown_bits(bits),
        code_details=details,
        grpc_status=grpc_status,
        upstream_answered=answered,
        overloaded=overloaded,
        has_attributes=True,
    )


def needs_answer(triaged: Evidence, forged: tuple[str, ...], carried: Carried) -> bool:
    """False for the common case: a clean response to an unchanged request, nothing forged;
    and for a response another doctor filter diagnosed already, when nothing else is due."""
    if carried.diagnosed:
        return bool(carried.actions)
    return bool(carried.actions or forged or is_envoy_failure(triaged))


def complete(evidence: Evidence, texts: Mapping[str, str] | None, host: str) -> Evidence:
    """The triaged evidence with the `COMPLETION` fields, by Evidence field (the adapter
    reads them), and the carried Host, which wins over `request.host`."""
    if texts is None:
        return replace(evidence, host=host[:MAX_HOST])
    fields: dict[str, Any] = {f: texts.get(f, "") for f, _ in COMPLETION}
    if host:
        fields["host"] = host[:MAX_HOST]
    return replace(evidence, **fields)


class ClusterTls(Protocol):
    """The clusters' TLS settings and the memory of their closes (`extproc.envoy_admin`)."""

    def enrich(self, ev: Evidence) -> Evidence: ...

    @property
    def watching(self) -> bool: ...

    def answered(self, cluster: str) -> None: ...


class Attributes(Protocol):
    """How an adapter reads the attributes Envoy attached (a protobuf Struct, a JSON map)."""

    def number(self, key: str, limit: int) -> int | None:
        """A whole number in [0, limit], or None: Envoy sends doubles, a peer anything."""
        ...

    def text(self, key: str) -> str:
        """A string (a number as its digits), or ""."""
        ...


def read_text(attributes: Attributes, key: str) -> str:
    """A text attribute cut to its cap in `TEXT_CAPS`, before anything parses it."""
    return attributes.text(key)[: TEXT_CAPS[key]]


@dataclass(frozen=True, slots=True)
class ResponseOutcome:
    diagnosis: Diagnosis | None
    answer: Answer | None
    direction: Direction | None = None  # where the filter sits, as this phase resolved it


def on_response(
    policy: Policy,
    evidence: Evidence,
    forged: tuple[str, ...],
    carried: Carried,
    *,
    listener: int | None = None,
    declared: Direction | None = None,
    cluster_tls: ClusterTls | None = None,
    mesh_peer: bool = False,
) -> ResponseOutcome:
    """The response headers' answer, once `needs_answer` said there is one; `evidence` complete.

    `mesh_peer`: the caller presented a mesh identity (`PEER_ATTRIBUTE`). A response
    another doctor filter diagnosed (`carried.diagnosed`) gets the actions only: its
    x-extproc-* headers are that filter's, not the upstream's.
    """
    failed = is_envoy_failure(evidence)
    diagnosis = None
    if carried.diagnosed:
        forged = ()
    elif failed or carried.actions:
        if cluster_tls is not None and failed:
            evidence = cluster_tls.enrich(evidence)
        diagnosis = classify(evidence)
    if diagnosis is None and not carried.actions and not forged:
        return ResponseOutcome(None, None)
    direction = carried.direction or resolve_direction(policy, listener, declared)
    headers: list[Header] = []
    show = carried.reveal or policy.shows_annotations(direction, mesh_peer=mesh_peer)
    if carried.actions and show:
        headers.append((ACTIONS_HEADER, carried.actions))
    metadata = None
    if diagnosis is not None:
        if show:
            headers.extend(diagnosis_headers(diagnosis))
        metadata = diagnosis_fields(diagnosis)
        log.warning("upstream_failure", **metadata)
    # What the upstream sent under our names goes, unless our own value replaces it.
    written = {name for name, _ in headers}
    remove = tuple(name for name in forged if name not in written)
    answer = Answer(overwrite=tuple(headers), remove=remove, metadata=metadata)
    return ResponseOutcome(diagnosis, answer, direction)


def response_phase(
    policy: Policy,
    signs: Mapping[str, bytes],
    attributes: Attributes | None,
    carried: Carried,
    *,
    declared: Direction | None = None,
    cluster_tls: ClusterTls | None = None,
) -> ResponseOutcome | None:
    """The response headers, from the few headers triage reads (`RESPONSE_SIGNS`) and the
    attributes; None for the common case, a clean response to an unchanged request, which
    the adapter answers with the continue it built once."""
    forged = () if carried.diagnosed else forged_of(signs)
    if attributes is None:
        triaged = triage(signs, has_attributes=False)
    else:
        triaged = triage(
            signs, has_attributes=True,
            flags=attributes.number(FLAGS_ATTRIBUTE, F.MAX_FLAGS_VALUE),
            # Only a response without a readable :status takes its status from the attribute.
            code=None if code_of(signs.get(":status")) is not None
            else attributes.number(CODE_ATTRIBUTE, 999),
            details=attributes.text(DETAILS_ATTRIBUTE)[:MAX_CODE_DETAILS],
        )  # fmt: skip
    if not needs_answer(triaged, forged, carried):
        if cluster_tls is not None and cluster_tls.watching and attributes is not None:
            # A clean answer ends its cluster's run of closes; read only while one runs.
            cluster_tls.answered(read_text(attributes, "xds.cluster_name"))
        return None
    texts = None if attributes is None else {f: read_text(attributes, key) for f, key in COMPLETION}
    listener = None if attributes is None else attributes.number(LISTENER_ATTRIBUTE, 2)
    peer = "" if attributes is None else read_text(attributes, PEER_ATTRIBUTE)
    return on_response(
        policy, complete(triaged, texts, carried.host), forged, carried,
        listener=listener, declared=declared, cluster_tls=cluster_tls,
        mesh_peer=peer.startswith(MESH_IDENTITY_PREFIX),
    )  # fmt: skip


def diagnosis_fields(diagnosis: Diagnosis) -> dict[str, str | int]:
    """The diagnosis for access logs and our own log: every string escaped as in the header."""
    fields: dict[str, str | int] = {"reason": diagnosis.reason, "hint": diagnosis.hint}
    for key, value in diagnosis.evidence:
        fields[key] = printable(value, MAX_VALUE) if isinstance(value, str) else value
    return fields


REDACTED = "<redacted>"


def error_fields(exc: BaseException, values: Iterable[str]) -> dict[str, str]:
    """An exception for the log: its type, its message and its stack, with every header
    value of the message being processed (`values`) cut out of the message (a message
    may quote the value that broke it: a cookie, a token). The stack lists code
    locations only, never local values."""
    message = str(exc)
    for value in sorted(set(values), key=len, reverse=True):
        for form in (value, repr(value)[1:-1]):
            if len(form) >= 3 and form in message:
                message = message.replace(form, REDACTED)
    stack = "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__)))
    return {"error": type(exc).__name__, "message": message, "stack": stack}
