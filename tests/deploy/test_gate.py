"""Gated mode's conditions, as data: what reaches the server for which policy and listener."""

from __future__ import annotations

import re
from types import MappingProxyType

import pytest

from extproc.config import Action, Direction, Mode, Policy
from extproc.headers import ECHOED_ENVOY_HEADERS, FORWARDING_HEADERS, RULES
from extproc.render.gate import RESPONSE_CONDITIONS, Phase, request_gate

QUIET = Policy(
    echoed_envoy_headers=Action.KEEP,
    forwarding_headers=Action.KEEP,
    underscore_headers=Action.KEEP,
)


def present(gate) -> set[str]:
    return {c[0].header for c in gate.conditions if c[0].value == ".*" and not c[0].exact}


def authority_patterns(gate) -> list[str]:
    return [c[0].value for c in gate.conditions if c[0].header == ":authority"]


class TestRequestGate:
    def test_every_switchable_rule_is_gated_or_named(self):
        """Each policy-switched header rule is a presence test on its names or a name rule the gate reports, so a new rule cannot slip past gated mode."""
        switched = [rule for rule in RULES if rule.setting is not None]
        assert all(rule.when is None for rule in switched)
        # Defaults, plus a reveal token: the one switched rule that is off by default.
        policy = Policy(reveal_token=b"a-reveal-token-0123456789")
        for direction in (Direction.EDGE, Direction.OUTBOUND, Direction.INBOUND):
            gate = request_gate(policy, direction)
            assert not gate.every_request
            for rule in switched:
                if direction in rule.directions and rule.names is not None:
                    assert rule.names <= present(gate)

    def test_reveal_header_sent_only_with_a_token(self):
        """A request carrying x-extproc-reveal reaches the server (to be stripped and to
        show the diagnosis) only when the policy has a reveal token."""
        assert "x-extproc-reveal" not in present(request_gate(Policy(), Direction.EDGE))
        policy = Policy(reveal_token=b"a-reveal-token-0123456789")
        assert "x-extproc-reveal" in present(request_gate(policy, Direction.EDGE))

    def test_outbound_sends_echoed_headers_only(self):
        """On an outbound listener the echoed x-envoy-* headers are tested, the edge-only forwarding headers are not."""
        assert present(request_gate(Policy(), Direction.OUTBOUND)) == set(ECHOED_ENVOY_HEADERS)

    def test_edge_sends_echoed_and_forwarding_headers(self):
        """At the edge both presence rules apply."""
        expected = set(ECHOED_ENVOY_HEADERS | FORWARDING_HEADERS)
        assert present(request_gate(Policy(), Direction.EDGE)) == expected

    def test_inbound_with_defaults_sends_nothing(self):
        """An inbound request legitimately carries Istio's x-envoy headers: the defaults send none of them."""
        gate = request_gate(Policy(), Direction.INBOUND)
        assert gate.conditions == ()
        assert not gate.every_request

    def test_policy_direction_overrides_the_listener(self):
        """A policy pinned to edge gates an inbound listener like the edge."""
        gate = request_gate(Policy(direction=Direction.EDGE), Direction.INBOUND)
        assert present(gate) >= FORWARDING_HEADERS

    def test_kept_rules_send_nothing(self):
        """With every rule on keep and no Host work, no request is sent."""
        gate = request_gate(QUIET, Direction.EDGE)
        assert gate == type(gate)()

    def test_host_rewrite_keys_match_any_case_and_port(self):
        """The :authority pattern matches a rewrite key in any case, with or without a port, and nothing else."""
        policy = Policy(host_rewrites=MappingProxyType({"shop.example.com": "shop:8080"}))
        (pattern,) = authority_patterns(request_gate(policy, Direction.OUTBOUND))
        # RE2's (?i) prefix means the same as Python's here.
        compiled = re.compile(pattern)
        for authority in ("shop.example.com", "SHOP.Example.com:443", "shop.example.com."):
            assert compiled.fullmatch(authority)
        for authority in ("shopXexample.com", "a.shop.example.com", "shop.example.community"):
            assert not compiled.fullmatch(authority)

    def test_strip_host_port_matches_an_authority_with_a_port(self):
        """strip_host_port sends requests whose Host carries a port."""
        (pattern,) = authority_patterns(request_gate(Policy(strip_host_port=True), Direction.EDGE))
        assert re.fullmatch(pattern, "api.example.com:8443")
        assert not re.fullmatch(pattern, "api.example.com")

    @pytest.mark.parametrize("action", [Action.STRIP, Action.REWRITE])
    def test_changing_underscore_rule_sends_every_request(self, action):
        """An underscore rule that changes requests cannot be gated: every request goes, and the note says why."""
        gate = request_gate(Policy(underscore_headers=action), Direction.EDGE)
        assert gate.every_request
        assert "underscore_headers" in gate.note

    def test_reporting_underscore_rule_is_not_gated_but_noted(self):
        """The default underscore rule only reports, so it does not open the gate; the note says so."""
        gate = request_gate(Policy(), Direction.EDGE)
        assert not gate.every_request
        assert "only reports" in gate.note

    def test_report_mode_never_sends_every_request(self):
        """In report mode nothing changes requests, so even a stripping underscore rule stays gated."""
        policy = Policy(mode=Mode.REPORT, underscore_headers=Action.STRIP)
        assert not request_gate(policy, Direction.EDGE).every_request


class TestResponseConditions:
    def test_all_are_response_tests(self):
        """The response gate tests only response headers, which exist only after the upstream answered or Envoy failed."""
        tests = [t for _, condition in RESPONSE_CONDITIONS for t in condition]
        assert {t.phase for t in tests} == {Phase.RESPONSE}

    @pytest.mark.parametrize(
        ("headers", "sent"),
        [
            ({":status": "503"}, True),
            ({":status": "500", "x-envoy-upstream-service-time": "3"}, True),
            ({":status": "404"}, True),
            ({":status": "4040"}, False),
            ({":status": "5000"}, False),
            ({":status": "50"}, False),
            ({":status": "404", "x-envoy-upstream-service-time": "3"}, False),
            ({":status": "200", "grpc-status": "14"}, True),
            ({":status": "200", "grpc-status": "0"}, False),
            ({":status": "200"}, False),
            ({":status": "302"}, False),
        ],
    )
    def test_which_responses_are_sent(self, headers, sent):
        """Failures and Envoy's no-route 404 are sent; successes and the upstream's own 404 are not."""

        def holds(test) -> bool:
            value = headers.get(test.header)
            if value is None:
                matched = False
            elif test.exact:
                matched = value == test.value
            else:
                matched = re.fullmatch(test.value, value) is not None
            return not matched if test.absent else matched

        assert any(all(holds(t) for t in c) for _, c in RESPONSE_CONDITIONS) is sent


class TestPurity:
    def test_gate_imports_no_envoy_api(self):
        """The gate is plain data: it imports neither envoy-data-plane, protobuf nor grpc."""
        import ast
        from pathlib import Path

        import extproc.render.gate as gate

        tree = ast.parse(Path(gate.__file__).read_text(encoding="utf-8"))
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        forbidden = ("envoy", "envoy_data_plane", "google", "grpc", "betterproto2")
        assert sorted(m for m in modules if m.split(".")[0] in forbidden) == []
