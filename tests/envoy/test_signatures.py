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
from extproc.lab import ALL_SCENARIOS, Lab, Response, Scenario

from .recording_server import TAG_HEADER, Exchange, RecordingServer

pytestmark = pytest.mark.envoy

ABSENT = None


@dataclass(frozen=True, slots=True)
class Observed:
    """The response attributes of one scenario, as Envoy 1.40 sent them.

    `details` is a substring of `response.code_details`. `tfr` is a substring of
    `upstream.transport_failure_reason`; "" means the attribute came empty, ABSENT that
    it did not come at all (no upstream was chosen), as for `cluster` and `route`.
    `code_attribute`: whether `response.code` came (the :status header always does).
    """

    status: int
    flags: int
    details: str
    tfr: str | None
    cluster: str | None
    route: str | None
    code_attribute: bool = True


_TLS_REASON = "upstream_reset_before_response_started{remote_connection_failure|TLS_error:|"
_TERMINATION = "upstream_reset_before_response_started{connection_termination}"
_RESET_BY_PEER = (
    "TLS_error:|33554536:system library:OPENSSL_internal:Connection reset by peer:TLS_error_end"
)
_VERIFY = "CERTIFICATE_VERIFY_FAILED:verify cert failed: X509_verify_cert: certificate verification error at depth "
# BoringSSL queues a second error after a handshake_failure alert that answers the
# ClientHello; Envoy joins the two with `|`.
_HELLO_REFUSED = (
    "TLS_error:|268436496:SSL routines:OPENSSL_internal:SSLV3_ALERT_HANDSHAKE_FAILURE"
    "|268435610:SSL routines:OPENSSL_internal:HANDSHAKE_FAILURE_ON_CLIENT_HELLO:TLS_error_end"
)


def _mesh(service: str, subset: str = "") -> str:
    return f"outbound|8080|{subset}|{service}.default.svc.cluster.local"


def _vh(service: str) -> str:
    return f"{service}.default.svc.cluster.local"


OBSERVED: dict[str, Observed] = {
    "host_not_in_mesh": Observed(503, F.UC, _TERMINATION, "", "PassthroughCluster", "allow_any"),
    # The recording server changes nothing, so the rewrite does not happen here.
    "host_rewrite": Observed(503, F.UC, _TERMINATION, "", "PassthroughCluster", "allow_any"),
    "refused": Observed(
        503, F.UF,
        "upstream_reset_before_response_started{remote_connection_failure|"
        "delayed_connect_error:_Connection_refused}",
        "delayed connect error: Connection refused", _mesh("orders"), _vh("orders"),
    ),
    "requires_mtls": Observed(503, F.UC, _TERMINATION, "", _mesh("ratings"), _vh("ratings")),
    "inbound_passthrough_refused": Observed(
        503, F.UF,
        "upstream_reset_before_response_started{remote_connection_failure|"
        "delayed_connect_error:_Connection_refused}",
        "delayed connect error: Connection refused",
        "InboundPassthroughCluster", "inbound-passthrough",
    ),
    "subset_plaintext": Observed(503, F.UC, _TERMINATION, "", _mesh("reviews", "v2"), "reviews-v2"),
    "subset_mtls": Observed(200, 0, "via_upstream", "", _mesh("reviews", "v1"), "reviews-v1"),
    "alpn_h2_only": Observed(
        503, F.UF, _TLS_REASON + "33554536:system_library:OPENSSL_internal:Connection_reset_by_peer",
        _RESET_BY_PEER, _mesh("search"), _vh("search"),
    ),
    "sni_missing": Observed(
        503, F.UF, _TLS_REASON + "33554536:system_library:OPENSSL_internal:Connection_reset_by_peer",
        _RESET_BY_PEER, "outbound|443||pay.example.net", "pay",
    ),
    "sni_set": Observed(200, 0, "via_upstream", "", "outbound|443|sni|pay.example.net", "pay-sni"),
    "san_mismatch": Observed(
        503, F.UF, _TLS_REASON,
        "CERTIFICATE_VERIFY_FAILED:verify cert failed: SAN matcher, certificate SANs are "
        "[spiffe://cluster.local/ns/default/sa/default]:TLS_error_end",
        _mesh("details"), _vh("details"),
    ),
    "client_cert_expired": Observed(
        503, F.UF, _TLS_REASON,
        "TLS_error:|268436501:SSL routines:OPENSSL_internal:SSLV3_ALERT_CERTIFICATE_EXPIRED:TLS_error_end",
        _mesh("cart"), _vh("cart"),
    ),
    "client_cert_other_ca": Observed(
        503, F.UF, _TLS_REASON,
        "TLS_error:|268436504:SSL routines:OPENSSL_internal:TLSV1_ALERT_UNKNOWN_CA:TLS_error_end",
        _mesh("checkout"), _vh("checkout"),
    ),
    "expired": Observed(
        503, F.UF, _TLS_REASON, _VERIFY + "0: certificate has expired:TLS_error_end",
        _mesh("inventory"), _vh("inventory"),
    ),
    "app_error": Observed(503, 0, "via_upstream", "", _mesh("shipping"), _vh("shipping")),
    "clean": Observed(200, 0, "via_upstream", "", "echo", "echo"),
    "mtls": Observed(200, 0, "via_upstream", "", _mesh("app"), _vh("app")),
    "permissive": Observed(200, 0, "via_upstream", "", _mesh("legacy"), _vh("legacy")),
    "not_tls": Observed(
        503, F.UF, _TLS_REASON,
        "TLS_error:|268435703:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER:TLS_error_end",
        "not_tls", "not_tls",
    ),
    "untrusted": Observed(
        503, F.UF, _TLS_REASON,
        _VERIFY + "1: self signed certificate in certificate chain:TLS_error_end",
        _mesh("billing"), _vh("billing"),
    ),
    "no_route": Observed(404, F.NR, "route_not_found", ABSENT, ABSENT, ABSENT),
    "echoed_headers": Observed(200, 0, "via_upstream", "", "echo", "echo"),
    # The upstream's own answers, with the retry flags the router added.
    "retries_exhausted": Observed(503, F.URX, "via_upstream", "", _mesh("payments"), _vh("payments")),
    "retry_overflow": Observed(503, F.UO, "via_upstream", "", _mesh("stock"), _vh("stock")),
    "grpc_unavailable": Observed(200, F.URX, "via_upstream", "", "grpc", "grpc"),
    # A reused mTLS connection closed by the upstream: the plaintext-to-STRICT bytes.
    "keepalive_race": Observed(503, F.UC, _TERMINATION, "", _mesh("catalog"), _vh("catalog")),
    # The same close, plaintext: on a sidecar's inbound cluster, and on a DISABLE cluster.
    "keepalive_race_inbound": Observed(503, F.UC, _TERMINATION, "", "inbound|8080||", "inbound|8080||"),
    "keepalive_race_plaintext": Observed(
        503, F.UC, _TERMINATION, "", _mesh("legacy-api"), _vh("legacy-api")
    ),
    "client_hello_no_sni": Observed(
        503, F.UF,
        _TLS_REASON + "268436496:SSL_routines:OPENSSL_internal:SSLV3_ALERT_HANDSHAKE_FAILURE"
        "|268435610:SSL_routines:OPENSSL_internal:HANDSHAKE_FAILURE_ON_CLIENT_HELLO:TLS_error_end}",
        _HELLO_REFUSED, "outbound|443||cdn.example.net", "cdn",
    ),
    # Filters answering in the upstream's place: a cluster was chosen, no upstream was
    # asked, so there is no transport failure reason attribute at all.
    "rate_limited": Observed(429, F.RL, "local_rate_limited", ABSENT, "echo", "limited"),
    # The cors filter's answer comes without a `response.code` attribute.
    "cors_preflight": Observed(200, 0, "cors_response", ABSENT, "echo", "cors", code_attribute=False),
    "ext_authz_denied": Observed(403, F.UAEX, "ext_authz_denied", ABSENT, "echo", "authz"),
    "fault_abort": Observed(503, F.FI, "fault_filter_abort", ABSENT, "echo", "fault"),
    # Istio's policy name for rule 0 of AuthorizationPolicy default/deny-all.
    "authz_policy_denied": Observed(
        403, 0, "rbac_access_denied_matched_policy[ns[default]-policy[deny-all]-rule[0]]",
        ABSENT, "echo", "denied",
    ),

    # drop_overloads at 100% is unconditional (UDO); below it, DO and `drop_overload`.
    "drop_overload": Observed(503, F.UDO, "unconditional_drop_overload", ABSENT, "drop", "drop"),
}  # fmt: skip


# What a scenario run under its own policy gets from a server that applies none.
OBSERVED_REASON_WITHOUT_POLICY = {"host_rewrite": "host_not_in_mesh"}


def send(lab: Lab, recorder: RecordingServer, scenario: Scenario) -> tuple[Response, Exchange]:
    """Send the scenario's request (`repeat` times, each tagged), and return the last
    response and its ext_proc exchange."""
    for _ in range(scenario.repeat):
        tag = f"{scenario.name}-{uuid.uuid4().hex[:8]}"
        headers = (*scenario.headers, (TAG_HEADER, tag))
        response = lab.request(scenario.host, scenario.path, headers, method=scenario.method)
    return response, recorder.processor.exchange(tag)


def contains(expected: str | None, actual: object) -> bool:
    """ABSENT matches a missing attribute, "" an empty one, other text a substring."""
    if expected is None or expected == "":
        return actual == expected
    return isinstance(actual, str) and expected in actual


def test_every_scenario_has_an_observed_signature() -> None:
    """The table below covers exactly the lab's scenarios."""
    assert set(OBSERVED) == {s.name for s in ALL_SCENARIOS}


@pytest.mark.parametrize("scenario", ALL_SCENARIOS, ids=lambda s: s.name)
def test_response_attributes(
    recording_lab: Lab, recorder: RecordingServer, scenario: Scenario
) -> None:
    """Envoy sends the status, flags, details and upstream names the catalogue relies on."""
    expected = OBSERVED[scenario.name]
    response, exchange = send(recording_lab, recorder, scenario)
    attrs = exchange.response_attributes
    assert response.status == expected.status
    assert attrs.get("response.code") == (expected.status if expected.code_attribute else ABSENT)
    assert exchange.response_headers[":status"] == str(expected.status)
    assert attrs["response.flags"] == expected.flags
    assert expected.details in attrs["response.code_details"]
    assert contains(expected.tfr, attrs.get("upstream.transport_failure_reason"))
    assert attrs.get("xds.cluster_name") == expected.cluster
    assert attrs.get("xds.route_name") == expected.route


@pytest.mark.parametrize("scenario", ALL_SCENARIOS, ids=lambda s: s.name)
def test_listener_direction_arrives_as_outbound(
    recording_lab: Lab, recorder: RecordingServer, scenario: Scenario
) -> None:
    """The request attribute `xds.listener_direction` is 2 (OUTBOUND), a double in the Struct."""
    _, exchange = send(recording_lab, recorder, scenario)
    assert exchange.request_attributes == {"xds.listener_direction": 2.0}


def test_grpc_error_arrives_in_the_response_headers(
    recording_lab: Lab, recorder: RecordingServer
) -> None:
    """A trailers-only gRPC answer puts grpc-status in the headers the server gets (and
    the router's `retry_on: unavailable` reads it there)."""
    scenario = next(s for s in ALL_SCENARIOS if s.name == "grpc_unavailable")
    response, exchange = send(recording_lab, recorder, scenario)
    assert exchange.response_headers["grpc-status"] == "14"
    assert exchange.response_headers["content-type"] == "application/grpc"
    assert response.header("grpc-status") == "14"


def test_cluster_metadata_arrives_as_text_format(
    recording_lab: Lab, recorder: RecordingServer
) -> None:
    """`xds.cluster_metadata` is the protobuf text format of the cluster's Metadata."""
    scenario = next(s for s in ALL_SCENARIOS if s.name == "subset_plaintext")
    _, exchange = send(recording_lab, recorder, scenario)
    assert exchange.response_attributes["xds.cluster_metadata"] == (
        'filter_metadata { key: "istio" value { fields { key: "config" value { string_value: '
        '"/apis/networking.istio.io/v1/namespaces/default/destination-rule/reviews"'
        " } } } } "
    )


def test_cluster_metadata_is_empty_text_without_metadata(
    recording_lab: Lab, recorder: RecordingServer
) -> None:
    """A cluster without metadata still sends the attribute, as an empty string."""
    scenario = next(s for s in ALL_SCENARIOS if s.name == "refused")
    _, exchange = send(recording_lab, recorder, scenario)
    assert exchange.response_attributes["xds.cluster_metadata"] == ""


@pytest.mark.parametrize("scenario", ALL_SCENARIOS, ids=lambda s: s.name)
def test_catalogue_classifies_the_access_log_line(
    recording_lab: Lab, recorder: RecordingServer, scenario: Scenario
) -> None:
    """`extproc diagnose`'s parser and classifier give the lab's access-log line the scenario's reason.

    An access log holds no cluster TLS settings, so an SNI or ALPN reset gets the reason
    whose hint names both causes.
    """
    response, _ = send(recording_lab, recorder, scenario)
    request_id = response.header("x-request-id")
    assert request_id is not None
    line = json.dumps(recording_lab.access_log_entry(request_id))
    expected = scenario.reason_without_context
    if scenario.policy is not None:  # the recording server applies no policy
        expected = OBSERVED_REASON_WITHOUT_POLICY[scenario.name]
    diagnosis = classify(parse_access_log_line(line))
    assert (diagnosis.reason if diagnosis else None) == expected
