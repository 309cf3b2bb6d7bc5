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

No rewrite creates a header the mesh trusts (`is_protected`): Envoy removes a client's
x-forwarded-client-cert or x-envoy-retry-on before any filter runs, so renaming a
client's `x_forwarded_client_cert` into the free dashed name would forge an identity.
The rules judge the request as it will leave: a rename target that a strip rule of the
policy would remove is protected too (docs/threat-model.md, T1).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from extproc.authority import parse_authority
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

# Forwarding headers a client can invent; upstreams trust them for redirects, links,
# identity and access control. At the edge nobody trustworthy has set them yet, unless
# the policy trusts proxies in front (`trusted_hops`). Every x-forwarded-* name that
# frameworks and proxies are known to read, except Envoy's own (below).
FORWARDING_HEADERS = frozenset(
    {
        "forwarded",  # RFC 7239
        "x-real-ip",  # nginx
        "x-forwarded-host",  # Django, Rails, Spring, Express, Werkzeug's ProxyFix
        "x-forwarded-port",  # Django, Rails, Spring, ProxyFix
        "x-forwarded-prefix",  # Spring, ASP.NET Core, ProxyFix, Traefik
        "x-forwarded-server",  # Apache mod_proxy, Traefik
        "x-forwarded-uri",  # Traefik (forward auth)
        "x-forwarded-method",  # Traefik (forward auth)
        "x-forwarded-path",  # a path prefix some API gateways pass on
        "x-forwarded-scheme",  # Rack, ingress-nginx
        "x-forwarded-ssl",  # Rack, Spring
        "x-forwarded-user",  # oauth2-proxy: the identity an app believes
        "x-forwarded-email",  # oauth2-proxy
        "x-forwarded-groups",  # oauth2-proxy
        "x-forwarded-preferred-username",  # oauth2-proxy
        "x-forwarded-access-token",  # oauth2-proxy
    }
)

# Not here: the x-forwarded-* headers Envoy's HTTP connection manager sets itself
# (checked with Envoy 1.40, tests/envoy/test_forwarding_e2e.py): x-forwarded-for
# (appended with use_remote_address), x-forwarded-proto (set when absent; overwritten for
# an external client with use_remote_address), x-forwarded-client-cert (a client's removed
# by default). Envoy's own settings (use_remote_address, xff_num_trusted_hops,
# forward_client_cert_details) decide what they carry.

# Envoy removes these itself (RFC 9110 §7.6.1); kept as a cheap guard.
_HOP_BY_HOP = frozenset({"keep-alive", "proxy-connection"})

# Names the mesh trusts on a request: identity, routing, retries, telemetry, framing.
# A rename never produces one of them, nor a name under these prefixes.
PROTECTED_PREFIXES = ("x-envoy-", "x-forwarded-", "x-extproc-", "x-istio-")
PROTECTED_NAMES = frozenset(
    {
        "forwarded",
        "x-real-ip",
        "x-request-id",
        "x-client-trace-id",
        "host",
        "content-length",
        "transfer-encoding",
        # RFC 9110 §7.6.1 hop-by-hop, and the proxy credentials
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)


def is_protected(name: str, also: frozenset[str] = frozenset()) -> bool:
    """Whether a rewrite may not create `name` (lower case); `also`: the policy's strip names."""
    return name in PROTECTED_NAMES or name in also or name.startswith(PROTECTED_PREFIXES)


_EVERYWHERE = frozenset({Direction.EDGE, Direction.OUTBOUND, Direction.INBOUND})

Matcher = Callable[[str, str, frozenset[str]], bool]  # (name, value, all names) -> match

# The request header an operator sends, with the policy's reveal token, to see the
# annotations where the policy hides them (the edge).
REVEAL_HEADER = "x-extproc-reveal"


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
    # Applied in `mode: report` too: the header must never reach the upstream.
    always: bool = False
    # Off when the policy trusts proxies in front of the edge (`trusted_hops`).
    trusted_proxies_set: bool = False


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
        trusted_proxies_set=True,
    ),
    HeaderRule("underscore-headers", None, setting="underscore_headers"),
    # The operator's reveal secret (`reveal_token_file`): used by the server, never sent on.
    HeaderRule("reveal-header", frozenset({REVEAL_HEADER}), setting="reveal_header", always=True),
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


_LISTENER_DIRECTIONS = {1: Direction.INBOUND, 2: Direction.OUTBOUND}


def resolve_direction(
    policy: Policy, listener_direction: int | None, declared: Direction | None = None
) -> Direction:
    """Where the filter sits: the policy's `direction`, else what the rendered filter
    declared (x-extproc-direction), else the listener's (Envoy's TrafficDirection: 1 in,
    2 out), else the edge. An Istio gateway listener says OUTBOUND, so only the manifest
    can tell it from a sidecar."""
    if policy.direction is not Direction.AUTO:
        return policy.direction
    if declared is not None:
        return declared
    return _LISTENER_DIRECTIONS.get(listener_direction or 0, Direction.EDGE)


@dataclass(frozen=True, slots=True)
class _Active:
    """The rules that apply under one policy and direction, computed once."""

    rules: tuple[tuple[HeaderRule, Action, bool], ...]
    # Every fixed name an active rule looks at: what its strip rules may remove here, and
    # so what a rename must not create.
    protected: frozenset[str]
    underscores: bool  # a rule looks at every name containing `_`

    def may_act(self, names: Collection[str]) -> bool:
        """Whether any rule could act on a request with these header names."""
        return _may_act(self.protected, self.underscores, names)


def _may_act(watched: frozenset[str], underscores: bool, names: Collection[str]) -> bool:
    """One set test (and one join when a rule looks for `_`) rules out a clean request."""
    if not watched.isdisjoint(names):
        return True
    return underscores and "_" in "".join(names)


def rule_action(policy: Policy, rule: HeaderRule, direction: Direction) -> Action:
    """What `rule` does under `policy` where the filter sits; KEEP: nothing."""
    if direction not in rule.directions or (rule.trusted_proxies_set and policy.trusts_forwarding):
        return Action.KEEP
    if rule.setting is None:
        return Action.STRIP
    action: Action = getattr(policy, rule.setting)
    return action


def native_removals(policy: Policy, direction: Direction) -> tuple[str, ...]:
    """The header names Envoy removes itself, after the server has seen them, at a
    listener of `direction` (the policy's `direction` key wins, as in the server): what holds
    when the server is down, too slow, or gated out (docs/threat-model.md, T23, T24).

    The reveal header always (a token can be configured by a reload, after the manifest
    was rendered); and the fixed names of each rule that strips them here, only where the
    policy enforces it: Envoy's removal knows no `mode: report`.
    """
    where = direction if policy.direction is Direction.AUTO else policy.direction
    names = {REVEAL_HEADER}
    for rule in RULES:
        if rule.names is None or rule.when is not None or rule.setting is None:
            continue
        stripping = rule_action(policy, rule, where) is Action.STRIP
        if stripping and (policy.enforcing or rule.always):
            names |= rule.names
    return tuple(sorted(names))


@lru_cache(maxsize=64)  # a few policies (reloads) times three directions
def _active_rules(policy: Policy, direction: Direction) -> _Active:
    """The rules that apply, with their action and whether they only report; once per policy."""
    active = []
    stripped: set[str] = set()
    for rule in RULES:
        action = rule_action(policy, rule, direction)
        if action is Action.KEEP:
            continue
        report = not rule.always and (action is Action.REPORT or not policy.enforcing)
        active.append((rule, action, report))
        if rule.names is not None:
            stripped |= rule.names
    underscores = any(rule.names is None for rule, _, _ in active)
    return _Active(tuple(active), frozenset(stripped), underscores)


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
    policy: Policy,
    headers: Sequence[Header],
    listener_direction: int | None = None,
    declared: Direction | None = None,
) -> RequestDecision:
    """What to change in a request's headers under `policy`.

    `direction` is where the filter sits (see `resolve_direction`); EDGE when not given.
    """
    direction = resolve_direction(policy, listener_direction, declared)
    active = _active_rules(policy, direction)
    names = frozenset(n for n, _ in headers)
    host = _authority(headers)
    rewrites_host = bool(host) and bool(policy.host_rewrites or policy.strip_host_port)
    if not rewrites_host and not active.may_act(names):  # the common, clean request
        return RequestDecision(host=host) if host else NO_CHANGE
    out = _Builder()
    for rule, action, report in active.rules:
        candidates = _candidates(rule, names)
        if not candidates:
            continue
        when = rule.when
        hits = [
            (n, v) for n, v in headers if n in candidates and (when is None or when(n, v, names))
        ]
        if not hits:
            continue
        if action is Action.REWRITE:
            _rewrite(
                out, rule, hits, names, policy=policy, stripped=active.protected, report=report
            )
        else:
            _strip(out, rule, hits, report=report)
    if rewrites_host:
        host = _rewrite_host(policy, host, names, direction, out)
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


@dataclass(frozen=True, slots=True)
class NamesFirst:
    """Whether `decide` leaves a request with these header names alone whatever their
    values and wherever the filter sits: no rule of the policy, in any direction, looks at
    any of them, and no Host rewrite is configured. Built once per policy (`names_first`),
    so the common, clean request is answered from its names alone, before anything reads
    a value or the listener's direction."""

    watched: frozenset[str]  # every fixed name an active rule looks at, in any direction
    underscores: bool  # a rule looks at every name containing `_`
    reads_host: bool  # a Host rewrite is configured: every request is read whole

    def untouched(self, names: Collection[str]) -> bool:
        return not self.reads_host and not _may_act(self.watched, self.underscores, names)


def names_first(policy: Policy) -> NamesFirst:
    """The names-first test of `policy`: the union of what each direction's rules watch."""
    active = [_active_rules(policy, d) for d in Direction if d is not Direction.AUTO]
    return NamesFirst(
        frozenset().union(*(a.protected for a in active)),
        any(a.underscores for a in active),
        bool(policy.host_rewrites or policy.strip_host_port),
    )


def _names(hits: Sequence[Header]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n for n, _ in hits))


def _strip(out: _Builder, rule: HeaderRule, hits: list[Header], *, report: bool) -> None:
    hit_names = _names(hits)
    out.applied.append(Applied(f"strip-{rule.subject}", hit_names, report=report))
    if not report:
        out.remove.update(dict.fromkeys(hit_names))


def _rewrite(
    out: _Builder,
    rule: HeaderRule,
    hits: list[Header],
    names: frozenset[str],
    *,
    policy: Policy,
    stripped: frozenset[str],
    report: bool,
) -> None:
    """Rename `x_user_id` to `x-user-id`, unless the dashed name is one the mesh trusts."""
    renames: list[Header] = []
    blocked: list[Header] = []
    for name, value in hits:
        target = blocked if is_protected(name.replace("_", "-"), stripped) else renames
        target.append((name, value))
    refused = _names(blocked)
    if renames:
        renamed = _names(renames)
        out.applied.append(Applied(f"rewrite-{rule.subject}", renamed, report=report))
        if not report:
            out.remove.update(dict.fromkeys(renamed))
            for name, value in renames:
                dashed = name.replace("_", "-")
                # An existing dashed header is the one upstreams already read: keep it alone.
                if dashed not in names:
                    out.add(dashed, value)
    if refused:
        # Reported whatever the mode: the request asked for a trusted name.
        out.applied.append(Applied("refuse-protected-rewrite", refused, report=True))
        if policy.protected_rewrite is Action.STRIP:
            out.applied.append(Applied(f"strip-{rule.subject}", refused, report=report))
            if not report:
                out.remove.update(dict.fromkeys(refused))


def _authority(headers: Sequence[Header]) -> str:
    for name, value in headers:
        if name == ":authority":
            return value
    for name, value in headers:
        if name == "host":
            return value
    return ""


def _rewrite_host(
    policy: Policy,
    authority: str,
    names: frozenset[str],
    direction: Direction,
    out: _Builder,
) -> str:
    """Apply host_rewrites or strip_host_port; return the authority Envoy will route with.

    A Host that is not an authority (RFC 3986) is left alone and reported: no new
    `:authority` is ever built from a piece of it. The Host the client sent goes to the
    upstream in `x-forwarded-host`, overwriting a client's own at the edge (frameworks
    read the first value, and at the edge nobody trustworthy has set one yet); on a
    sidecar, or at an edge behind trusted proxies (`trusted_hops`), an x-forwarded-host
    already present was set by an earlier proxy and names the original Host better than
    we can, so it is kept.
    """
    parsed = parse_authority(authority)
    if parsed is None:
        out.applied.append(Applied("invalid-host", (":authority",), report=True))
        return authority
    host, port = parsed
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
    untrusted = direction is Direction.EDGE and not policy.trusts_forwarding
    if untrusted or "x-forwarded-host" not in names:
        out.remove["x-forwarded-host"] = None
        out.add("x-forwarded-host", authority)
    out.clear_route_cache = True
    return target
