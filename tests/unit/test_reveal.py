"""Threat T18: the operator's reveal token shows annotations at the edge to its holder only.

`reveal_token_file` names a file with a secret; a request whose `x-extproc-reveal`
header carries it gets the x-extproc-* headers where the policy hides them. The header
never reaches the upstream (also in `mode: report`), the comparison is constant-time,
and the secret is in no log, annotation, metadata or repr.
"""

from __future__ import annotations

import pytest

from extproc.config import Direction, PolicyError, load_policy, policy_from_mapping
from extproc.core import Carried, Throttle, carried_from, on_request, on_response
from extproc.diagnosis import Evidence

TOKEN = "s3cr3t-reveal-token-0123456789"
REFUSED = Evidence(
    status=503,
    flags=32,
    code_details="upstream_reset_before_response_started{remote_connection_failure}",
    transport_failure_reason="delayed connect error: Connection refused",
    cluster="outbound|9080||reviews.default.svc.cluster.local",
    has_attributes=True,
)


@pytest.fixture
def policy(tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    path = tmp_path / "policy.yaml"
    path.write_text("reveal_token_file: token\n")  # relative to the policy file
    return load_policy(path)


def request(*extra):
    return [(":authority", "shop.example.com"), (":path", "/"), *extra]


def respond(policy, carried):
    return on_response(policy, REFUSED, (), carried, declared=Direction.EDGE)


class TestRevealAtTheEdge:
    def test_right_token_shows_the_diagnosis_and_never_goes_upstream(self, policy):
        outcome = on_request(policy, request(("x-extproc-reveal", TOKEN)), declared=Direction.EDGE)
        assert outcome.answer is not None
        assert "x-extproc-reveal" in outcome.answer.remove
        assert outcome.carried.reveal
        answer = respond(policy, outcome.carried).answer
        headers = dict(answer.overwrite)
        assert headers["x-extproc-diagnosis"].startswith("upstream_refused;")
        assert 'strip-reveal-header;headers="x-extproc-reveal"' in headers["x-extproc-actions"]

    @pytest.mark.parametrize(
        "value", ["", "wrong", TOKEN[:-1], TOKEN + "x", TOKEN.upper(), f" {TOKEN}"]
    )
    def test_wrong_token_shows_nothing_and_still_goes_nowhere(self, policy, value):
        outcome = on_request(policy, request(("x-extproc-reveal", value)), declared=Direction.EDGE)
        assert outcome.answer is not None and "x-extproc-reveal" in outcome.answer.remove
        assert not outcome.carried.reveal
        answer = respond(policy, outcome.carried).answer
        assert not any(name.startswith("x-extproc-") for name, _ in answer.overwrite)

    def test_stripped_in_report_mode_too(self, tmp_path):
        (tmp_path / "t").write_text(TOKEN)
        p = policy_from_mapping({"mode": "report", "reveal_token_file": str(tmp_path / "t")})
        outcome = on_request(p, request(("x-extproc-reveal", TOKEN)), declared=Direction.EDGE)
        assert outcome.answer is not None and "x-extproc-reveal" in outcome.answer.remove

    def test_without_a_token_the_header_is_just_a_header(self):
        outcome = on_request(
            policy_from_mapping({}), request(("x-extproc-reveal", TOKEN)), declared=Direction.EDGE
        )
        assert outcome.answer is None
        assert not outcome.carried.reveal

    def test_carried_over_the_http_lane(self, policy):
        """The request phase writes reveal=1 in our namespace; the response phase reads it."""
        outcome = on_request(policy, request(("x-extproc-reveal", TOKEN)), declared=Direction.EDGE)
        metadata = dict(outcome.answer.metadata)
        assert metadata["reveal"] == 1
        assert carried_from({**metadata, "reveal": 1.0}).reveal  # a Struct number
        assert not carried_from({**metadata, "reveal": True}).reveal
        assert not carried_from({**metadata, "reveal": "1"}).reveal

    def test_the_secret_is_nowhere_it_could_be_read(self, policy):
        outcome = on_request(policy, request(("x-extproc-reveal", TOKEN)), declared=Direction.EDGE)
        answer = respond(policy, Carried(outcome.carried.actions, "", Direction.EDGE, True)).answer
        visible = repr((outcome, answer, policy))
        assert TOKEN not in visible


class TestRefusedTokens:
    def test_counted_and_on_record(self, policy):
        """A wrong token is an action (reported), so extproc_actions_total counts it."""
        from extproc.metrics import Metrics

        metrics = Metrics()
        outcome = on_request(
            policy, request(("x-extproc-reveal", "guess")), declared=Direction.EDGE
        )
        metrics.count_request(outcome.decision.applied)
        assert "refuse-reveal-token" in [a.token for a in outcome.decision.applied]
        value = metrics.registry.get_sample_value(
            "extproc_actions_total", {"action": "refuse-reveal-token", "report": "true"}
        )
        assert value == 1

    def test_right_token_is_not_refused(self, policy):
        outcome = on_request(policy, request(("x-extproc-reveal", TOKEN)), declared=Direction.EDGE)
        assert "refuse-reveal-token" not in [a.token for a in outcome.decision.applied]

    def test_log_lines_limited_and_never_quote_the_guess(self, policy, monkeypatch):
        """Many wrong tokens in one interval make one log line; the next interval's line
        says how many were held back. No line holds what was sent."""
        from structlog.testing import capture_logs

        from extproc import core

        now = [100.0]
        monkeypatch.setattr(core, "REFUSED_REVEAL_LOG", core.Throttle(10.0, lambda: now[0]))
        with capture_logs() as logs:
            for i in range(50):
                on_request(
                    policy, request(("x-extproc-reveal", f"guess-{i}")), declared=Direction.EDGE
                )
            now[0] += 10.0
            on_request(policy, request(("x-extproc-reveal", "guess-last")), declared=Direction.EDGE)
        lines = [e for e in logs if e["event"] == "reveal_token_refused"]
        assert [e["held_back"] for e in lines] == [0, 49]
        assert "guess" not in repr(lines)


class TestThrottle:
    def test_admits_one_per_interval_and_counts_the_rest(self):
        now = [0.0]
        throttle = Throttle(5.0, lambda: now[0])
        assert [throttle.admit() for _ in range(4)] == [0, None, None, None]
        now[0] = 4.9
        assert throttle.admit() is None
        now[0] = 5.0
        assert throttle.admit() == 4
        assert throttle.admit() is None


class TestTokenFile:
    @pytest.mark.parametrize(
        ("content", "problem"),
        [
            ("tiny-secret", "shorter than 16 bytes"),
            ("has a space in the token", "visible ASCII"),
            ("tökén-tökén-tökén-tökén", "visible ASCII"),
            ("x" * 5000, "larger than 4096 bytes"),  # a wrong mount, not a token
        ],
    )
    def test_bad_token_refused_without_quoting_it(self, tmp_path, content, problem):
        (tmp_path / "t").write_text(content)
        path = tmp_path / "p.yaml"
        path.write_text(f"reveal_token_file: {tmp_path / 't'}\n")
        with pytest.raises(PolicyError) as err:
            load_policy(path)
        assert f"{path}:1: reveal_token_file:" in str(err.value)
        assert problem in str(err.value)
        assert content not in str(err.value)

    def test_missing_file_named(self, tmp_path):
        path = tmp_path / "p.yaml"
        path.write_text("reveal_token_file: /nonexistent/token\n")
        with pytest.raises(PolicyError, match="cannot read /nonexistent/token"):
            load_policy(path)


def test_render_needs_the_token_file_not(tmp_path):
    """`extproc render --config` reads the policy's shape only: the token file lives in the
    pod, yet the gate still sends x-extproc-reveal to the server."""
    from extproc.config import Action
    from extproc.render.gate import request_gate

    path = tmp_path / "p.yaml"
    path.write_text("reveal_token_file: /etc/extproc-doctor/reveal/token\n")
    policy = load_policy(path, read_secrets=False)
    assert policy.reveal_token == b""
    assert policy.reveal_header is Action.STRIP
    gate = request_gate(policy, Direction.EDGE)
    assert any(t.header == "x-extproc-reveal" for c in gate.conditions for t in c)
