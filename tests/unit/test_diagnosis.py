"""Tests for extproc.diagnosis and extproc.flags, written from the signatures in catalogue.md.

Every case builds the `Evidence` the way Envoy reports it: `code_details` is
`upstream_reset_before_response_started{<reason>|<transport failure reason>}` with spaces
turned into `_`, the transport failure reason is passed as it is, status and flags are ints.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc import flags as F
from extproc.diagnosis import (
    AUTO_SNI,
    CATALOGUE,
    HINTS,
    NO_H2_HINT,
    SNI_MISSING_HINT,
    Evidence,
    classify,
    destination_rule,
    evidence_of,
    is_envoy_failure,
    transport_detail,
)

CLUSTER = "outbound|9080||reviews.default.svc.cluster.local"
HOST = "reviews.default.svc.cluster.local:9080"

ISTIO_METADATA = (
    "filter_metadata {\n"
    '  key: "istio"\n'
    "  value {\n"
    "    fields {\n"
    '      key: "config"\n'
    "      value {\n"
    '        string_value: "/apis/networking.istio.io/v1alpha3/namespaces/default/destination-rule/reviews"\n'
    "      }\n"
    "    }\n"
    "  }\n"
    "}"
)


def reset(reason: str, tfr: str = "", sep: str = "|") -> str:
    """Envoy's code details for a reset before the response: spaces in the tfr become `_`."""
    inner = reason + (sep + tfr.replace(" ", "_") if tfr else "")
    return "upstream_reset_before_response_started{" + inner + "}"


def tls(code: int, reason: str, lib: str = "SSL routines") -> str:
    """A BoringSSL transport failure reason in Envoy 1.40's `TLS_error:|...:TLS_error_end` form."""
    return f"TLS_error:|{code}:{lib}:OPENSSL_internal:{reason}:TLS_error_end"


def failed(tfr: str, *, status: int = 503, flags: int = F.UF, **kw: object) -> Evidence:
    """A connection failure as Envoy 1.40 reports it, with the TLS reason also in the details."""
    return Evidence(
        status=status,
        flags=flags,
        code_details=reset("remote_connection_failure", tfr),
        transport_failure_reason=tfr,
        cluster=CLUSTER,
        has_attributes=True,
        **kw,  # type: ignore[arg-type]
    )


CONNECTION_RESET_BY_PEER = (
    "TLS_error:|33554536:system library:OPENSSL_internal:Connection reset by peer:TLS_error_end"
)
SAN_MATCHER = tls(
    268435581,
    "CERTIFICATE_VERIFY_FAILED:verify cert failed: SAN matcher, certificate SANs are "
    "[spiffe://cluster.local/ns/default/sa/ratings, spiffe://cluster.local/ns/default/sa/other]",
)
SELF_SIGNED = tls(
    268435581,
    "CERTIFICATE_VERIFY_FAILED:verify cert failed: X509_verify_cert: certificate verification "
    "error at depth 1: self signed certificate in certificate chain",
)
EXPIRED = tls(
    268435581,
    "CERTIFICATE_VERIFY_FAILED:verify cert failed: X509_verify_cert: certificate verification "
    "error at depth 0: certificate has expired",
)

# The "Observed with Envoy 1.40 in a local lab" table, one row per situation.
LAB_ROWS = [
    pytest.param(
        failed("delayed connect error: Connection refused"),
        "upstream_refused",
        id="nothing-listens",
    ),
    pytest.param(
        failed(tls(268435703, "WRONG_VERSION_NUMBER")),
        "upstream_not_tls",
        id="tls-to-plaintext-port",
    ),
    pytest.param(
        Evidence(
            status=503,
            flags=64,
            code_details=reset("connection_termination"),
            cluster=CLUSTER,
            has_attributes=True,
            cluster_tls=False,
            repeated_close=True,
        ),
        "upstream_requires_mtls",
        id="plaintext-to-mtls-only",
    ),
    pytest.param(
        failed(tls(268436496, "SSLV3_ALERT_HANDSHAKE_FAILURE")),
        "upstream_requires_mtls",
        id="tls12-without-client-cert",
    ),
    pytest.param(failed(SAN_MATCHER), "upstream_san_mismatch", id="san-not-expected-spiffe-id"),
    pytest.param(failed(SELF_SIGNED), "upstream_cert_untrusted", id="server-cert-untrusted-ca"),
    pytest.param(failed(EXPIRED), "upstream_cert_expired", id="server-cert-expired"),
    pytest.param(
        failed(tls(268436501, "SSLV3_ALERT_CERTIFICATE_EXPIRED")),
        "client_cert_rejected",
        id="our-client-cert-expired",
    ),
    pytest.param(
        failed(tls(268436504, "TLSV1_ALERT_UNKNOWN_CA")),
        "client_cert_rejected",
        id="our-client-cert-other-ca",
    ),
    pytest.param(
        failed(CONNECTION_RESET_BY_PEER),
        "tls_handshake_rejected",
        id="no-sni-server-names-only",
    ),
    pytest.param(
        failed(CONNECTION_RESET_BY_PEER),
        "tls_handshake_rejected",
        id="alpn-http11-server-h2-only",
    ),
    pytest.param(
        Evidence(
            status=503,
            flags=2,
            code_details="no_healthy_upstream",
            cluster=CLUSTER,
            has_attributes=True,
        ),
        "no_healthy_upstream",
        id="cluster-without-endpoints",
    ),
    pytest.param(
        Evidence(
            status=504,
            flags=4,
            code_details="response_timeout",
            cluster=CLUSTER,
            has_attributes=True,
        ),
        "upstream_timeout",
        id="route-timeout",
    ),
    pytest.param(
        Evidence(status=404, flags=256, code_details="route_not_found", has_attributes=True),
        "no_route",
        id="no-matching-route",
    ),
    pytest.param(
        Evidence(
            status=503,
            flags=0,
            code_details="via_upstream",
            cluster=CLUSTER,
            has_attributes=True,
        ),
        "upstream_app_error",
        id="app-answered-503",
    ),
    pytest.param(
        Evidence(
            status=503,
            flags=64,
            code_details=reset("connection_termination"),
            cluster="PassthroughCluster",
            route="allow_any",
            has_attributes=True,
        ),
        "host_not_in_mesh",
        id="allow-any-passthrough-plaintext-to-mtls",
    ),
]

# Formats of older Envoy versions named in catalogue.md.
OLDER_ROWS = [
    pytest.param(
        Evidence(
            status=503,
            flags=F.UF,
            code_details=reset("connection_failure", "delayed connect error: 111", sep=","),
            transport_failure_reason="delayed connect error: 111",
            has_attributes=True,
        ),
        "upstream_refused",
        id="comma-separator-numeric-errno",
    ),
    pytest.param(
        Evidence(
            status=503,
            flags=F.UF,
            code_details="upstream_reset_before_response_started{connection_failure,delayed_connect_error:_111}",
            has_attributes=True,
        ),
        "upstream_refused",
        id="numeric-errno-in-details-only",
    ),
    pytest.param(
        Evidence(
            status=503,
            flags=F.UF,
            code_details=reset(
                "connection_failure", "delayed connect error: Connection refused", sep=","
            ),
            transport_failure_reason="delayed connect error: Connection refused",
            has_attributes=True,
        ),
        "upstream_refused",
        id="comma-separator-errno-words",
    ),
    pytest.param(
        Evidence(
            status=503,
            flags=F.UF,
            code_details=reset(
                "connection_failure",
                "TLS error: 268435703:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER",
                sep=",",
            ),
            transport_failure_reason=(
                "TLS error: 268435703:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER"
            ),
            has_attributes=True,
        ),
        "upstream_not_tls",
        id="tls-error-prefix-form",
    ),
    pytest.param(
        Evidence(
            status=503,
            flags=F.UF,
            code_details=reset(
                "connection_failure",
                "TLS error: 268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:"
                "verify cert failed: verify SAN list",
                sep=",",
            ),
            transport_failure_reason=(
                "TLS error: 268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:"
                "verify cert failed: verify SAN list"
            ),
            has_attributes=True,
        ),
        "upstream_san_mismatch",
        id="verify-san-list",
    ),
    pytest.param(
        failed(
            tls(
                268435581,
                "CERTIFICATE_VERIFY_FAILED:verify cert failed: X509_verify_cert: certificate "
                "verification error at depth 0: unable to get local issuer certificate",
            )
        ),
        "upstream_cert_untrusted",
        id="unable-to-get-local-issuer",
    ),
]

# Every other reason in HINTS, from its signature in catalogue.md / design.md.
OTHER_ROWS = [
    pytest.param(
        failed(tls(268436568, "TLSV1_ALERT_UNRECOGNIZED_NAME")),
        "sni_rejected",
        id="unrecognized-name",
    ),
    pytest.param(
        failed(tls(268436576, "TLSV1_ALERT_NO_APPLICATION_PROTOCOL")),
        "alpn_mismatch",
        id="alert-no-application-protocol",
    ),
    pytest.param(
        failed(tls(268435763, "NO_APPLICATION_PROTOCOL")),
        "alpn_mismatch",
        id="no-application-protocol",
    ),
    pytest.param(
        failed(tls(268436526, "TLSV1_ALERT_PROTOCOL_VERSION")),
        "tls_version_mismatch",
        id="protocol-version",
    ),
    pytest.param(
        failed(tls(268435640, "NO_SHARED_CIPHER")),
        "tls_version_mismatch",
        id="no-shared-cipher",
    ),
    pytest.param(
        failed("TLS error: Secret is not supplied by SDS"),
        "sds_secret_missing",
        id="sds-secret-missing",
    ),
    pytest.param(
        failed(tls(268435612, "HTTP_REQUEST")),
        "upstream_not_tls",
        id="http-request",
    ),
    pytest.param(
        failed(tls(268436572, "TLSV1_ALERT_CERTIFICATE_REQUIRED")),
        "upstream_requires_mtls",
        id="certificate-required",
    ),
    pytest.param(
        failed(tls(268436498, "SSLV3_ALERT_BAD_CERTIFICATE")),
        "client_cert_rejected",
        id="bad-certificate",
    ),
    pytest.param(
        failed(tls(268436502, "SSLV3_ALERT_CERTIFICATE_UNKNOWN")),
        "client_cert_rejected",
        id="certificate-unknown",
    ),
    pytest.param(
        Evidence(
            status=502,
            flags=F.UPE,
            code_details=reset("protocol_error"),
            cluster=CLUSTER,
            has_attributes=True,
        ),
        "protocol_mismatch",
        id="upe-protocol-error",
    ),
    pytest.param(
        Evidence(
            status=503,
            flags=F.UF,
            code_details=reset("connection_timeout"),
            cluster=CLUSTER,
            has_attributes=True,
        ),
        "upstream_connect_timeout",
        id="connection-timeout",
    ),
    pytest.param(
        Evidence(
            status=503,
            flags=F.UR,
            code_details=reset("remote_reset"),
            cluster=CLUSTER,
            has_attributes=True,
        ),
        "upstream_reset",
        id="ur-remote-reset",
    ),
    pytest.param(
        Evidence(
            status=503,
            flags=F.LR,
            code_details=reset("local_reset"),
            cluster=CLUSTER,
            has_attributes=True,
        ),
        "upstream_reset",
        id="lr-local-reset",
    ),
    pytest.param(
        Evidence(
            status=503,
            flags=F.UO,
            code_details=reset("overflow"),
            cluster=CLUSTER,
            has_attributes=True,
        ),
        "circuit_open",
        id="uo-overflow",
    ),
    pytest.param(
        Evidence(
            status=503,
            flags=F.NC,
            code_details="cluster_not_found",
            route="default",
            has_attributes=True,
        ),
        "cluster_not_found",
        id="nc-cluster-not-found",
    ),
    pytest.param(
        Evidence(
            status=503,
            flags=F.DF,
            code_details="dns_resolution_failure",
            cluster=CLUSTER,
            has_attributes=True,
        ),
        "dns_failure",
        id="df-dns-failure",
    ),
    pytest.param(
        Evidence(
            status=504,
            flags=F.UT,
            code_details="upstream_per_try_timeout",
            cluster=CLUSTER,
            has_attributes=True,
        ),
        "upstream_timeout",
        id="per-try-timeout",
    ),
]

GRPC_ROWS = [
    pytest.param(
        Evidence(
            status=200,
            grpc_status=14,
            flags=F.UF,
            code_details=reset(
                "remote_connection_failure", "delayed connect error: Connection refused"
            ),
            transport_failure_reason="delayed connect error: Connection refused",
            cluster=CLUSTER,
            has_attributes=True,
        ),
        "upstream_refused",
        id="grpc-14-uf-refused",
    ),
    pytest.param(
        Evidence(
            status=200,
            grpc_status=4,
            flags=F.UT,
            code_details="response_timeout",
            cluster=CLUSTER,
            has_attributes=True,
        ),
        "upstream_timeout",
        id="grpc-4-ut-timeout",
    ),
    pytest.param(
        Evidence(status=200, grpc_status=14, upstream_answered=False),
        "upstream_failure",
        id="grpc-14-no-attributes",
    ),
    pytest.param(
        Evidence(status=200, grpc_status=4, upstream_answered=False),
        "upstream_timeout",
        id="grpc-4-no-attributes",
    ),
]


class TestLabTable:
    """The rows observed with Envoy 1.40 in a local lab."""

    @pytest.mark.parametrize(("evidence", "reason"), LAB_ROWS)
    def test_lab_row_gets_its_reason(self, evidence: Evidence, reason: str) -> None:
        """Each observed situation is classified with the reason the catalogue gives it."""
        diagnosis = classify(evidence)
        assert diagnosis is not None
        assert diagnosis.reason == reason

    @pytest.mark.parametrize(("evidence", "reason"), LAB_ROWS)
    def test_lab_row_carries_a_hint_and_the_status(self, evidence: Evidence, reason: str) -> None:
        """Every lab diagnosis has a non-empty hint and its evidence starts with the status."""
        diagnosis = classify(evidence)
        assert diagnosis is not None
        assert diagnosis.hint
        assert diagnosis.evidence[0] == ("status", evidence.status)

    @pytest.mark.parametrize(
        ("tfr", "detail"),
        [
            pytest.param(
                tls(268435703, "WRONG_VERSION_NUMBER"), "WRONG_VERSION_NUMBER", id="wrong-version"
            ),
            pytest.param(
                tls(268436496, "SSLV3_ALERT_HANDSHAKE_FAILURE"),
                "SSLV3_ALERT_HANDSHAKE_FAILURE",
                id="handshake-failure",
            ),
            pytest.param(
                tls(268436504, "TLSV1_ALERT_UNKNOWN_CA"), "TLSV1_ALERT_UNKNOWN_CA", id="unknown-ca"
            ),
            pytest.param(
                CONNECTION_RESET_BY_PEER, "Connection reset by peer", id="connection-reset-by-peer"
            ),
            pytest.param(
                EXPIRED,
                "CERTIFICATE_VERIFY_FAILED:verify cert failed: X509_verify_cert: certificate "
                "verification error at depth 0: certificate has expired",
                id="verify-failed-keeps-its-detail",
            ),
            pytest.param(
                "delayed connect error: Connection refused",
                "delayed connect error: Connection refused",
                id="not-tls",
            ),
        ],
    )
    def test_detail_is_the_tls_reason(self, tfr: str, detail: str) -> None:
        """The `detail` evidence is the TLS reason (with what follows it), not the whole wrapper."""
        diagnosis = classify(failed(tfr))
        assert diagnosis is not None
        assert dict(diagnosis.evidence)["detail"] == detail


class TestOlderFormats:
    """Envoy versions before 1.40 used `,`, numeric errno and the `TLS error: ` prefix."""

    @pytest.mark.parametrize(("evidence", "reason"), OLDER_ROWS)
    def test_older_format_gets_the_same_reason(self, evidence: Evidence, reason: str) -> None:
        """An older spelling of a known failure is classified like its Envoy 1.40 spelling."""
        diagnosis = classify(evidence)
        assert diagnosis is not None
        assert diagnosis.reason == reason

    def test_tls_error_prefix_form_detail(self) -> None:
        """The `TLS error: <code>:<lib>:<func>:<REASON>` form yields the bare reason as detail."""
        ev = Evidence(
            status=503,
            flags=F.UF,
            transport_failure_reason=(
                "TLS error: 268435703:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER"
            ),
            has_attributes=True,
        )
        assert transport_detail(ev) == "WRONG_VERSION_NUMBER"

    @pytest.mark.parametrize(
        "code_details",
        [
            pytest.param(
                reset("remote_connection_failure", tls(268435703, "WRONG_VERSION_NUMBER")),
                id="envoy-1.40",
            ),
            pytest.param(
                reset(
                    "connection_failure",
                    "TLS error: 268435703:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER",
                    sep=",",
                ),
                id="older",
            ),
        ],
    )
    def test_detail_from_code_details_alone(self, code_details: str) -> None:
        """Without a transport failure reason, the TLS reason is still picked out of the details."""
        ev = Evidence(status=503, flags=F.UF, code_details=code_details, has_attributes=True)
        assert transport_detail(ev) == "WRONG_VERSION_NUMBER"

    def test_single_connection_failure_is_upstream_failure_with_its_own_hint(self) -> None:
        """Older Envoy's bare `connection failure` (UF, no tfr) is upstream_failure with a UF-specific hint."""
        ev = Evidence(
            status=503,
            flags=F.UF,
            code_details=reset("connection_failure"),
            cluster=CLUSTER,
            has_attributes=True,
        )
        diagnosis = classify(ev)
        assert diagnosis is not None
        assert diagnosis.reason == "upstream_failure"
        assert diagnosis.hint != HINTS["upstream_failure"]
        assert "connect" in diagnosis.hint.lower()


class TestOtherReasons:
    """The reasons outside the lab table, each reached from its documented signature."""

    @pytest.mark.parametrize(("evidence", "reason"), OTHER_ROWS)
    def test_signature_gets_its_reason(self, evidence: Evidence, reason: str) -> None:
        """A documented signature is classified with its reason."""
        diagnosis = classify(evidence)
        assert diagnosis is not None
        assert diagnosis.reason == reason

    def test_overload_manager_flag_is_overload_shed(self) -> None:
        """The OM flag (overload manager reset) is the overload manager shedding, not a breaker."""
        ev = Evidence(
            status=503,
            flags=F.OM,
            code_details=reset("overload_manager_reset"),
            has_attributes=True,
        )
        diagnosis = classify(ev)
        assert diagnosis is not None
        assert diagnosis.reason == "overload_shed"

    def test_unexplained_envoy_failure_is_upstream_failure(self) -> None:
        """An Envoy-generated failure that matches no signature falls to upstream_failure."""
        ev = Evidence(
            status=503,
            code_details="a_detail_a_future_envoy_writes",
            cluster=CLUSTER,
            has_attributes=True,
        )
        diagnosis = classify(ev)
        assert diagnosis is not None
        assert diagnosis.reason == "upstream_failure"
        assert dict(diagnosis.evidence)["detail"] == "a_detail_a_future_envoy_writes"

    def test_every_hints_reason_is_reached(self) -> None:
        """The tables above reach every reason that has a hint."""
        reached = set()
        for table in (LAB_ROWS, OLDER_ROWS, OTHER_ROWS, GRPC_ROWS, ISSUE10_ROWS, ISSUE19_ROWS):
            for case in table:
                evidence, _reason = case.values
                diagnosis = classify(evidence)  # type: ignore[arg-type]
                assert diagnosis is not None
                reached.add(diagnosis.reason)
        assert reached == set(HINTS)


class TestGrpc:
    """A gRPC local reply is HTTP 200 with grpc-status: flags and details decide."""

    @pytest.mark.parametrize(("evidence", "reason"), GRPC_ROWS)
    def test_grpc_local_reply_is_diagnosed(self, evidence: Evidence, reason: str) -> None:
        """A gRPC local reply (200, grpc-status 14 or 4) gets a diagnosis despite its 200 status."""
        assert is_envoy_failure(evidence)
        diagnosis = classify(evidence)
        assert diagnosis is not None
        assert diagnosis.reason == reason

    def test_grpc_status_is_in_the_evidence(self) -> None:
        """The grpc-status goes into the evidence right after the HTTP status."""
        ev = Evidence(status=200, grpc_status=14, flags=F.UF, has_attributes=True)
        diagnosis = classify(ev)
        assert diagnosis is not None
        assert diagnosis.evidence[:3] == (("status", 200), ("grpc", 14), ("flags", "UF"))


class TestNotDiagnosed:
    """Responses Envoy did not fail are left alone."""

    @pytest.mark.parametrize(
        "evidence",
        [
            pytest.param(
                Evidence(status=200, code_details="via_upstream", has_attributes=True),
                id="clean-200",
            ),
            pytest.param(
                Evidence(status=404, code_details="via_upstream", has_attributes=True),
                id="app-404",
            ),
            pytest.param(
                Evidence(status=200, code_details="direct_response", has_attributes=True),
                id="direct-response",
            ),
            pytest.param(
                Evidence(status=200, flags=F.DI, code_details="via_upstream", has_attributes=True),
                id="delay-injected",
            ),
            pytest.param(
                Evidence(
                    status=200, grpc_status=0, code_details="via_upstream", has_attributes=True
                ),
                id="grpc-ok",
            ),
            pytest.param(Evidence(status=404, upstream_answered=True), id="app-404-no-attributes"),
            pytest.param(Evidence(status=200, upstream_answered=True), id="clean-no-attributes"),
        ],
    )
    def test_not_an_envoy_failure(self, evidence: Evidence) -> None:
        """A response the upstream produced without error gets no diagnosis."""
        assert not is_envoy_failure(evidence)
        assert classify(evidence) is None

    @pytest.mark.parametrize("status", [500, 502, 503, 504])
    @pytest.mark.parametrize(
        ("cluster", "route"),
        [
            pytest.param(CLUSTER, "default", id="mesh-cluster"),
            pytest.param("PassthroughCluster", "allow_any", id="passthrough"),
            pytest.param("BlackHoleCluster", "block_all", id="blackhole"),
        ],
    )
    def test_app_5xx_is_never_a_mesh_reason(self, status: int, cluster: str, route: str) -> None:
        """A 5xx the upstream answered via_upstream is upstream_app_error, whatever the route."""
        ev = Evidence(
            status=status,
            code_details="via_upstream",
            cluster=cluster,
            route=route,
            has_attributes=True,
        )
        diagnosis = classify(ev)
        assert diagnosis is not None
        assert diagnosis.reason == "upstream_app_error"


class TestWithoutAttributes:
    """With no failure attributes, the status and headers are all there is."""

    @pytest.mark.parametrize(
        ("evidence", "reason"),
        [
            pytest.param(
                Evidence(status=503, upstream_answered=True),
                "upstream_app_error",
                id="503-answered",
            ),
            pytest.param(
                Evidence(status=503, upstream_answered=False),
                "upstream_failure",
                id="503-not-answered",
            ),
            pytest.param(
                Evidence(status=504, upstream_answered=False),
                "upstream_timeout",
                id="504-not-answered",
            ),
            pytest.param(
                Evidence(status=404, upstream_answered=False), "no_route", id="404-not-answered"
            ),
            pytest.param(
                Evidence(status=503, upstream_answered=False, overloaded=True),
                "circuit_open",
                id="x-envoy-overloaded",
            ),
        ],
    )
    def test_reason_from_status_and_headers(self, evidence: Evidence, reason: str) -> None:
        """The status, x-envoy-upstream-service-time and x-envoy-overloaded decide the reason."""
        assert not evidence.has_attributes
        diagnosis = classify(evidence)
        assert diagnosis is not None
        assert diagnosis.reason == reason

    def test_404_answered_is_not_diagnosed(self) -> None:
        """A 404 that the upstream answered is the application's business."""
        assert classify(Evidence(status=404, upstream_answered=True)) is None

    def test_unanswered_503_hint_asks_for_attributes(self) -> None:
        """The hint for an unexplained 503 without attributes says to configure response_attributes."""
        diagnosis = classify(Evidence(status=503, upstream_answered=False))
        assert diagnosis is not None
        assert "response_attributes" in diagnosis.hint


class TestEvidence:
    """The evidence parameters: fixed order, typed values, unknowns left out."""

    def test_full_evidence_in_order(self) -> None:
        """Status (int), flags (short names), cluster, host, dr and detail appear in that order."""
        ev = failed(
            tls(268435703, "WRONG_VERSION_NUMBER"),
            flags=F.UF | F.URX,
            host=HOST,
            cluster_metadata=ISTIO_METADATA,
        )
        assert evidence_of(ev) == (
            ("status", 503),
            ("flags", "UF,URX"),
            ("cluster", CLUSTER),
            ("host", HOST),
            ("dr", "default/reviews"),
            ("detail", "WRONG_VERSION_NUMBER"),
        )

    def test_recorded_hello_refusal_evidence(self) -> None:
        """The ClientHello refusal Envoy 1.40 reported gives both queued TLS reasons as the detail,
        and the cluster's TLS settings that decided the reason."""
        ev = failed(HELLO_REFUSED_TFR, cluster_tls=True, cluster_sni="", cluster_alpn=())
        diagnosis = classify(ev)
        assert diagnosis is not None
        assert diagnosis.evidence == (
            ("status", 503),
            ("flags", "UF"),
            ("cluster", "outbound|9080||reviews.default.svc.cluster.local"),
            ("tls", "on"),
            ("sni", "none"),
            ("alpn", "none"),
            ("detail", "SSLV3_ALERT_HANDSHAKE_FAILURE|HANDSHAKE_FAILURE_ON_CLIENT_HELLO"),
        )

    def test_status_is_an_int(self) -> None:
        """The status parameter is an integer, not text."""
        (key, value), *_ = evidence_of(Evidence(status=503))
        assert key == "status"
        assert value == 503
        assert isinstance(value, int)

    def test_unknowns_are_left_out(self) -> None:
        """Empty fields and a missing status produce no parameters."""
        assert evidence_of(Evidence()) == ()
        assert evidence_of(Evidence(status=503)) == (("status", 503),)

    def test_route_and_upstream_address_are_kept(self) -> None:
        """The route and the upstream address are evidence too, between cluster and host."""
        ev = Evidence(
            status=503,
            cluster=CLUSTER,
            route="default",
            upstream_address="10.1.2.3:9080",
            host=HOST,
        )
        keys = [key for key, _ in evidence_of(ev)]
        assert keys == ["status", "cluster", "route", "upstream", "host"]

    def test_no_route_names_the_host(self) -> None:
        """A no_route diagnosis says which Host was asked for."""
        ev = Evidence(
            status=404,
            flags=F.NR,
            code_details="route_not_found",
            host="shop.example.com:8443",
            has_attributes=True,
        )
        diagnosis = classify(ev)
        assert diagnosis is not None
        assert ("host", "shop.example.com:8443") in diagnosis.evidence


class TestDestinationRule:
    """The DestinationRule Istio recorded in the cluster metadata."""

    @pytest.mark.parametrize(
        ("metadata", "expected"),
        [
            pytest.param(ISTIO_METADATA, "default/reviews", id="istio-config"),
            pytest.param(
                ISTIO_METADATA.replace("default", "bookinfo-prod").replace("reviews", "reviews.v2"),
                "bookinfo-prod/reviews.v2",
                id="dotted-name",
            ),
            pytest.param('string_value: "/destination-rule/reviews"', "reviews", id="no-namespace"),
            pytest.param("", "", id="empty"),
            pytest.param('filter_metadata {\n  key: "envoy.lb"\n}', "", id="no-istio-config"),
        ],
    )
    def test_destination_rule(self, metadata: str, expected: str) -> None:
        """`namespace/name` is read from the Istio config path, '' when there is none."""
        assert destination_rule(metadata) == expected


class TestCatalogueData:
    """The catalogue and the hints agree with each other and are header-safe."""

    def test_every_row_reason_has_a_hint(self) -> None:
        """Each Signature's reason has a hint in HINTS."""
        missing = {sig.reason for sig in CATALOGUE} - set(HINTS)
        assert not missing

    def test_every_hint_is_used(self) -> None:
        """Each HINTS key is the reason of some catalogue row."""
        unused = set(HINTS) - {sig.reason for sig in CATALOGUE}
        assert not unused

    def test_catalogue_ends_with_catch_all(self) -> None:
        """The last row has no condition at all, so classify always finds a row."""
        last = CATALOGUE[-1]
        assert last.reason == "upstream_failure"
        assert (last.flags, last.text, last.status) == (0, (), None)

    @pytest.mark.parametrize(
        "hint",
        [pytest.param(h, id=f"hints-{r}") for r, h in HINTS.items()]
        + [
            pytest.param(s.hint, id=f"row-{i}-{s.reason}")
            for i, s in enumerate(CATALOGUE)
            if s.hint
        ],
    )
    def test_hint_is_header_safe(self, hint: str) -> None:
        """Every hint is printable ASCII, without CR or LF, and under 300 characters."""
        assert hint.isascii()
        assert hint.isprintable()
        assert "\r" not in hint
        assert "\n" not in hint
        assert 0 < len(hint) < 300

    def test_text_conditions_are_normalised(self) -> None:
        """Text conditions are lower case without `_`, as the normalised failure text is."""
        for sig in CATALOGUE:
            for text in sig.text:
                assert text == text.lower().replace("_", " ")


def _envoy_flags() -> list[tuple[int, str, str]]:
    """(bit, short, long) per flag from Envoy's source, quoted in data/envoy_response_flags.txt."""
    section, enum, names = "", [], {}
    for line in (
        (Path(__file__).parent / "data" / "envoy_response_flags.txt").read_text().splitlines()
    ):
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[enum]":
            enum.append(line)
        else:
            short, long, identifier = line.split()
            names[identifier] = (short, long)
    return [(1 << i, *names[ident]) for i, ident in enumerate(enum) if ident in names]


ENVOY_FLAGS = _envoy_flags()


class TestFlags:
    """Response flags: the bitmask, the short names and the long names."""

    @pytest.mark.parametrize(
        ("bit", "short", "long"), [pytest.param(*row, id=row[1]) for row in ENVOY_FLAGS]
    )
    def test_flag_names_match_envoy_source(self, bit: int, short: str, long: str) -> None:
        """Each flag's short and long name parse to the bit Envoy's enum order gives it."""
        assert F.parse_flags(short) == bit
        assert F.parse_flags(long) == bit
        assert F.format_flags(bit) == short

    @pytest.mark.parametrize(
        ("text", "mask"),
        [
            pytest.param("UF,URX", F.UF | F.URX, id="comma"),
            pytest.param("URX,UF", F.UF | F.URX, id="any-order"),
            pytest.param("UF|URX", F.UF | F.URX, id="pipe"),
            pytest.param(" UF , URX ", F.UF | F.URX, id="spaces"),
            pytest.param(
                "UpstreamConnectionFailure,UpstreamRetryLimitExceeded", F.UF | F.URX, id="long"
            ),
            pytest.param("upstreamconnectionfailure", F.UF, id="long-lower-case"),
            pytest.param("-", 0, id="dash"),
            pytest.param("", 0, id="empty"),
        ],
    )
    def test_parse_flags(self, text: str, mask: int) -> None:
        """Access-log flag fields parse to the bitmask, in any order and spelling."""
        assert F.parse_flags(text) == mask

    def test_format_flags(self) -> None:
        """Formatting gives the short names comma-separated in bit order."""
        assert F.format_flags(F.URX | F.UF) == "UF,URX"
        assert F.format_flags(0) == ""

    @pytest.mark.parametrize("text", ["XX", "UF,XX", "UpstreamConnection"])
    def test_unknown_flag_raises(self, text: str) -> None:
        """A name Envoy does not define raises UnknownFlagError, a ValueError."""
        with pytest.raises(F.UnknownFlagError):
            F.parse_flags(text)
        assert issubclass(F.UnknownFlagError, ValueError)

    @given(st.integers(min_value=0, max_value=F.ALL_FLAGS))
    def test_round_trip(self, mask: int) -> None:
        """parse_flags(format_flags(mask)) gives back every defined bit of mask."""
        assert F.parse_flags(F.format_flags(mask)) == mask


class TestClusterTlsContext:
    """A reset during the handshake, told apart by the cluster's TLS settings (Envoy admin)."""

    def reset_with(self, sni: str | None, alpn: tuple[str, ...] | None) -> Evidence:
        return failed(CONNECTION_RESET_BY_PEER, cluster_sni=sni, cluster_alpn=alpn)

    def test_no_sni_is_sni_rejected(self):
        """A cluster that sends no SNI gets sni_rejected, with the hint to set sni."""
        d = classify(self.reset_with("", ("istio-h2",)))
        assert d is not None
        assert (d.reason, d.hint) == ("sni_rejected", SNI_MISSING_HINT)
        assert ("sni", "none") in d.evidence

    def test_no_sni_wins_over_no_h2(self):
        """Without SNI and without h2, the missing SNI is named: it is the cheaper fix to check."""
        d = classify(self.reset_with("", ()))
        assert d is not None
        assert d.reason == "sni_rejected"

    @pytest.mark.parametrize("alpn", [("istio-http/1.1",), ("http/1.1",), ()])
    def test_sni_without_h2_is_alpn_mismatch(self, alpn):
        """With SNI sent and no h2 offered, the ALPN is the suspect, and the hint says HTTP/2."""
        d = classify(self.reset_with("outbound_.8080_._.search.default.svc.cluster.local", alpn))
        assert d is not None
        assert (d.reason, d.hint) == ("alpn_mismatch", NO_H2_HINT)
        assert "HTTP/2" in d.hint
        assert "ALPN" in d.hint
        assert ("alpn", " ".join(alpn) or "none") in d.evidence

    @pytest.mark.parametrize("alpn", [("istio-h2",), ("h2", "http/1.1")])
    def test_sni_and_h2_names_both(self, alpn):
        """When both look right, the reason stays the one whose hint names both causes."""
        d = classify(self.reset_with(AUTO_SNI, alpn))
        assert d is not None
        assert d.reason == "tls_handshake_rejected"
        assert ("sni", AUTO_SNI) in d.evidence

    def test_unknown_context_names_both(self):
        """Without context the evidence carries no sni or alpn, and the hint names both."""
        d = classify(self.reset_with(None, None))
        assert d is not None
        assert d.reason == "tls_handshake_rejected"
        assert not {"sni", "alpn"} & {key for key, _ in d.evidence}

    def test_context_does_not_change_other_reasons(self):
        """A TLS verdict with a known reason keeps it, whatever the cluster sends."""
        ev = failed(tls(268436504, "TLSV1_ALERT_UNKNOWN_CA"), cluster_sni="", cluster_alpn=())
        d = classify(ev)
        assert d is not None
        assert d.reason == "client_cert_rejected"


def attrs(status: int | None, flags: int = 0, details: str = "", **kw: object) -> Evidence:
    """Evidence as the response attributes give it."""
    return Evidence(status=status, flags=flags, code_details=details, has_attributes=True, **kw)  # type: ignore[arg-type]


# Recorded from Envoy 1.40 (tests/envoy/test_signatures.py, `client_hello_no_sni`): a
# handshake_failure alert in answer to the ClientHello; BoringSSL queues a second error
# and Envoy joins the two with `|` inside one TLS_error…TLS_error_end.
HELLO_REFUSED_TFR = (
    "TLS_error:|268436496:SSL routines:OPENSSL_internal:SSLV3_ALERT_HANDSHAKE_FAILURE"
    "|268435610:SSL routines:OPENSSL_internal:HANDSHAKE_FAILURE_ON_CLIENT_HELLO:TLS_error_end"
)
UC_DETAILS = reset("connection_termination")

# Issue 10's cases, from the strings Envoy reports for them. Recorded from Envoy 1.40 in the
# lab (docs/signatures.md): the retried app errors (503 URX, 503 UO, 200 + grpc-status 14
# URX), the closed TLS connection, the refused ClientHello, local_rate_limited,
# ext_authz_denied, fault_filter_abort and unconditional_drop_overload. The others come
# from Envoy's documentation and public threads (tests/corpus/records.yaml).
ISSUE10_ROWS = [
    pytest.param(
        attrs(503, F.UO, "via_upstream"), "upstream_app_error", id="app-503-retry-overflow"
    ),
    pytest.param(
        attrs(429, F.URX, "via_upstream"), "upstream_app_error", id="app-429-retries-exhausted"
    ),
    pytest.param(
        attrs(200, F.URX, "via_upstream", grpc_status=14),
        "upstream_app_error",
        id="app-grpc-14-urx",
    ),
    pytest.param(
        attrs(503, F.UC, UC_DETAILS, cluster_tls=True), "upstream_connection_closed", id="uc-tls"
    ),
    pytest.param(
        attrs(503, F.UC, UC_DETAILS, cluster_tls=False, repeated_close=True),
        "upstream_requires_mtls",
        id="uc-plain",
    ),
    pytest.param(
        failed(HELLO_REFUSED_TFR, cluster_sni="api.example.com"),
        "tls_handshake_rejected",
        id="hello-refused",
    ),
    pytest.param(
        failed(HELLO_REFUSED_TFR, cluster_sni=""), "sni_rejected", id="hello-refused-no-sni"
    ),
    pytest.param(
        attrs(
            503,
            F.UF,
            reset("remote_connection_failure", "delayed connect error: Connection refused"),
            transport_failure_reason="delayed connect error: Connection refused",
            cluster="InboundPassthroughCluster",
        ),
        "upstream_refused",
        id="inbound-passthrough-refused",
    ),
    pytest.param(attrs(503, F.NR, ""), "cluster_not_found", id="legacy-nr-503"),
    pytest.param(attrs(429, F.RL, "local_rate_limited"), "rate_limited", id="local-rate-limit"),
    pytest.param(attrs(429, F.RL, "request_rate_limited"), "rate_limited", id="global-rate-limit"),
    pytest.param(
        attrs(500, F.RLSE, "rate_limiter_error"), "rate_limited", id="rate-limit-service-down"
    ),
    pytest.param(attrs(403, F.UAEX, "ext_authz_denied"), "ext_authz_denied", id="ext-authz-denied"),
    pytest.param(attrs(403, F.UAEX, "ext_authz_error"), "ext_authz_denied", id="ext-authz-error"),
    pytest.param(attrs(503, F.FI, "fault_filter_abort"), "fault_injected", id="fault-abort"),
    pytest.param(
        attrs(400, F.IH, "request_headers_failed_strict_check"), "invalid_request_headers", id="ih"
    ),
    pytest.param(attrs(400, F.DPE, "http1.codec_error"), "downstream_protocol_error", id="dpe"),
    pytest.param(attrs(408, F.SI, "stream_idle_timeout"), "stream_idle_timeout", id="stream-idle"),
    pytest.param(
        attrs(None, F.DC, "downstream_remote_disconnect"), "client_disconnected", id="client-gone"
    ),
    pytest.param(
        attrs(503, F.UDO, "unconditional_drop_overload"), "circuit_open", id="drop-overload"
    ),
]


# Issue 19: Envoy's details the catalogue did not know, as the threads and Envoy's source
# give them (tests/unit/data/envoy_response_code_details.txt, design.md's recorded strings).
ISTIO_DENY = "rbac_access_denied_matched_policy[ns[foo]-policy[deny-all]-rule[0]]"
ISSUE19_ROWS = [
    pytest.param(attrs(403, 0, ISTIO_DENY), "authz_policy_denied", id="istio-authz-policy"),
    pytest.param(
        attrs(403, 0, "rbac_access_denied_matched_policy[none]"),
        "authz_policy_denied",
        id="rbac-default-deny",
    ),
    pytest.param(
        attrs(401, 0, "jwt_authn_access_denied{Jwt_is_expired}"), "jwt_rejected", id="jwt"
    ),
    pytest.param(attrs(431, F.DPE, "http1.headers_too_large"), "request_too_large", id="431"),
    pytest.param(attrs(413, 0, "request_payload_too_large"), "request_too_large", id="413"),
    pytest.param(
        Evidence(status=431, upstream_answered=False),
        "request_too_large",
        id="431-without-attributes",
    ),
    pytest.param(attrs(500, 0, "response_payload_too_large"), "response_too_large", id="resp-413"),
    pytest.param(attrs(403, 0, "upgrade_failed"), "upgrade_rejected", id="upgrade"),
    pytest.param(attrs(503, 0, "overload"), "overload_shed", id="overload"),
    pytest.param(attrs(503, 0, "direct_response"), "configured_response", id="direct-503"),
    pytest.param(attrs(408, 0, "request_header_timeout"), "client_timeout", id="header-timeout"),
    pytest.param(attrs(408, 0, "max_duration_timeout"), "stream_duration_exceeded", id="max-dur"),
    pytest.param(
        attrs(500, 0, "filter_removed_required_request_headers"), "filter_error", id="filter"
    ),
    pytest.param(attrs(403, 0, "csrf_origin_mismatch"), "origin_rejected", id="csrf"),
    # BoringSSL reasons outside the old list (tests/unit/data/boringssl_ssl_reasons.txt).
    pytest.param(
        failed(tls(268436555, "TLSV1_ALERT_INTERNAL_ERROR")), "tls_peer_alert", id="peer-alert"
    ),
    pytest.param(
        failed(tls(268435617, "NO_CIPHERS_AVAILABLE")), "tls_config_error", id="local-no-cipher"
    ),
    pytest.param(
        failed(tls(268435628, "DECRYPTION_FAILED_OR_BAD_RECORD_MAC")),
        "tls_protocol_error",
        id="bad-record-mac",
    ),
    pytest.param(failed(tls(268435646, "NO_SHARED_GROUP")), "tls_version_mismatch", id="group"),
    # The findings: a 431 with "overflow" in its details is no circuit breaker; an upstream's
    # own x-envoy-overloaded on a 200 is no failure.
    pytest.param(
        attrs(431, F.DPE, "http1.header_overflow"),
        "downstream_protocol_error",
        id="431-overflow-word",
    ),
]


class TestIssue19Cases:
    @pytest.mark.parametrize(("evidence", "reason"), ISSUE19_ROWS)
    def test_case_gets_its_reason(self, evidence: Evidence, reason: str) -> None:
        """Each of Envoy's details the catalogue did not know gets a reason of its own."""
        diagnosis = classify(evidence)
        assert diagnosis is not None
        assert diagnosis.reason == reason

    def test_istio_policy_is_decoded_into_evidence_and_hint(self) -> None:
        """The AuthorizationPolicy's namespace, name and rule are named."""
        diagnosis = classify(attrs(403, 0, ISTIO_DENY))
        assert diagnosis is not None
        assert ("policy", "foo/deny-all rule 0") in diagnosis.evidence
        assert "foo/deny-all (rule 0)" in diagnosis.hint

    def test_app_error_hint_names_the_upstreams_sidecar(self) -> None:
        """A via_upstream 503 may be the upstream's sidecar's own reply: the hint says so."""
        diagnosis = classify(attrs(503, 0, "via_upstream"))
        assert diagnosis is not None and "its own sidecar" in diagnosis.hint

    def test_upstream_overloaded_header_on_200_is_no_failure(self) -> None:
        """An upstream's own x-envoy-overloaded on a 200 gets no diagnosis, no warning."""
        assert classify(Evidence(status=200, upstream_answered=True, overloaded=True)) is None


class TestIssue10Cases:
    """The app's answer is the app's; the config decides a closed connection; filters have reasons."""

    @pytest.mark.parametrize(("evidence", "reason"), ISSUE10_ROWS)
    def test_case_gets_its_reason(self, evidence: Evidence, reason: str) -> None:
        """Each case of the issue is classified with its reason."""
        diagnosis = classify(evidence)
        assert diagnosis is not None
        assert diagnosis.reason == reason

    def test_retry_flags_are_named_on_the_apps_error(self) -> None:
        """A retried app error keeps the retry flags in the evidence and names them in the hint."""
        diagnosis = classify(attrs(200, F.URX, "via_upstream", grpc_status=14))
        assert diagnosis is not None
        assert dict(diagnosis.evidence)["flags"] == "URX"
        assert "URX" in diagnosis.hint

    @pytest.mark.parametrize(
        "evidence",
        [
            pytest.param(attrs(200, 0, "cors_response"), id="cors-preflight"),
            pytest.param(attrs(200, 0, "admin_filter_response"), id="admin-filter"),
            pytest.param(attrs(200, F.DI, "via_upstream"), id="delay-only"),
            pytest.param(attrs(404, 0, "via_upstream"), id="app-404"),
            pytest.param(attrs(200, F.URX, "via_upstream"), id="retried-then-ok"),
            pytest.param(
                attrs(200, 0, "via_upstream", unknown_flags="bit40"), id="unknown-bit-only"
            ),
        ],
    )
    def test_not_a_failure(self, evidence: Evidence) -> None:
        """A filter's non-failure answer, or an upstream success, gets no diagnosis."""
        assert classify(evidence) is None

    def test_unknown_flag_bits_are_evidence(self) -> None:
        """Unknown bits leave the known flags working and appear as `unknown_flags`."""
        diagnosis = classify(attrs(503, F.UH, "no_healthy_upstream", unknown_flags="bit40"))
        assert diagnosis is not None
        assert diagnosis.reason == "no_healthy_upstream"
        assert dict(diagnosis.evidence)["unknown_flags"] == "bit40"

    def test_closed_connection_names_the_transport(self) -> None:
        """The `tls` parameter says what decided a closed connection."""
        diagnosis = classify(attrs(503, F.UC, UC_DETAILS, cluster_tls=True))
        assert diagnosis is not None
        assert dict(diagnosis.evidence)["tls"] == "on"


class TestFlagParsing:
    def test_split_flags_keeps_known_names(self) -> None:
        """A log's unknown flag name is returned apart; the known ones still count."""
        assert F.split_flags("UH,XYZ") == (F.UH, ("XYZ",))

    def test_unknown_bits_are_named_by_position(self) -> None:
        """Bits above the table are named `bitN`."""
        assert F.unknown_bits(F.UH | 1 << 40 | 1 << 31) == "bit31,bit40"
        assert F.unknown_bits(F.ALL_FLAGS) == ""

    def test_table_width_is_envoys(self) -> None:
        """ALL_FLAGS covers exactly the enum entries quoted from Envoy's source."""
        text = (Path(__file__).parent / "data" / "envoy_response_flags.txt").read_text()
        enum = text.split("[enum]\n")[1].split("[names]")[0].split()
        assert (1 << len(enum)) - 1 == F.ALL_FLAGS


# For every reason, the nearest look-alike evidence that must NOT give it.
NEAR_MISSES = [
    pytest.param(
        failed(tls(268436504, "TLSV1_ALERT_UNKNOWN_CA")),
        "tls_peer_alert",
        id="alert-about-our-cert",
    ),
    pytest.param(
        failed(tls(268435640, "NO_SHARED_CIPHER")),
        "tls_config_error",
        id="shared-cipher-is-negotiation",
    ),
    pytest.param(
        failed(tls(268435703, "WRONG_VERSION_NUMBER")),
        "tls_protocol_error",
        id="plaintext-is-not-protocol",
    ),
    pytest.param(attrs(403, F.UAEX, "ext_authz_denied"), "authz_policy_denied", id="authz-ext"),
    pytest.param(attrs(401, 0, "via_upstream"), "jwt_rejected", id="jwt-app-401"),
    pytest.param(attrs(400, F.DPE, "http1.codec_error"), "request_too_large", id="too-large-codec"),
    pytest.param(attrs(500, 0, "via_upstream"), "response_too_large", id="resp-large-app"),
    pytest.param(attrs(503, F.UC, UC_DETAILS), "upgrade_rejected", id="upgrade-uc"),
    pytest.param(attrs(503, F.UO, reset("overflow")), "overload_shed", id="overload-uo"),
    pytest.param(attrs(200, 0, "direct_response"), "configured_response", id="direct-200"),
    pytest.param(attrs(504, F.UT, "response_timeout"), "client_timeout", id="client-timeout-ut"),
    pytest.param(attrs(408, F.SI, "stream_idle_timeout"), "stream_duration_exceeded", id="dur-si"),
    pytest.param(attrs(503, 0, "ext_authz_invalid"), "filter_error", id="filter-authz"),
    pytest.param(attrs(403, 0, "cors_response"), "origin_rejected", id="origin-cors"),
    pytest.param(
        attrs(503, F.UO | F.URX, reset("overflow")),
        "upstream_app_error",
        id="app-not-on-local-reply",
    ),
    pytest.param(attrs(503, 0, "via_upstream"), "upstream_failure", id="app_error-is-not-envoy"),
    pytest.param(attrs(503, F.UO, "via_upstream"), "circuit_open", id="circuit-not-on-app-503"),
    pytest.param(attrs(429, F.URX, "via_upstream"), "rate_limited", id="rate-not-on-app-429"),
    pytest.param(
        attrs(503, 0, "via_upstream", cluster="PassthroughCluster"),
        "host_not_in_mesh",
        id="host-app",
    ),
    pytest.param(
        attrs(503, F.UC, UC_DETAILS, cluster="InboundPassthroughCluster"),
        "host_not_in_mesh",
        id="host-inbound",
    ),
    pytest.param(
        failed(tls(268435581, "CERTIFICATE_VERIFY_FAILED")), "upstream_cert_expired", id="expired"
    ),
    pytest.param(
        failed(tls(268436501, "SSLV3_ALERT_CERTIFICATE_EXPIRED")),
        "upstream_cert_expired",
        id="expired-alert",
    ),
    pytest.param(
        failed(tls(268435581, "CERTIFICATE_VERIFY_FAILED")), "upstream_san_mismatch", id="san"
    ),
    pytest.param(
        failed(tls(268436498, "SSLV3_ALERT_BAD_CERTIFICATE")),
        "upstream_cert_untrusted",
        id="untrusted",
    ),
    pytest.param(
        attrs(503, F.UC, UC_DETAILS, cluster_tls=True), "upstream_requires_mtls", id="mtls-on-tls"
    ),
    pytest.param(
        failed(tls(268435581, "CERTIFICATE_VERIFY_FAILED")),
        "client_cert_rejected",
        id="client-cert",
    ),
    pytest.param(failed(HELLO_REFUSED_TFR, cluster_sni="x"), "sni_rejected", id="sni-with-sni"),
    pytest.param(failed(HELLO_REFUSED_TFR), "upstream_requires_mtls", id="mtls-on-hello"),
    pytest.param(
        failed(tls(268436526, "TLSV1_ALERT_PROTOCOL_VERSION")), "alpn_mismatch", id="alpn"
    ),
    pytest.param(
        failed(tls(268436576, "TLSV1_ALERT_NO_APPLICATION_PROTOCOL")),
        "tls_version_mismatch",
        id="ver",
    ),
    pytest.param(
        failed(tls(268435581, "CERTIFICATE_VERIFY_FAILED")), "upstream_not_tls", id="not-tls"
    ),
    pytest.param(
        failed("TLS error: Secret is not supplied by SDS"), "tls_handshake_rejected", id="sds"
    ),
    pytest.param(
        failed(tls(268435703, "WRONG_VERSION_NUMBER")), "sds_secret_missing", id="sds-miss"
    ),
    pytest.param(attrs(503, F.UF, reset("connection_timeout")), "upstream_refused", id="refused"),
    pytest.param(
        failed("delayed connect error: Connection refused"),
        "upstream_connect_timeout",
        id="timeout",
    ),
    pytest.param(attrs(503, F.UH, "no_healthy_upstream"), "dns_failure", id="dns"),
    pytest.param(attrs(503, F.NR, ""), "no_route", id="nr-503"),
    pytest.param(attrs(404, F.NR, "route_not_found"), "cluster_not_found", id="nr-404"),
    pytest.param(attrs(503, F.UO, reset("overflow")), "no_healthy_upstream", id="uh"),
    pytest.param(attrs(503, F.UH, "no_healthy_upstream"), "circuit_open", id="circuit"),
    pytest.param(
        attrs(429, 0, "via_upstream", upstream_answered=True), "rate_limited", id="rl-app"
    ),
    pytest.param(attrs(401, 0, "via_upstream"), "ext_authz_denied", id="authz-app"),
    pytest.param(
        attrs(503, F.DI | F.UT, "response_timeout"), "fault_injected", id="delay-then-timeout"
    ),
    pytest.param(attrs(400, F.DPE, "http1.codec_error"), "invalid_request_headers", id="ih"),
    pytest.param(attrs(502, F.UPE, reset("protocol_error")), "downstream_protocol_error", id="dpe"),
    pytest.param(attrs(400, F.DPE, "http1.codec_error"), "protocol_mismatch", id="upe"),
    pytest.param(attrs(408, F.SI, "stream_idle_timeout"), "upstream_timeout", id="ut"),
    pytest.param(attrs(504, F.UT, "response_timeout"), "stream_idle_timeout", id="si"),
    pytest.param(
        attrs(503, F.UC, UC_DETAILS, cluster_tls=False, repeated_close=True),
        "upstream_connection_closed",
        id="closed-unknown",
    ),
    pytest.param(attrs(503, F.UC, UC_DETAILS), "upstream_reset", id="reset"),
    pytest.param(attrs(503, F.UR, reset("remote_reset")), "client_disconnected", id="client"),
    pytest.param(attrs(503, F.UH, "no_healthy_upstream"), "upstream_failure", id="failure"),
]


class TestNearMisses:
    def test_every_reason_has_a_near_miss(self) -> None:
        """The table below covers each reason of the catalogue."""
        assert {case.values[1] for case in NEAR_MISSES} == set(HINTS)

    @pytest.mark.parametrize(("evidence", "reason"), NEAR_MISSES)
    def test_look_alike_does_not_get_the_reason(self, evidence: Evidence, reason: str) -> None:
        """The nearest look-alike evidence is not given this reason."""
        diagnosis = classify(evidence)
        assert diagnosis is None or diagnosis.reason != reason
