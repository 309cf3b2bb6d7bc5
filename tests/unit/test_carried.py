"""Threat T16: what the HTTP lane's response phase trusts from our metadata namespace.

Over HTTP the request and response phases are separate POSTs; the request phase's
actions, Host and direction come back in `metadata_context` (forwarded by Envoy from our
`extproc_doctor` namespace). Only Envoy filters write dynamic metadata, but the server
still treats the values as input: wrong types, header-unsafe text and unknown
directions are dropped, never written into a response header.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.config import Direction, policy_from_mapping
from extproc.core import NOTHING_CARRIED, carried_from, on_request, response_phase


def test_round_trip_of_what_the_request_phase_wrote():
    """What on_request writes is read back whole by the response phase."""
    policy = policy_from_mapping({"host_rewrites": {"shop.example.com": "shop.internal"}})
    outcome = on_request(policy, [(":authority", "shop.example.com")], declared=Direction.EDGE)
    assert outcome.answer is not None and outcome.answer.metadata is not None
    carried = carried_from(dict(outcome.answer.metadata))
    assert carried == outcome.carried
    assert carried.direction is Direction.EDGE
    assert carried.actions.startswith("rewrite-host")


@pytest.mark.parametrize(
    "fields",
    [
        {"actions": "rewrite-host\r\nset-cookie: a=b"},
        {"actions": "x" * 5000},
        {"actions": "réécrit"},
        {"actions": 42},
        {"actions": ["rewrite-host"]},
    ],
)
def test_unsafe_actions_never_reach_a_header(fields):
    """CR/LF, non-ASCII, oversize or non-string actions are dropped."""
    assert carried_from(fields).actions == ""


@pytest.mark.parametrize("direction", ["sideways", "EDGE", 2, None, ""])
def test_unknown_direction_is_not_trusted(direction):
    assert carried_from({"direction": direction}).direction is None


def test_nothing_carried():
    assert carried_from(None) is NOTHING_CARRIED
    assert carried_from({}) is NOTHING_CARRIED


@given(
    st.dictionaries(
        st.sampled_from(["actions", "request_host", "direction", "other"]),
        st.one_of(st.text(max_size=3000), st.integers(), st.none(), st.booleans(), st.floats()),
    )
)
def test_any_metadata_gives_header_safe_actions(fields):
    """Whatever the namespace holds, the carried actions are printable ASCII or empty."""
    actions = carried_from(fields).actions
    assert actions == "" or (actions.isascii() and actions.isprintable())


class TestDiagnosedOnce:
    """Gated mode: the response filter's diagnosis in our namespace keeps the hygiene
    filter from making a second one (issue 19 item 5)."""

    def test_a_reason_in_the_namespace_marks_the_response_diagnosed(self):
        """`reason` forwarded back means another doctor filter diagnosed the response."""
        assert carried_from({"reason": "upstream_refused"}).diagnosed
        assert not carried_from({"actions": "strip-echoed-envoy-headers"}).diagnosed

    def test_diagnosed_response_gets_the_actions_only(self):
        """No second diagnosis, nothing removed as forged, the actions still written."""
        policy = policy_from_mapping({"response_annotations": "on"})
        carried = carried_from(
            {"actions": "strip-echoed-envoy-headers", "reason": "upstream_refused"}
        )
        signs = {":status": b"503", "x-extproc-diagnosis": b"upstream_refused"}
        outcome = response_phase(policy, signs, None, carried)
        assert outcome is not None and outcome.answer is not None
        assert outcome.diagnosis is None
        assert outcome.answer.overwrite == (("x-extproc-actions", "strip-echoed-envoy-headers"),)
        assert outcome.answer.remove == ()
        assert outcome.answer.metadata is None

    def test_diagnosed_response_without_actions_is_left_alone(self):
        """Nothing to add: the continue."""
        carried = carried_from({"reason": "upstream_refused"})
        assert response_phase(policy_from_mapping({}), {":status": b"503"}, None, carried) is None
