"""The real server in the mesh lab's path: every scenario diagnosed, annotated and logged."""

from __future__ import annotations

import io
import json
import re

import pytest

from extproc.accesslog import parse_access_log_line
from extproc.diagnosis import HINTS, TLS_CLOSED_HINT, classify
from extproc.lab import ALL_SCENARIOS, BackgroundServer, Lab, Scenario, find_scenarios
from extproc.lab.demo import run_demo, run_scenario

pytestmark = pytest.mark.envoy

Doctor = tuple[Lab, BackgroundServer]
FAILING = [s for s in ALL_SCENARIOS if s.expected_reason]
NEEDS_CONTEXT = [s for s in ALL_SCENARIOS if s.offline_reason]
HANDSHAKE_RESETS = [s for s in NEEDS_CONTEXT if s.offline_reason == "tls_handshake_rejected"]


def ids(scenario: Scenario) -> str:
    return f"{scenario.label}-{scenario.name}" if scenario.incident else scenario.name


class TestScenarios:
    @pytest.mark.parametrize("scenario", ALL_SCENARIOS, ids=ids)
    def test_outcome(self, doctor: Doctor, scenario: Scenario) -> None:
        """Each request gets the expected reason, status and actions, and clean ones no diagnosis at all."""
        outcome = run_scenario(doctor[0], scenario, doctor[1])
        assert outcome.reason == scenario.expected_reason
        assert outcome.actions == scenario.expected_actions
        if scenario.expected_status is not None:
            assert outcome.response.status == scenario.expected_status
        if scenario.expected_reason is None:
            assert outcome.response.header("x-extproc-diagnosis") is None
            assert outcome.response.header("x-extproc-hint") is None

    @pytest.mark.parametrize("scenario", FAILING, ids=ids)
    def test_hint_evidence_and_access_log(self, doctor: Doctor, scenario: Scenario) -> None:
        """The hint, the evidence and the dynamic metadata in the client sidecar's access log agree."""
        lab, server = doctor
        response = run_scenario(lab, scenario, server).response
        diagnosis = response.header("x-extproc-diagnosis") or ""
        assert response.header("x-extproc-hint") == scenario.expected_hint
        for parameter in scenario.evidence:
            assert f";{parameter}" in diagnosis
        request_id = response.header("x-request-id")
        assert request_id is not None
        entry = lab.access_log_entry(request_id)
        assert entry["extproc_doctor"]["reason"] == scenario.expected_reason
        assert entry["extproc_doctor"]["hint"] == scenario.expected_hint
        assert entry["extproc_diagnosis"] == diagnosis
        # Offline and live agree: `extproc diagnose` reads the doctor's own diagnosis.
        offline = classify(parse_access_log_line(json.dumps(entry)))
        assert offline is not None
        assert (offline.reason, offline.hint) == (scenario.expected_reason, scenario.expected_hint)

    def test_refused_is_never_an_mtls_reason(self, doctor: Doctor) -> None:
        """A refused port behind an mTLS cluster is diagnosed by the refusal, not by TLS."""
        scenario = next(s for s in ALL_SCENARIOS if s.name == "refused")
        diagnosis = run_scenario(doctor[0], scenario).response.header("x-extproc-diagnosis")
        assert diagnosis is not None
        assert diagnosis.startswith("upstream_refused;")
        assert 'detail="delayed connect error: Connection refused"' in diagnosis


class TestWithoutEnvoyAdmin:
    @pytest.mark.parametrize("scenario", NEEDS_CONTEXT, ids=ids)
    def test_reason_without_cluster_context(self, blind_doctor: Doctor, scenario: Scenario) -> None:
        """Without the cluster's TLS settings, the reason and hint are the ones that cover every cause."""
        outcome = run_scenario(blind_doctor[0], scenario)
        assert outcome.reason == scenario.offline_reason
        assert outcome.response.header("x-extproc-hint") == scenario.hint_without_context

    @pytest.mark.parametrize("scenario", HANDSHAKE_RESETS, ids=ids)
    def test_handshake_failure_names_the_candidate_causes(
        self, blind_doctor: Doctor, scenario: Scenario
    ) -> None:
        """An SNI or ALPN reset, or a refused ClientHello, gets a hint naming SNI and ALPN both."""
        hint = run_scenario(blind_doctor[0], scenario).response.header("x-extproc-hint") or ""
        assert "SNI" in hint
        assert "ALPN" in hint

    def test_keepalive_race_on_tls_is_known_without_admin(self, blind_doctor: Doctor) -> None:
        """Without --envoy-admin, Envoy's upstream.tls_version proves the closed connection was
        TLS: the keep-alive race, never the plaintext/STRICT mismatch."""
        scenario = next(s for s in ALL_SCENARIOS if s.name == "keepalive_race")
        outcome = run_scenario(blind_doctor[0], scenario)
        assert outcome.reason == "upstream_connection_closed"
        assert outcome.response.header("x-extproc-hint") == TLS_CLOSED_HINT
        assert 'tls="on"' in (outcome.response.header("x-extproc-diagnosis") or "")

    def test_plaintext_close_without_admin_names_both_causes(self, blind_doctor: Doctor) -> None:
        """A closed plaintext connection, transport unknown: the hint names mTLS and keep-alive."""
        scenario = next(s for s in ALL_SCENARIOS if s.name == "requires_mtls")
        outcome = run_scenario(blind_doctor[0], scenario)
        hint = outcome.response.header("x-extproc-hint") or ""
        assert outcome.reason == "upstream_connection_closed"
        assert hint == HINTS["upstream_connection_closed"]
        assert "mTLS" in hint and "keep-alive" in hint


class TestEvidenceNamesTheRetries:
    @pytest.mark.parametrize(
        ("name", "flag"),
        [("retries_exhausted", "URX"), ("retry_overflow", "UO"), ("grpc_unavailable", "URX")],
    )
    def test_app_error_after_retries(self, doctor: Doctor, name: str, flag: str) -> None:
        """The upstream's own error, retried by the route, is the app's: the retry flag is in the evidence."""
        scenario = next(s for s in ALL_SCENARIOS if s.name == name)
        diagnosis = run_scenario(doctor[0], scenario, doctor[1]).response.header(
            "x-extproc-diagnosis"
        )
        assert diagnosis is not None
        assert diagnosis.startswith("upstream_app_error;")
        assert f';flags="{flag}"' in diagnosis
        assert 'detail="via_upstream"' in diagnosis


class TestDemo:
    def test_one_incident(self):
        """`extproc demo --scenario 5 --once` runs that incident alone, prints its row and exits 0."""
        out = io.StringIO()
        assert run_demo(scenarios=find_scenarios("5"), stay=False, out=out) == 0
        table = out.getvalue()
        assert "search.default.svc.cluster.local/" in table
        assert "alpn_mismatch" in table
        assert 'alpn="istio-http/1.1"' in table

    def test_live_page_beside_the_demo(self):
        """With a page address the demo serves the live page and prints its URL."""
        out = io.StringIO()
        code = run_demo(scenarios=find_scenarios("5"), stay=False, out=out, ui_listen="127.0.0.1:0")
        assert code == 0
        line = next(x for x in out.getvalue().splitlines() if x.startswith("The live page"))
        assert re.search(r"http://127\.0\.0\.1:[1-9][0-9]*/$", line)

    def test_table_says_what_a_cluster_gets(self):
        """The demo shows, beside its own reason, the one the rendered deployment (no admin) gives."""
        out = io.StringIO()
        assert run_demo(scenarios=find_scenarios("5"), stay=False, out=out) == 0
        header, _, row = out.getvalue().splitlines()[:3]
        assert "on a cluster" in header
        assert "alpn_mismatch" in row and "tls_handshake_rejected *" in row
        assert "--envoy-admin" in out.getvalue()
