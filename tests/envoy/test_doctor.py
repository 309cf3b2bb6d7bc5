"""The real server in the mesh lab's path: every scenario diagnosed, annotated and logged."""

from __future__ import annotations

import io

import pytest

from extproc.diagnosis import HINTS
from extproc.lab import SCENARIOS, BackgroundServer, Lab, Scenario, find_scenarios
from extproc.lab.demo import run_demo, run_scenario

pytestmark = pytest.mark.envoy

Doctor = tuple[Lab, BackgroundServer]
FAILING = [s for s in SCENARIOS if s.expected_reason]
NEEDS_CONTEXT = [s for s in SCENARIOS if s.offline_reason]


def ids(scenario: Scenario) -> str:
    return f"{scenario.label}-{scenario.name}" if scenario.incident else scenario.name


class TestScenarios:
    @pytest.mark.parametrize("scenario", SCENARIOS, ids=ids)
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

    def test_refused_is_never_an_mtls_reason(self, doctor: Doctor) -> None:
        """A refused port behind an mTLS cluster is diagnosed by the refusal, not by TLS."""
        scenario = next(s for s in SCENARIOS if s.name == "refused")
        diagnosis = run_scenario(doctor[0], scenario).response.header("x-extproc-diagnosis")
        assert diagnosis is not None
        assert diagnosis.startswith("upstream_refused;")
        assert 'detail="delayed connect error: Connection refused"' in diagnosis


class TestWithoutEnvoyAdmin:
    @pytest.mark.parametrize("scenario", NEEDS_CONTEXT, ids=ids)
    def test_handshake_reset_names_both_causes(
        self, blind_doctor: Doctor, scenario: Scenario
    ) -> None:
        """Without the cluster's TLS settings, an SNI or ALPN reset gets the reason whose hint names both."""
        response = run_scenario(blind_doctor[0], scenario).response
        assert (response.header("x-extproc-diagnosis") or "").startswith("tls_handshake_rejected;")
        hint = response.header("x-extproc-hint")
        assert hint == HINTS["tls_handshake_rejected"]
        assert "SNI" in hint
        assert "ALPN" in hint


class TestDemo:
    def test_one_incident(self):
        """`extproc demo --scenario 5 --once` runs that incident alone, prints its row and exits 0."""
        out = io.StringIO()
        assert run_demo(scenarios=find_scenarios("5"), stay=False, out=out) == 0
        table = out.getvalue()
        assert "search.default.svc.cluster.local/" in table
        assert "alpn_mismatch" in table
        assert 'alpn="istio-http/1.1"' in table
