"""Threat T1 as a property: the doctor never hands the upstream a header the mesh trusts.

For any request and any policy, the protected headers the upstream receives are a
subset of those it would receive with the filter absent. The one header the doctor
writes itself, `x-forwarded-host` after a Host rewrite, may only carry the Host the
client really sent. "Protected" here is the list in issue 9, written out as a spec and
not imported from extproc.headers, so a name dropped from the production table fails.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.config import policy_from_mapping
from extproc.headers import RequestDecision, decide

# The spec (issue 9, "No header is ever created that the mesh trusts").
SPEC_PREFIXES = ("x-envoy-", "x-forwarded-")
SPEC_NAMES = frozenset(
    {
        "forwarded",
        "x-real-ip",
        "x-forwarded-client-cert",
        "x-request-id",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
    }
)


def spec_protected(name: str) -> bool:
    return name in SPEC_NAMES or name.startswith(SPEC_PREFIXES)


def envoy_applies(headers: Sequence[tuple[str, str]], d: RequestDecision) -> list[tuple[str, str]]:
    """The headers after Envoy applies an ext_proc HeaderMutation: removals, then
    OVERWRITE_IF_EXISTS_OR_ADD, then APPEND_IF_EXISTS_OR_ADD."""
    out = [(n, v) for n, v in headers if n not in set(d.remove)]
    for name, value in d.overwrite:
        out = [(n, v) for n, v in out if n != name]
        out.append((name, value))
    out.extend(d.append)
    return out


def protected_pairs(headers: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
    return {(n, v) for n, v in headers if spec_protected(n)}


# Names an attacker would try: every spec name spelt with underscores, plus the dashed
# originals, plus ordinary ones.
_DASHED = [
    *sorted(SPEC_NAMES),
    "x-envoy-retry-on",
    "x-envoy-max-retries",
    "x-envoy-peer-metadata",
    "x-envoy-original-path",
    "x-forwarded-host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-user-id",
    "accept",
]
NAMES = st.sampled_from(_DASHED + [n.replace("-", "_") for n in _DASHED if "-" in n])
VALUES = st.sampled_from(["1", "5xx", "By=spiffe://cluster.local/ns/x/sa/admin", "a.example", ""])
AUTHORITIES = st.sampled_from(
    [
        "shop.example.com",
        "shop.example.com:8080",
        "SHOP.example.com.",
        "::1",
        "fe80::1:8080",
        "a.example.com:8080:9090",
        "[::1]:abc",
        "[::1]:8080",
        "other.example",
    ]
)
POLICIES = st.fixed_dictionaries(
    {},
    optional={
        "mode": st.sampled_from(["enforce", "report"]),
        "underscore_headers": st.sampled_from(["strip", "rewrite", "report", "keep"]),
        "protected_rewrite": st.sampled_from(["strip", "keep"]),
        "echoed_envoy_headers": st.sampled_from(["strip", "report", "keep"]),
        "forwarding_headers": st.sampled_from(["strip", "report", "keep"]),
        "strip_host_port": st.booleans(),
        "host_rewrites": st.just({"shop.example.com": "shop.default.svc.cluster.local:8080"}),
        "direction": st.sampled_from(["auto", "edge", "outbound", "inbound"]),
    },
)


@settings(max_examples=1500, deadline=None)
@given(
    POLICIES,
    AUTHORITIES,
    st.lists(st.tuples(NAMES, VALUES), max_size=12),
    st.sampled_from([None, 0, 1, 2]),
)
def test_protected_headers_never_gained(keys, authority, headers, listener):
    """What the upstream receives under protected names ⊆ what it would receive anyway,
    but for x-forwarded-host holding exactly the Host the client sent."""
    request = [(":authority", authority), *headers]
    decision = decide(policy_from_mapping(keys), request, listener)
    before = protected_pairs(request)
    after = protected_pairs(envoy_applies(request, decision))
    gained = after - before
    assert gained <= {("x-forwarded-host", authority)}, (gained, decision)
    if gained:
        assert any(
            a.token == "rewrite-host" or a.token == "strip-host-port" for a in decision.applied
        )


@settings(max_examples=500, deadline=None)
@given(POLICIES, st.lists(st.tuples(NAMES, VALUES), max_size=12), st.sampled_from([None, 0, 2]))
def test_no_client_can_forge_the_original_host_at_the_edge(keys, headers, listener):
    """At the edge, after a Host rewrite, the only x-forwarded-host left is the real Host."""
    keys = {**keys, "direction": "edge", "mode": "enforce"}
    keys["host_rewrites"] = {"shop.example.com": "shop.default.svc.cluster.local:8080"}
    request = [(":authority", "shop.example.com"), *headers]
    after = envoy_applies(request, decide(policy_from_mapping(keys), request, listener))
    assert [v for n, v in after if n == "x-forwarded-host"] == ["shop.example.com"]
