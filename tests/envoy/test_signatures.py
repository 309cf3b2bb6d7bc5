"""What Envoy 1.40 really sends the ext_proc server for each lab scenario.

The catalogue (`diagnosis.CATALOGUE`, and `catalogue.md`'s "Observed with Envoy 1.40"
table) is only as good as these strings; when an Envoy upgrade changes one, this file
says which. The lab's ext_proc server here is the recording one (`recording_server.py`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import pytest

from extproc import flags as F
from extproc.accesslog import parse_access_log_line
from extproc.diagnosis import classify
from extproc.lab import SCENARIOS, Lab, Response, Scenario

from .recording_server import TAG_HEADER, Exchange, RecordingServer

pytestmark = pytest.mark.envoy

ABSENT = None


@dataclass(frozen=True, slots=True)
class Observed:
    """The response attributes of one scenario, as Envoy 1.40 sent them.

    `details` is a substring of `response.code_details`. `tfr` is a substring of
    `upstream.transport_failure_reason`; "" means the attribute came empty, ABSENT that
    it did not come at all (no upstream was chosen), as for `cluster` and `route`.
    """

    status: int
    flags: int
    details: str
    tfr: str | None
    cluster: str | None
    route: str | None


_TLS_REASON = "upstream_reset_before_response_started{remote_connection_failure|TLS_error:|"

OBSERVED: dict[str, Observed] = {
    "clean": Observed(200, 0, "via_upstream", "", "echo", "echo"),
    "refused": Observed(
        503, F.UF,
        "upstream_reset_before_response_started{remote_connection_failure|"
        "delayed_connect_error:_Connection_refused}",
        "delayed connect error: Connection refused", "refused", "refused",
    ),
    "not_tls": Observed(
        503, F.UF, _TLS_REASON,
        "TLS_error:|268435703:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER:TLS_error_end",
        "not_tls", "not_tls",
    ),
    "requires_mtls": Observed(
        503, F.UC, "upstream_reset_before_response_started{connection_termination}", "",
        "mtls_plaintext", "mtls_plaintext",
    ),
    "san_mismatch": Observed(
        503, F.UF, _TLS_REASON,
        "CERTIFICATE_VERIFY_FAILED:verify cert failed: SAN matcher, certificate SANs are "
        "[spiffe://cluster.local/ns/default/sa/web, web.default.svc.cluster.local]:TLS_error_end",
        "san_mismatch", "san_mismatch",
    ),
    "untrusted": Observed(
        503, F.UF, _TLS_REASON,
        "CERTIFICATE_VERIFY_FAILED:verify cert failed: X509_verify_cert: certificate "
        "verification error at depth 1: self signed certificate in certificate chain",
        "untrusted", "untrusted",
    ),
    "expired": Observed(
        503, F.UF, _TLS_REASON,
        "CERTIFICATE_VERIFY_FAILED:verify cert failed: X509_verify_cert: certificate "
        "verification error at depth 0: certificate has expired",
        "expired", "expired",
    ),
    "no_route": Observed(404, F.NR, "route_not_found", ABSENT, ABSENT, ABSENT),
    "host_not_in_mesh": Observed(
        503, F.UC, "upstream_reset_before_response_started{connection_termination}", "",
        "PassthroughCluster", "allow_any",
    ),
    "app_error": Observed(503, 0, "via_upstream", "", "app_error", "app_error"),
}  # fmt: skip


def send(lab: Lab, recorder: RecordingServer, scenario: Scenario) -> tuple[Response, Exchange]:
    """Send the scenario's request, tagged, and return the response and its ext_proc exchange."""
    tag = f"{scenario.name}-{uuid.uuid4().hex[:8]}"
    response = lab.request(scenario.host, scenario.path, {TAG_HEADER: tag})
    return response, recorder.processor.exchange(tag)


def contains(expected: str | None, actual: object) -> bool:
    """ABSENT matches a missing attribute, "" an empty one, other text a substring."""
    if expected is None or expected == "":
        return actual == expected
    return isinstance(actual, str) and expected in actual


def test_every_scenario_has_an_observed_signature() -> None:
    """The table below covers exactly the lab's scenarios."""
    assert set(OBSERVED) == {s.name for s in SCENARIOS}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_response_attributes(
    recording_lab: Lab, recorder: RecordingServer, scenario: Scenario
) -> None:
    """Envoy sends the status, flags, details and upstream names the catalogue relies on."""
    expected = OBSERVED[scenario.name]
    response, exchange = send(recording_lab, recorder, scenario)
    attrs = exchange.response_attributes
    assert response.status == expected.status
    assert attrs["response.code"] == expected.status
    assert attrs["response.flags"] == expected.flags
    assert expected.details in attrs["response.code_details"]
    assert contains(expected.tfr, attrs.get("upstream.transport_failure_reason"))
    assert attrs.get("xds.cluster_name") == expected.cluster
    assert attrs.get("xds.route_name") == expected.route


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_listener_direction_arrives_as_outbound(
    recording_lab: Lab, recorder: RecordingServer, scenario: Scenario
) -> None:
    """The request attribute `xds.listener_direction` is 2 (OUTBOUND), a double in the Struct."""
    _, exchange = send(recording_lab, recorder, scenario)
    assert exchange.request_attributes == {"xds.listener_direction": 2.0}


def test_cluster_metadata_arrives_as_text_format(
    recording_lab: Lab, recorder: RecordingServer
) -> None:
    """`xds.cluster_metadata` is the protobuf text format of the cluster's Metadata."""
    scenario = next(s for s in SCENARIOS if s.name == "requires_mtls")
    _, exchange = send(recording_lab, recorder, scenario)
    assert exchange.response_attributes["xds.cluster_metadata"] == (
        'filter_metadata { key: "istio" value { fields { key: "config" value { string_value: '
        '"/apis/networking.istio.io/v1alpha3/namespaces/default/destination-rule/mtls-disable"'
        " } } } } "
    )


def test_cluster_metadata_is_empty_text_without_metadata(
    recording_lab: Lab, recorder: RecordingServer
) -> None:
    """A cluster without metadata still sends the attribute, as an empty string."""
    scenario = next(s for s in SCENARIOS if s.name == "refused")
    _, exchange = send(recording_lab, recorder, scenario)
    assert exchange.response_attributes["xds.cluster_metadata"] == ""


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_catalogue_classifies_the_access_log_line(
    recording_lab: Lab, recorder: RecordingServer, scenario: Scenario
) -> None:
    """The lab's access log line, read by `extproc.accesslog`, gets the scenario's reason."""
    response, _ = send(recording_lab, recorder, scenario)
    request_id = response.header("x-request-id")
    assert request_id is not None
    entry = recording_lab.access_log_entry(request_id)
    diagnosis = classify(parse_access_log_line(json.dumps(entry)))
    assert (diagnosis.reason if diagnosis else None) == scenario.expected_reason
