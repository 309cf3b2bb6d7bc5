"""Request hygiene through a real Envoy, proven by what the echo upstream received.

The first test uses the recording server, which changes nothing, so it shows what Envoy
1.40 itself removes before any filter runs and what it lets through to the ext_proc
server: docs/requests.md ("What it does to requests") states exactly this.
"""

from __future__ import annotations

import json
import uuid

import pytest

from extproc.config import policy_from_mapping
from extproc.lab import Lab, Response

from .recording_server import TAG_HEADER, RecordingServer

pytestmark = pytest.mark.envoy

# Removed by Envoy's HTTP connection manager (default settings) before any filter.
ENVOY_REMOVES = (
    ("connection", "keep-alive, x-named-by-connection"),
    ("x-named-by-connection", "1"),
    ("keep-alive", "timeout=5"),
    ("proxy-connection", "keep-alive"),
    ("te", "gzip"),
    ("x-forwarded-client-cert", "By=spiffe://cluster.local/ns/default/sa/evil"),
    ("x-envoy-internal", "true"),
    ("x-envoy-retry-on", "5xx"),
)
# Passed through by Envoy: what the product must handle.
ECHOED = (
    ("x-envoy-attempt-count", "3"),
    ("x-envoy-peer-metadata", "ChQKDkFQUF9DT05UQUlORVJTEgIaAA=="),
    ("x-envoy-peer-metadata-id", "sidecar~10.0.0.9~reviews-v1.default~default.svc.cluster.local"),
    ("x-envoy-decorator-operation", "reviews.default.svc.cluster.local:9080/*"),
)
FORWARDING = (
    ("x-forwarded-host", "admin.internal"),
    ("x-real-ip", "10.0.0.1"),
    ("forwarded", "for=10.0.0.1"),
)
UNDERSCORE = (("x_user_id", "42"),)
PASSED_THROUGH = ECHOED + FORWARDING + UNDERSCORE


def echoed_headers(response: Response) -> dict[str, str]:
    """The request headers the echo upstream saw, by name."""
    assert response.status == 200, response.body
    return {name.lower(): value for name, value in json.loads(response.body)["headers"]}


def actions(response: Response) -> str:
    return response.header("x-extproc-actions") or ""


def test_what_envoy_strips_and_what_it_passes(
    recording_lab: Lab, recorder: RecordingServer
) -> None:
    """Envoy removes hop-by-hop, XFCC and x-envoy control headers itself, and passes echoes, forwarding and underscore headers."""
    tag = uuid.uuid4().hex
    response = recording_lab.request(
        "echo.demo", "/", (*ENVOY_REMOVES, *PASSED_THROUGH, (TAG_HEADER, tag))
    )
    seen_by_upstream = echoed_headers(response)
    seen_by_extproc = recorder.processor.exchange(tag).request_headers
    for name, _ in ENVOY_REMOVES:
        assert name not in seen_by_extproc, f"Envoy passed {name} to the filter"
        assert name not in seen_by_upstream
    for name, value in PASSED_THROUGH:
        assert seen_by_extproc[name] == value
        assert seen_by_upstream[name] == value


def test_enforce_strips_what_envoy_passes(doctor_lab) -> None:
    """At the edge, the server strips echoed x-envoy, forwarding and underscore headers, and says so."""
    policy = policy_from_mapping(
        {"direction": "edge", "underscore_headers": "strip", "response_annotations": "on"}
    )
    response = doctor_lab(policy).request("echo.demo", "/", PASSED_THROUGH)
    seen = echoed_headers(response)
    for name, _ in PASSED_THROUGH:
        assert name not in seen
    listed = actions(response)
    assert listed.startswith("strip-echoed-envoy-headers;headers=")
    assert 'strip-forwarding-headers;headers="x-forwarded-host x-real-ip forwarded"' in listed
    assert 'strip-underscore-headers;headers="x_user_id"' in listed


def test_outbound_sidecar_keeps_forwarding_headers(doctor_lab) -> None:
    """On an outbound sidecar listener (the lab's), forwarding headers are kept and echoes still go."""
    response = doctor_lab(policy_from_mapping({})).request("echo.demo", "/", PASSED_THROUGH)
    seen = echoed_headers(response)
    assert all(seen[name] == value for name, value in FORWARDING)
    assert not any(name in seen for name, _ in ECHOED)


def test_underscore_rewrite(doctor_lab) -> None:
    """underscore_headers: rewrite delivers x_user_id as x-user-id."""
    lab = doctor_lab(policy_from_mapping({"underscore_headers": "rewrite"}))
    seen = echoed_headers(lab.request("echo.demo", "/", UNDERSCORE))
    assert "x_user_id" not in seen
    assert seen["x-user-id"] == "42"


def test_report_mode_changes_nothing(doctor_lab) -> None:
    """mode: report delivers every header and the original Host, and lists what enforce would do."""
    policy = policy_from_mapping(
        {
            "mode": "report",
            "direction": "edge",
            "response_annotations": "on",
            "host_rewrites": {"echo.demo": "app-error.demo"},
        }
    )
    response = doctor_lab(policy).request("echo.demo", "/", PASSED_THROUGH)
    seen = echoed_headers(response)
    assert all(seen[name] == value for name, value in PASSED_THROUGH)
    assert seen["host"] == "echo.demo"
    listed = actions(response)
    assert 'rewrite-host;headers=":authority";report' in listed
    assert listed.count(";report") == 4


def test_host_rewrite_turns_a_failure_into_a_200(doctor_lab) -> None:
    """A Host that falls to the passthrough route fails; with a rewrite it is routed to the mesh service."""
    host = "shop.example.com"
    failing = doctor_lab(policy_from_mapping({})).request(host)
    assert failing.status == 503
    assert (failing.header("x-extproc-diagnosis") or "").startswith("host_not_in_mesh;")

    fixed = doctor_lab(policy_from_mapping({"host_rewrites": {host: "echo.demo"}})).request(
        f"{host}:8443"
    )
    seen = echoed_headers(fixed)
    assert seen["host"] == "echo.demo"
    assert seen["x-forwarded-host"] == f"{host}:8443"
    assert actions(fixed) == 'rewrite-host;headers=":authority"'
    assert fixed.header("x-extproc-diagnosis") is None
