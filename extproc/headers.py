"""Request header hygiene: plain headers and a policy in, the changes to make out.

Strategy: Envoy's HTTP connection manager already removes hop-by-hop headers, a
client-sent x-forwarded-client-cert and Envoy's own control headers before any filter
runs, so the rules here cover what it leaves: headers that an application echoed back
into the mesh, forwarding headers a client made up at the edge, header names with
underscores, and a Host the mesh cannot route. Two cheap defensive rules stay for the
hop-by-hop cases in case Envoy's settings differ.

Each header rule is a row of `RULES`; `decide` walks the rows once over the headers. The
Host rewrite is a separate step because it computes a new value instead of dropping one.
Nothing here imports grpc or protobuf.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from extproc.config import Action, Direction, Policy

Header = tuple[str, str]  # (lower-case name, value)

# Headers Envoy (and Istio's metadata exchange) set on requests they forward to an
# application, or on responses. Arriving on an application's outbound request they are
# echoes: a copied x-envoy-peer-metadata impersonates another workload in telemetry, a
# copied attempt count or decorator skews retries and traces. Control headers that an app
# may set on purpose (x-envoy-retry-on, x-envoy-upstream-rq-timeout-ms) are not here.
ECHOED_ENVOY_HEADERS = frozenset(
    {
        "x-envoy-attempt-count",
        "x-envoy-peer-metadata",
        "x-envoy-peer-metadata-id",
        "x-envoy-decorator-operation",
        "x-envoy-expected-rq-timeout-ms",
        "x-envoy-original-path",
        "x-envoy-original-host",
        "x-envoy-external-address",
        "x-envoy-downstream-service-cluster",
        "x-envoy-downstream-service-node",
        "x-envoy-is-timeout-retry",
        "x-envoy-upstream-service-time",
        "x-envoy-upstream-canary",
        "x-envoy-upstream-healthchecked-cluster",
        "x-envoy-overloaded",
        "x-envoy-ratelimited",
        "x-envoy-degraded",
        "x-envoy-immediate-health-check-fail",
    }
)

# Forwarding headers a client can invent; upstreams trust them for redirects, links and
# access control. At the edge nobody trustworthy has set them yet.
FORWARDING_HEADERS = frozenset({"x-forwarded-host", "x-real-ip", "forwarded"})

# Envoy removes these itself (RFC 9110 §7.6.1); kept as a cheap guard.
_HOP_BY_HOP = frozenset({"keep-alive", "proxy-connection"})

_EVERYWHERE = frozenset({Direction.EDGE, Direction.OUTBOUND, Direction.INBOUND})

Matcher = Callable[[str, str, frozenset[str]], bool]  # (name, value, all names) -> match


@dataclass(frozen=True, slots=True)
class HeaderRule:
    """Headers to remove (or rename) when the policy switch and the direction allow it.

    `names` are the header names the rule looks at, so most requests are ruled out by one
    set intersection; None means every name containing `_`. `when`, if given, must also
    hold for the header.
    """

    subject: str  # names the rule in x-extproc-actions: strip-<subject>
    names: frozenset[str] | None
    setting: str | None  # the Policy field that switches it; None: always strip
    directions: frozenset[Direction] = _EVERYWHERE
    when: Matcher | None = None


RULES: tuple[HeaderRule, ...] = (
    HeaderRule(
        "hop-by-hop-headers",
        _HOP_BY_HOP | {"te"},
        setting=None,
        when=lambda n, v, _: n != "te" or v.strip().lower() != "trailers",
    ),
    # RFC 9112 §6.3: with both, Transfer-Encoding wins and Content-Length must go.
    HeaderRule(
        "content-length",
        frozenset({"content-length"}),
        setting=None,
        when=lambda _n, _v, names: "transfer-encoding" in names,
    ),
    HeaderRule(
        "echoed-envoy-headers",
        ECHOED_ENVOY_HEADERS,
        setting="echoed_envoy_headers",
        directions=frozenset({Direction.EDGE, Direction.OUTBOUND}),
    ),
    HeaderRule(
        "forwarding-headers",
        FORWARDING_HEADERS,
        setting="forwarding_headers",
        directions=frozenset({Direction.EDGE}),
    ),
    HeaderRule("underscore-headers", None, setting="underscore_headers"),
)


def _candidates(rule: HeaderRule, names: frozenset[str]) -> frozenset[str]:
    """The request's header names this rule may act on: no Python loop on a clean request."""
    if rule.names is not None:
        return rule.names & names
    if "_" not in "".join(names):
        return frozenset()
    return frozenset(n for n in names if "_" in n)


@dataclass(frozen=True, slots=True)
class Applied:
    """One entry of x-extproc-actions: a token, the header names, and whether it was only reported."""

    token: str
    names: tuple[str, ...] = ()
    report: bool = False


@dataclass(frozen=True, slots=True)
class RequestDecision:
    """The changes to make to one request, and the record of them."""

    remove: tuple[str, ...] = ()
    overwrite: tuple[Header, ...] = ()
    append: tuple[Header, ...] = ()
    clear_route_cache: bool = False
    applied: tuple[Applied, ...] = ()
    host: str = ""  # the authority the request is routed with, after any rewrite

    @property
    def changes(self) -> bool:
        return bool(self.remove or self.overwrite or self.append)


NO_CHANGE = RequestDecision()


def resolve_direction(policy: Policy, listener_direction: int | None) -> Direction:
    """The policy's direction, or the listener's (Envoy's TrafficDirection: 1 in, 2 out)."""
    if policy.direction is not Direction.AUTO:
        return policy.direction
    return {1: Direction.INBOUND, 2: Direction.OUTBOUND}.get(
        listener_direction or 0, Direction.EDGE
    )


@lru_cache(maxsize=64)  # a few policies (reloads) times three directions
def _active_rules(
    policy: Policy, direction: Direction
) -> tuple[tuple[HeaderRule, Action, bool], ...]:
    """The rules that apply, with their action and whether they only report; once per policy."""
    active = []
    for rule in RULES:
        action = Action.STRIP if rule.setting is None else getattr(policy, rule.setting)
        if action is Action.KEEP or direction not in rule.directions:
            continue
        report = action is Action.REPORT or not policy.enforcing
        active.append((rule, action, report))
    return tuple(active)


@dataclass(slots=True)
class _Builder:
    # An ordered set: a request can carry many thousands of headers.
    remove: dict[str, None] = field(default_factory=dict)
    overwrite: list[Header] = field(default_factory=list)
    append: list[Header] = field(default_factory=list)
    applied: list[Applied] = field(default_factory=list)
    clear_route_cache: bool = False

    def add(self, name: str, value: str) -> None:
        # Envoy applies removals before additions; a header removed and re-added is
        # an overwrite, so say so instead of relying on the order.
        if name in self.remove:
            del self.remove[name]
            self.overwrite.append((name, value))
        else:
            self.append.append((name, value))


def decide(
    policy: Policy, headers: Sequence[Header], listener_direction: int | None = None
) -> RequestDecision:
    """What to change in a request's headers under `policy`."""
    rules = _active_rules(policy, resolve_direction(policy, listener_direction))
    names = frozenset(n for n, _ in headers)
    out = _Builder()
    for rule, action, report in rules:
        candidates = _candidates(rule, names)
        if not candidates:
            continue
        when = rule.when
        hits = [
            (n, v) for n, v in headers if n in candidates and (when is None or when(n, v, names))
        ]
        if hits:
            _apply_rule(out, rule, hits, names, action=action, report=report)
    host = _authority(headers)
    host = _rewrite_host(policy, host, out) if host else host
    if not out.applied:
        return RequestDecision(host=host) if host else NO_CHANGE
    return RequestDecision(
        remove=tuple(out.remove),
        overwrite=tuple(out.overwrite),
        append=tuple(out.append),
        clear_route_cache=out.clear_route_cache,
        applied=tuple(out.applied),
        host=host,
    )


def _apply_rule(
    out: _Builder,
    rule: HeaderRule,
    hits: list[Header],
    names: frozenset[str],
    *,
    action: Action,
    report: bool,
) -> None:
    hit_names = tuple(dict.fromkeys(n for n, _ in hits))
    verb = "rewrite" if action is Action.REWRITE else "strip"
    out.applied.append(Applied(f"{verb}-{rule.subject}", hit_names, report=report))
    if report:
        return
    out.remove.update(dict.fromkeys(hit_names))
    if action is Action.REWRITE:
        for name, value in hits:
            dashed = name.replace("_", "-")
            # An existing dashed header is the one upstreams already read: keep it alone.
            if dashed not in names:
                out.add(dashed, value)


def _authority(headers: Sequence[Header]) -> str:
    for name, value in headers:
        if name == ":authority":
            return value
    for name, value in headers:
        if name == "host":
            return value
    return ""


def split_authority(authority: str) -> tuple[str, str]:
    """`host:port` → (host, port); IPv6 literals keep their brackets; port may be ''."""
    if authority.startswith("["):
        end = authority.find("]")
        if end != -1:
            rest = authority[end + 1 :]
            return authority[: end + 1], rest[1:] if rest.startswith(":") else ""
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit():
        return host, port
    return authority, ""


def _rewrite_host(policy: Policy, authority: str, out: _Builder) -> str:
    """Apply host_rewrites or strip_host_port; return the authority Envoy will route with."""
    host, port = split_authority(authority)
    target = policy.host_rewrites.get(host.lower().rstrip("."))
    label = "rewrite-host"
    if target is None and policy.strip_host_port and port:
        target, label = host, "strip-host-port"
    if target is None or target == authority:
        return authority
    if not policy.enforcing:
        out.applied.append(Applied(label, (":authority",), report=True))
        return authority
    out.applied.append(Applied(label, (":authority",)))
    out.overwrite.append((":authority", target))
    out.add("x-forwarded-host", authority)
    out.clear_route_cache = True
    return target
