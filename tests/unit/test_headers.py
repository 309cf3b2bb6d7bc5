"""Request header hygiene rules, as data in and decisions out."""

from __future__ import annotations

from types import MappingProxyType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.config import Action, Direction, policy_from_mapping
from extproc.headers import (
    ECHOED_ENVOY_HEADERS,
    FORWARDING_HEADERS,
    NO_CHANGE,
    REVEAL_HEADER,
    Applied,
    decide,
    names_first,
    native_removals,
    resolve_direction,
)

OUTBOUND, INBOUND = 2, 1


def policy(**keys: object):
    return policy_from_mapping(keys, source="test")


def tokens(decision) -> list[str]:
    return [a.token + (";report" if a.report else "") for a in decision.applied]


class TestCleanRequests:
    def test_nothing_to_do(self):
        """A request with ordinary headers gets no changes and no actions."""
        headers = [(":authority", "reviews:9080"), (":path", "/"), ("accept", "*/*")]
        decision = decide(policy(), headers, OUTBOUND)
        assert decision.applied == ()
        assert not decision.changes
        assert decision.host == "reviews:9080"

    def test_no_headers_at_all(self):
        """An empty header list is the shared NO_CHANGE decision."""
        assert decide(policy(), []) is NO_CHANGE

    def test_control_headers_an_app_sets_on_purpose_survive(self):
        """x-envoy-retry-on and friends are requests to Envoy, not echoes, and are kept."""
        headers = [
            (":authority", "a"),
            ("x-envoy-retry-on", "5xx"),
            ("x-envoy-upstream-rq-timeout-ms", "9"),
        ]
        assert decide(policy(), headers, OUTBOUND).applied == ()


class TestEchoedEnvoyHeaders:
    HEADERS = (
        (":authority", "ratings:9080"),
        ("x-envoy-attempt-count", "1"),
        ("x-envoy-peer-metadata", "ChQKDkFQUF9DT05UQUlORVJTEgIaAA=="),
        (
            "x-envoy-peer-metadata-id",
            "sidecar~10.0.0.1~productpage.default~default.svc.cluster.local",
        ),
        ("x-envoy-decorator-operation", "productpage.default.svc.cluster.local:9080/*"),
    )

    def test_stripped_on_outbound(self):
        """Echoed inbound-only x-envoy headers are removed from an app's outbound request."""
        decision = decide(policy(), self.HEADERS, OUTBOUND)
        assert set(decision.remove) == {n for n, _ in self.HEADERS[1:]}
        assert tokens(decision) == ["strip-echoed-envoy-headers"]
        assert decision.applied[0].names == tuple(n for n, _ in self.HEADERS[1:])

    def test_kept_on_inbound(self):
        """On an inbound listener these headers come from the peer sidecar and are legitimate."""
        assert decide(policy(), self.HEADERS, INBOUND).applied == ()

    def test_stripped_at_the_edge(self):
        """A client outside the mesh has no business sending peer metadata."""
        assert decide(policy(), self.HEADERS, None).remove

    def test_switch_off(self):
        """echoed_envoy_headers: keep turns the rule off."""
        assert decide(policy(echoed_envoy_headers="keep"), self.HEADERS, OUTBOUND).applied == ()

    def test_switch_report(self):
        """echoed_envoy_headers: report lists the headers without removing them."""
        decision = decide(policy(echoed_envoy_headers="report"), self.HEADERS, OUTBOUND)
        assert not decision.changes
        assert tokens(decision) == ["strip-echoed-envoy-headers;report"]

    def test_list_covers_istio_metadata_exchange(self):
        """Istio's peer identity headers are in the echo list."""
        assert {"x-envoy-peer-metadata", "x-envoy-peer-metadata-id"} <= ECHOED_ENVOY_HEADERS


class TestForwardingHeaders:
    HEADERS = (
        (":authority", "shop.example.com"),
        ("x-forwarded-host", "admin.internal"),
        ("x-real-ip", "10.0.0.1"),
        ("forwarded", "for=10.0.0.1;host=admin.internal"),
    )

    def test_stripped_at_the_edge(self):
        """Client-invented forwarding headers are removed at a gateway or front Envoy."""
        decision = decide(policy(), self.HEADERS, None)
        assert set(decision.remove) == {"x-forwarded-host", "x-real-ip", "forwarded"}
        assert tokens(decision) == ["strip-forwarding-headers"]

    @pytest.mark.parametrize("direction", [OUTBOUND, INBOUND])
    def test_kept_inside_the_mesh(self, direction):
        """Inside the mesh a gateway set them, so sidecars pass them on."""
        assert decide(policy(), self.HEADERS, direction).applied == ()

    def test_policy_direction_overrides_the_attribute(self):
        """direction: edge applies edge rules whatever the listener says."""
        assert decide(policy(direction="edge"), self.HEADERS, OUTBOUND).remove

    def test_trusted_hops_keep_them_at_the_edge(self):
        """Behind trusted proxies (trusted_hops > 0) the edge passes on what they set."""
        assert decide(policy(trusted_hops=1), self.HEADERS, None).applied == ()

    def test_trusted_hops_keep_the_proxys_original_host_on_a_rewrite(self):
        """A Host rewrite behind trusted proxies keeps their x-forwarded-host, as a sidecar does."""
        rewrite = {"shop.example.com": "shop.internal"}
        decision = decide(policy(trusted_hops=2, host_rewrites=rewrite), self.HEADERS, None)
        assert "x-forwarded-host" not in decision.remove
        assert ("x-forwarded-host", "shop.example.com") not in decision.overwrite


class TestNativeRemovals:
    """What Envoy removes itself (the guard's request side, the route), also when the
    server is down: the rules that strip fixed names where they apply, under enforce."""

    def test_edge_by_default(self):
        """At the edge: the reveal header, echoed x-envoy-* and the forwarding headers."""
        assert set(native_removals(policy(), Direction.EDGE)) == {
            REVEAL_HEADER,
            *ECHOED_ENVOY_HEADERS,
            *FORWARDING_HEADERS,
        }

    def test_outbound_and_inbound(self):
        """Outbound: the echoed x-envoy-*; inbound: only the reveal header."""
        assert set(native_removals(policy(), Direction.OUTBOUND)) == {
            REVEAL_HEADER,
            *ECHOED_ENVOY_HEADERS,
        }
        assert native_removals(policy(), Direction.INBOUND) == (REVEAL_HEADER,)

    @pytest.mark.parametrize(
        "keys",
        [
            {"mode": "report"},
            {"echoed_envoy_headers": "report", "forwarding_headers": "report"},
            {"echoed_envoy_headers": "keep", "forwarding_headers": "keep"},
            {"direction": "inbound"},
        ],
    )
    def test_only_what_the_policy_strips_there(self, keys):
        """Report mode, a rule set to report or keep, or a policy direction without the
        rules: Envoy removes nothing but the reveal header (which is never sent on)."""
        assert native_removals(policy(**keys), Direction.EDGE) == (REVEAL_HEADER,)

    def test_trusted_hops_keep_the_forwarding_headers(self):
        """Behind trusted proxies Envoy keeps the forwarding headers they set."""
        removed = set(native_removals(policy(trusted_hops=1), Direction.EDGE))
        assert removed.isdisjoint(FORWARDING_HEADERS)
        assert removed >= ECHOED_ENVOY_HEADERS


class TestUnderscoreHeaders:
    HEADERS = ((":authority", "a"), ("x_user_id", "42"), ("x-tenant", "t1"), ("x_tenant", "t2"))

    def test_reported_by_default(self):
        """The default only reports underscore names: dropping them could break an app."""
        decision = decide(policy(), self.HEADERS, OUTBOUND)
        assert not decision.changes
        assert tokens(decision) == ["strip-underscore-headers;report"]

    def test_dropped(self):
        """underscore_headers: strip removes every underscore name."""
        decision = decide(policy(underscore_headers="strip"), self.HEADERS, OUTBOUND)
        assert decision.remove == ("x_user_id", "x_tenant")
        assert decision.append == ()

    def test_rewritten(self):
        """underscore_headers: rewrite renames x_user_id to x-user-id, but never over an existing dashed header."""
        decision = decide(policy(underscore_headers="rewrite"), self.HEADERS, OUTBOUND)
        assert decision.remove == ("x_user_id", "x_tenant")
        assert decision.append == (("x-user-id", "42"),)
        assert tokens(decision) == ["rewrite-underscore-headers"]

    def test_rewrite_in_report_mode_names_the_rewrite(self):
        """mode: report keeps the rule's own verb and marks it ;report."""
        decision = decide(
            policy(mode="report", underscore_headers="rewrite"), self.HEADERS, OUTBOUND
        )
        assert tokens(decision) == ["rewrite-underscore-headers;report"]
        assert not decision.changes


class TestHostRewrite:
    REWRITES = MappingProxyType({"shop.example.com": "shop.default.svc.cluster.local:8080"})

    @pytest.mark.parametrize(
        "host", ["shop.example.com", "SHOP.Example.com:443", "shop.example.com."]
    )
    def test_rewrites_ignoring_port_and_case(self, host):
        """The Host is matched without its port, case-insensitively, and the original is kept."""
        decision = decide(
            policy(host_rewrites=dict(self.REWRITES)), [(":authority", host)], OUTBOUND
        )
        assert decision.overwrite == (
            (":authority", "shop.default.svc.cluster.local:8080"),
            ("x-forwarded-host", host),
        )
        assert decision.append == ()
        assert decision.clear_route_cache
        assert decision.host == "shop.default.svc.cluster.local:8080"
        assert tokens(decision) == ["rewrite-host"]

    def test_falls_back_to_host_header(self):
        """Without :authority, the host header is read."""
        decision = decide(policy(host_rewrites=dict(self.REWRITES)), [("host", "shop.example.com")])
        assert decision.clear_route_cache

    def test_unlisted_host_untouched(self):
        """A Host not in the map is left alone."""
        decision = decide(
            policy(host_rewrites=dict(self.REWRITES)), [(":authority", "other.example.com")]
        )
        assert decision.applied == ()

    def test_report_mode_changes_nothing(self):
        """mode: report annotates the rewrite and neither changes the Host nor clears the route cache."""
        p = policy(mode="report", host_rewrites=dict(self.REWRITES))
        decision = decide(p, [(":authority", "shop.example.com")], OUTBOUND)
        assert not decision.changes
        assert not decision.clear_route_cache
        assert decision.host == "shop.example.com"
        assert tokens(decision) == ["rewrite-host;report"]

    def test_forwarded_host_replaced_when_edge_strips_it(self):
        """At the edge the client's x-forwarded-host goes and the real original Host takes its place."""
        headers = [(":authority", "shop.example.com"), ("x-forwarded-host", "evil.example")]
        decision = decide(policy(host_rewrites=dict(self.REWRITES)), headers, None)
        assert "x-forwarded-host" not in decision.remove
        assert ("x-forwarded-host", "shop.example.com") in decision.overwrite
        assert decision.append == ()

    def test_client_forwarded_host_overwritten_at_the_edge_even_if_kept(self):
        """forwarding_headers: keep leaves a client's x-forwarded-host, but a rewrite states the
        real original Host in its place: frameworks read the first value, never a forged one."""
        headers = [(":authority", "shop.example.com"), ("x-forwarded-host", "evil.example")]
        p = policy(host_rewrites=dict(self.REWRITES), forwarding_headers="keep")
        decision = decide(p, headers, None)
        assert ("x-forwarded-host", "shop.example.com") in decision.overwrite
        assert decision.append == ()

    def test_sidecar_keeps_an_earlier_proxys_forwarded_host(self):
        """Inside the mesh an x-forwarded-host was set by an earlier proxy: it names the
        original Host better than this hop can, so it is neither overwritten nor appended to."""
        headers = [(":authority", "shop.example.com"), ("x-forwarded-host", "shop.example.com:443")]
        decision = decide(policy(host_rewrites=dict(self.REWRITES)), headers, OUTBOUND)
        assert ":authority" in dict(decision.overwrite)
        assert "x-forwarded-host" not in dict(decision.overwrite)
        assert "x-forwarded-host" not in dict(decision.append)
        assert "x-forwarded-host" not in decision.remove

    @pytest.mark.parametrize(
        "host", ["::1", "fe80::1:8080", "a.example.com:8080:9090", "[::1]:abc", "a b", "[::1"]
    )
    def test_hostile_host_left_alone_and_reported(self, host):
        """A Host that is not an RFC 3986 authority is never cut into a new :authority."""
        p = policy(strip_host_port=True, host_rewrites={"a.example.com": "b.example.com"})
        decision = decide(p, [(":authority", host)], OUTBOUND)
        assert not decision.changes
        assert not decision.clear_route_cache
        assert decision.host == host
        assert tokens(decision) == ["invalid-host;report"]

    def test_host_not_parsed_without_host_rules(self):
        """No host_rewrites and no strip_host_port: the Host is only recorded, not judged."""
        decision = decide(policy(), [(":authority", "::1")], OUTBOUND)
        assert decision.applied == ()
        assert decision.host == "::1"

    def test_strip_host_port(self):
        """strip_host_port removes a port that keeps the Host from matching a virtual host."""
        decision = decide(policy(strip_host_port=True), [(":authority", "app.example.com:8443")])
        assert decision.overwrite[0] == (":authority", "app.example.com")
        assert tokens(decision) == ["strip-host-port"]

    def test_strip_host_port_off_by_default(self):
        """By default a Host with a port is left alone."""
        assert decide(policy(), [(":authority", "app.example.com:8443")]).applied == ()

    def test_rewrite_to_the_same_authority_is_no_action(self):
        """A rewrite target equal to the Host is not a change."""
        p = policy(host_rewrites={"a.example": "a.example"})
        assert decide(p, [(":authority", "a.example")]).applied == ()


class TestDefensiveRules:
    def test_te_other_than_trailers(self):
        """A TE other than trailers is connection-specific and goes (RFC 9113 §8.2.2)."""
        decision = decide(policy(), [(":authority", "a"), ("te", "gzip")])
        assert decision.remove == ("te",)
        assert tokens(decision) == ["strip-hop-by-hop-headers"]

    def test_te_trailers_kept(self):
        """TE: trailers is what gRPC sends and stays."""
        assert decide(policy(), [(":authority", "a"), ("te", "trailers")]).applied == ()

    @pytest.mark.parametrize("name", ["keep-alive", "proxy-connection"])
    def test_hop_by_hop(self, name):
        """Hop-by-hop headers that Envoy would normally remove are removed if they get here."""
        assert decide(policy(), [(":authority", "a"), (name, "x")]).remove == (name,)

    def test_content_length_with_transfer_encoding(self):
        """With both, Content-Length goes and Transfer-Encoding wins (RFC 9112 §6.3)."""
        headers = [(":authority", "a"), ("content-length", "5"), ("transfer-encoding", "chunked")]
        assert decide(policy(), headers).remove == ("content-length",)

    def test_content_length_alone(self):
        """Content-Length on its own is fine."""
        assert decide(policy(), [(":authority", "a"), ("content-length", "5")]).applied == ()

    def test_report_mode_reports_defensive_rules(self):
        """mode: report turns even the always-on rules into reports."""
        decision = decide(policy(mode="report"), [(":authority", "a"), ("te", "gzip")])
        assert tokens(decision) == ["strip-hop-by-hop-headers;report"]
        assert not decision.changes


class TestDirection:
    @pytest.mark.parametrize(
        ("attribute", "expected"),
        [
            (None, Direction.EDGE),
            (0, Direction.EDGE),
            (1, Direction.INBOUND),
            (2, Direction.OUTBOUND),
        ],
    )
    def test_from_listener_attribute(self, attribute, expected):
        """Envoy's TrafficDirection maps to the rules' direction; unset means edge."""
        assert resolve_direction(policy(), attribute) is expected

    def test_policy_wins(self):
        """An explicit direction ignores the attribute."""
        assert resolve_direction(policy(direction="inbound"), 2) is Direction.INBOUND

    def test_declared_beats_listener(self):
        """What the rendered filter declares wins over the listener: an Istio gateway
        listener is OUTBOUND, yet the gateway is the edge."""
        assert resolve_direction(policy(), 2, Direction.EDGE) is Direction.EDGE

    def test_policy_beats_declared(self):
        """The policy's direction overrides both."""
        p = policy(direction="inbound")
        assert resolve_direction(p, 2, Direction.EDGE) is Direction.INBOUND


class TestProtectedRewrite:
    """underscore_headers: rewrite never creates a header the mesh trusts (threat T1)."""

    REWRITE = MappingProxyType({"underscore_headers": "rewrite"})

    @pytest.mark.parametrize(
        "name",
        [
            "x_forwarded_client_cert",
            "x_envoy_retry_on",
            "x_envoy_max_retries",
            "x_real_ip",
            "x_envoy_peer_metadata",
            "x_envoy_original_path",
            "x_forwarded_host",
            "x_request_id",
            "transfer_encoding",
            "content_length",
            "proxy_connection",
            "x_extproc_diagnosis",
        ],
    )
    def test_trusted_name_is_never_created(self, name):
        """The issue's attack list: the dashed name is free, yet it is not created."""
        decision = decide(policy(**self.REWRITE), [(":authority", "a"), (name, "forged")], OUTBOUND)
        dashed = name.replace("_", "-")
        assert dashed not in dict(decision.overwrite)
        assert dashed not in dict(decision.append)
        assert name in decision.remove  # protected_rewrite: strip (the default)
        assert "refuse-protected-rewrite;report" in tokens(decision)

    def test_keep_passes_the_underscore_header_on(self):
        """protected_rewrite: keep sends it on under its own name, still reported."""
        p = policy(protected_rewrite="keep", **self.REWRITE)
        decision = decide(p, [("x_real_ip", "10.0.0.1")], OUTBOUND)
        assert not decision.changes
        assert tokens(decision) == ["refuse-protected-rewrite;report"]

    def test_ordinary_names_still_renamed(self):
        """Only trusted targets are refused; the others are renamed as before."""
        headers = [("x_user_id", "42"), ("x_real_ip", "1.2.3.4")]
        decision = decide(policy(**self.REWRITE), headers, INBOUND)
        assert decision.append == (("x-user-id", "42"),)
        assert set(decision.remove) == {"x_user_id", "x_real_ip"}
        assert tokens(decision) == [
            "rewrite-underscore-headers",
            "refuse-protected-rewrite;report",
            "strip-underscore-headers",
        ]

    def test_policy_strip_rules_protect_their_names(self):
        """A name the policy's own strip rules remove is protected, whatever its spelling."""
        from extproc import headers as h

        name = next(iter(h.ECHOED_ENVOY_HEADERS))
        assert h.is_protected(name, frozenset())
        assert h.is_protected("x-user-id", frozenset({"x-user-id"}))
        assert not h.is_protected("x-user-id", frozenset())


class TestArbitraryInput:
    @given(
        st.lists(
            st.tuples(st.text(min_size=1, max_size=30), st.text(max_size=60)),
            max_size=40,
        ),
        st.sampled_from([None, 0, 1, 2, 99]),
        st.sampled_from(list(Action.__members__.values())),
    )
    def test_never_crashes_and_removes_only_what_it_saw(self, headers, direction, underscore):
        """Whatever the headers, decide returns, and only removes names that were present."""
        p = policy(underscore_headers=str(underscore), strip_host_port=True)
        decision = decide(p, headers, direction)
        assert set(decision.remove) <= {n for n, _ in headers}
        assert all(isinstance(a, Applied) for a in decision.applied)


class TestNamesFirst:
    """`names_first` lets an adapter answer a clean request from its header names alone."""

    NAMES = st.sampled_from(
        [":authority", "host", ":path", "accept", "cookie", "te", "keep-alive", "content-length",
         "transfer-encoding", "x-envoy-attempt-count", "x-forwarded-host", "x-forwarded-prefix",
         "x_user_id", REVEAL_HEADER, "x-request-id", "forwarded", "x-real-ip"]
    )  # fmt: skip

    @given(
        st.lists(st.tuples(NAMES, st.sampled_from(["", "a", "trailers", "shop:8080", "x"]))),
        st.sampled_from([None, 0, 1, 2]),
        st.sampled_from([None, *[d for d in Direction if d is not Direction.AUTO]]),
        st.sampled_from([{}, {"strip_host_port": True}, {"underscore_headers": "keep"},
                         {"mode": "report"}, {"forwarding_headers": "keep"},
                         {"direction": "inbound"}, {"trusted_hops": 1}]),
    )  # fmt: skip
    def test_untouched_requests_are_left_alone_by_decide_wherever_it_sits(
        self, headers, listener, declared, keys
    ):
        """Whenever the names-first test says so, decide changes nothing in any direction."""
        p = policy(**keys)
        if names_first(p).untouched([n for n, _ in headers]):
            decision = decide(p, headers, listener, declared)
            assert decision.applied == () and not decision.changes

    def test_a_clean_request_is_untouched(self):
        """A request with only everyday header names needs no value read."""
        names = [":authority", ":path", ":method", "accept", "user-agent", "x-request-id",
                 "x-forwarded-proto", "x-forwarded-for"]  # fmt: skip
        assert names_first(policy()).untouched(names)

    @pytest.mark.parametrize(
        "name", ["keep-alive", "x_user_id", "x-envoy-original-path", "x-forwarded-prefix"]
    )
    def test_a_name_some_rule_looks_at_somewhere_is_not(self, name):
        """A rule's name in any direction (the edge's x-forwarded-prefix too), or any name
        with `_`, sends the request to decide."""
        assert not names_first(policy()).untouched([":authority", name])

    def test_a_host_rewrite_reads_every_request(self):
        """With a Host rewrite configured, no request is answered from its names."""
        assert not names_first(policy(strip_host_port=True)).untouched([":authority"])
