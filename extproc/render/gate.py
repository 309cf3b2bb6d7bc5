"""Gated mode's conditions: which requests and responses Envoy sends to the server.

Strategy: clean traffic should never leave Envoy. A response is worth a call when it can
carry a failure the catalogue explains; a request when one of the policy's header rules
could act on it. Both are written here as plain data (`HeaderTest` rows, ANDed into a
`Condition`, ORed into a gate) and turned into Envoy matchers by `envoy_config`. A rule
whose condition no Envoy matcher can state (a header *name* containing `_`) either sends
every request, when it changes requests, or is left to requests that reach the server
anyway, when it only reports: `RequestGate.note` says which, for the operator.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from extproc.config import Action, Direction, Policy
from extproc.headers import RULES, rule_action


class Phase(enum.StrEnum):
    REQUEST = "request"
    RESPONSE = "response"


@dataclass(frozen=True, slots=True)
class HeaderTest:
    """A header's whole value matches the RE2 `value` (`.*`: the header is present), or with
    `exact` equals it; with `absent`, the test holds when that does not (header missing).

    `exact` is the cheaper matcher (no RE2 call on every response), for a fixed value.
    Presence stays `.*`: xds's StringMatcher refuses an empty prefix, and Envoy runs no
    matcher on a missing header, so `.*` costs nothing on clean traffic.
    """

    phase: Phase
    header: str
    value: str = ".*"
    absent: bool = False
    exact: bool = False


Condition = tuple[HeaderTest, ...]  # all of them


def _response(
    header: str, value: str = ".*", *, absent: bool = False, exact: bool = False
) -> HeaderTest:
    return HeaderTest(Phase.RESPONSE, header, value, absent, exact)


# The responses that reach the server in gated mode, and why. What they miss is listed in
# docs/deploy/index.md ("Gated or always").
RESPONSE_CONDITIONS: tuple[tuple[str, Condition], ...] = (
    # Not `prefix: "5"`: Envoy 1.40 passes an HTTP/1 upstream's status 50 or 5000 through.
    ("any 5xx: an Envoy failure, or the upstream's own", (_response(":status", "5[0-9][0-9]"),)),
    (
        "a 404 no upstream answered (no route): the upstream's own 404 carries x-envoy-upstream-service-time",
        (
            _response(":status", "404", exact=True),
            _response("x-envoy-upstream-service-time", absent=True),
        ),
    ),
    (
        "a gRPC error in the headers: Envoy's gRPC local replies are HTTP 200 with grpc-status",
        (_response("grpc-status", "[1-9][0-9]*"),),
    ),
)

# A rule with a set of `names` is gated on their presence; a rule that looks at every
# header name (`names` None: underscores) cannot be, since no Envoy matcher enumerates names.
# RULES rows without a setting (hop-by-hop, Content-Length with Transfer-Encoding) guard
# against what Envoy's HTTP connection manager already removes or rejects: nothing to send.


@dataclass(frozen=True, slots=True)
class RequestGate:
    """The requests the server must see: any of `conditions`, or every request."""

    conditions: tuple[Condition, ...] = ()
    every_request: bool = False
    note: str = ""


def request_gate(policy: Policy, listener: Direction) -> RequestGate:
    """The request-side gate for a listener of direction `listener` (EDGE, OUTBOUND, INBOUND) under `policy`."""
    direction = listener if policy.direction is Direction.AUTO else policy.direction
    conditions: list[Condition] = []
    unstated: list[tuple[str, Action]] = []
    for rule in RULES:
        action = rule_action(policy, rule, direction)
        if rule.setting is None or action is Action.KEEP:
            continue
        if rule.when is not None:
            raise ValueError(f"gated mode does not know how to gate the {rule.setting} rule")
        if rule.names is None:
            unstated.append((rule.setting, action))
        else:
            conditions += [(HeaderTest(Phase.REQUEST, name),) for name in sorted(rule.names)]
    conditions += _host_conditions(policy)
    return _with_unstated(tuple(conditions), unstated, policy)


def _host_conditions(policy: Policy) -> list[Condition]:
    """`:authority` tests for host_rewrites (any case, any port) and strip_host_port."""
    found: list[Condition] = []
    if policy.host_rewrites:
        hosts = "|".join(re.escape(host) for host in sorted(policy.host_rewrites))
        found.append((HeaderTest(Phase.REQUEST, ":authority", f"(?i)(?:{hosts})\\.?(?::[0-9]+)?"),))
    if policy.strip_host_port:
        found.append((HeaderTest(Phase.REQUEST, ":authority", ".*:[0-9]+"),))
    return found


def _with_unstated(
    conditions: tuple[Condition, ...], unstated: list[tuple[str, Action]], policy: Policy
) -> RequestGate:
    changing = [key for key, action in unstated if action is not Action.REPORT and policy.enforcing]
    if changing:
        return RequestGate(
            every_request=True,
            note=(
                f"{', '.join(changing)} changes requests and no Envoy matcher can find the "
                "headers it acts on, so every request goes to the server: set it to report "
                "or keep to gate the request side"
            ),
        )
    reported = [key for key, _ in unstated]
    note = (
        f"{', '.join(reported)} only reports, so it is reported on requests that reach the "
        "server for another reason: use --mode always to report it on every request"
        if reported
        else ""
    )
    return RequestGate(conditions=conditions, note=note)
