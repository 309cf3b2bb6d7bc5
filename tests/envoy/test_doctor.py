"""The real server in a real Envoy's path: every lab scenario diagnosed, annotated and logged."""

from __future__ import annotations

import pytest

from extproc.diagnosis import HINTS
from extproc.lab import HYGIENE_SCENARIOS, SCENARIOS, Lab, Scenario
from extproc.lab.demo import run_scenario

pytestmark = pytest.mark.envoy


@pytest.mark.parametrize("scenario", SCENARIOS + HYGIENE_SCENARIOS, ids=lambda s: s.name)
def test_scenario_outcome(demo_lab: Lab, scenario: Scenario) -> None:
    """Each request gets the expected reason and actions, and clean ones no diagnosis at all."""
    outcome = run_scenario(demo_lab, scenario)
    assert outcome.reason == scenario.expected_reason
    assert outcome.actions == scenario.expected_actions
    if scenario.expected_status is not None:
        assert outcome.response.status == scenario.expected_status
    if scenario.expected_reason is None:
        assert outcome.response.header("x-extproc-diagnosis") is None
        assert outcome.response.header("x-extproc-hint") is None


@pytest.mark.parametrize(
    "scenario", [s for s in SCENARIOS if s.expected_reason], ids=lambda s: s.name
)
def test_hint_and_access_log(demo_lab: Lab, scenario: Scenario) -> None:
    """The hint header and the dynamic metadata in Envoy's access log carry the same diagnosis."""
    response = run_scenario(demo_lab, scenario).response
    assert response.header("x-extproc-hint") == HINTS[scenario.expected_reason]
    request_id = response.header("x-request-id")
    assert request_id is not None
    entry = demo_lab.access_log_entry(request_id)
    metadata = entry["extproc_doctor"]
    assert metadata["reason"] == scenario.expected_reason
    assert metadata["hint"] == HINTS[scenario.expected_reason]
    assert entry["extproc_diagnosis"] == response.header("x-extproc-diagnosis")


def test_mtls_diagnosis_names_the_destination_rule(demo_lab: Lab) -> None:
    """The diagnosis of the plaintext-to-STRICT case names the DestinationRule from the cluster metadata."""
    scenario = next(s for s in SCENARIOS if s.name == "requires_mtls")
    diagnosis = run_scenario(demo_lab, scenario).response.header("x-extproc-diagnosis")
    assert diagnosis is not None
    assert 'cluster="mtls_plaintext"' in diagnosis
    assert 'dr="default/mtls-disable"' in diagnosis


def test_host_not_in_mesh_names_host_and_passthrough_route(demo_lab: Lab) -> None:
    """The evidence names the Host that matched nothing and the passthrough route it took."""
    scenario = next(s for s in SCENARIOS if s.name == "host_not_in_mesh")
    diagnosis = run_scenario(demo_lab, scenario).response.header("x-extproc-diagnosis")
    assert diagnosis is not None
    assert 'host="shop.example.com"' in diagnosis
    assert 'route="allow_any"' in diagnosis
    assert 'cluster="PassthroughCluster"' in diagnosis
