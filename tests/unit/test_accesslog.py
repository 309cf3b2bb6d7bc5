"""Tests for extproc.accesslog: pasted Envoy and Istio access-log lines become Evidence."""

from __future__ import annotations

import json

import pytest

from extproc import flags as F
from extproc.accesslog import TEXT_FORMATS, AccessLogError, parse_access_log_line
from extproc.diagnosis import Evidence, classify

CLUSTER = "outbound|9080||reviews.default.svc.cluster.local"
WRONG_VERSION = (
    "TLS_error:|268435703:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER:TLS_error_end"
)


def istio(
    status_flags_details: str,
    reason: str = "-",
    service_time: str = "-",
    cluster: str = CLUSTER,
    route: str = "default",
) -> str:
    """An Istio default-format line; the first argument is `STATUS FLAGS DETAILS TERMINATION`."""
    return (
        f'[2026-11-20T10:00:00.000Z] "GET /api HTTP/1.1" {status_flags_details} "{reason}" '
        f'0 91 1 {service_time} "-" "curl/8.5.0" "5c1b6f0e-2d1a-4c3b-9e8f-0a1b2c3d4e5f" '
        f'"reviews:9080" "10.1.2.3:9080" {cluster} - 10.96.0.10:9080 10.1.0.5:41234 - {route}'
    )


def envoy(status_flags: str, service_time: str = "-") -> str:
    """An Envoy default-format line; the argument is `STATUS FLAGS`."""
    return (
        f'[2026-11-20T10:00:00.000Z] "GET /api HTTP/1.1" {status_flags} 0 91 12 {service_time} '
        '"-" "curl/8.5.0" "5c1b6f0e-2d1a-4c3b-9e8f-0a1b2c3d4e5f" "reviews:9080" "10.1.2.3:9080"'
    )


ISTIO_NOT_TLS = istio(
    "503 UF upstream_reset_before_response_started{remote_connection_failure|TLS_error:|"
    "268435703:SSL_routines:OPENSSL_internal:WRONG_VERSION_NUMBER:TLS_error_end} -",
    WRONG_VERSION,
)


def reason(line: str) -> str | None:
    """The catalogue reason for one log line, or None when Envoy did not fail it."""
    diagnosis = classify(parse_access_log_line(line))
    return diagnosis.reason if diagnosis else None


class TestIstioTextFormat:
    """Istio's default proxy text format, as `kubectl logs -c istio-proxy` prints it."""

    def test_reads_every_evidence_field(self) -> None:
        """Status, flags, details, transport reason, cluster, upstream, route and host are read."""
        ev = parse_access_log_line(ISTIO_NOT_TLS)
        assert ev == Evidence(
            status=503,
            flags=F.UF,
            code_details=(
                "upstream_reset_before_response_started{remote_connection_failure|TLS_error:|"
                "268435703:SSL_routines:OPENSSL_internal:WRONG_VERSION_NUMBER:TLS_error_end}"
            ),
            transport_failure_reason=WRONG_VERSION,
            cluster=CLUSTER,
            upstream_address="10.1.2.3:9080",
            route="default",
            host="reviews:9080",
            upstream_answered=False,
            has_attributes=True,
        )

    def test_cluster_name_with_pipes_survives(self) -> None:
        """An `outbound|PORT||FQDN` cluster name is kept intact, pipes and all."""
        line = istio("503 - via_upstream -", cluster="outbound|8080||svc.ns.svc.cluster.local")
        assert parse_access_log_line(line).cluster == "outbound|8080||svc.ns.svc.cluster.local"

    def test_dashes_mean_empty(self) -> None:
        """`-` in the flags, details, transport reason, cluster and route becomes empty."""
        ev = parse_access_log_line(istio("200 - - -", cluster="-", route="-"))
        assert (ev.flags, ev.code_details, ev.transport_failure_reason, ev.cluster, ev.route) == (
            0,
            "",
            "",
            "",
            "",
        )

    def test_several_flags_become_one_bitmask(self) -> None:
        """A comma-separated flags field such as `UF,URX` becomes the OR of the bits."""
        line = istio("503 UF,URX upstream_reset_before_response_started{connection_failure} -")
        assert parse_access_log_line(line).flags == F.UF | F.URX

    def test_service_time_means_upstream_answered(self) -> None:
        """A logged upstream service time marks the response as the upstream's own."""
        assert parse_access_log_line(
            istio("503 - via_upstream -", service_time="12")
        ).upstream_answered

    def test_tcp_line_without_response_code(self) -> None:
        """A TCP proxy line (`"- - -"`, status 0) has no status but keeps its flags."""
        line = istio("0 UF,URX - -", reason="delayed_connect_error:_Connection_refused")
        line = line.replace('"GET /api HTTP/1.1"', '"- - -"')
        ev = parse_access_log_line(line)
        assert (ev.status, ev.flags) == (None, F.UF | F.URX)

    def test_trailing_newline_and_blanks_are_ignored(self) -> None:
        """A line pasted with its trailing newline parses like the bare line."""
        assert parse_access_log_line(ISTIO_NOT_TLS + "\r\n") == parse_access_log_line(ISTIO_NOT_TLS)


class TestIstioTextDiagnosis:
    """End to end: an Istio line through `classify` gives the expected catalogue reason."""

    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            pytest.param(ISTIO_NOT_TLS, "upstream_not_tls", id="wrong-version-number"),
            pytest.param(
                istio("503 UC upstream_reset_before_response_started{connection_termination} -"),
                "upstream_requires_mtls",
                id="connection-termination",
            ),
            pytest.param(
                istio("404 NR route_not_found -", cluster="-", route="-"), "no_route", id="no-route"
            ),
            pytest.param(
                istio("503 - via_upstream -", service_time="3"), "upstream_app_error", id="app-503"
            ),
            pytest.param(
                istio(
                    "503 UF,URX upstream_reset_before_response_started{remote_connection_failure|"
                    "delayed_connect_error:_Connection_refused} -",
                    "delayed_connect_error:_Connection_refused",
                ),
                "upstream_refused",
                id="connection-refused",
            ),
            pytest.param(
                istio(
                    "503 UF upstream_reset_before_response_started{remote_connection_failure|"
                    "TLS_error:|268435581:SSL_routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:"
                    "TLS_error_end} -",
                    "TLS_error:|268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:"
                    "TLS_error_end",
                ),
                "upstream_cert_untrusted",
                id="certificate-verify-failed",
            ),
            pytest.param(
                istio("504 UT response_timeout -", service_time="-"),
                "upstream_timeout",
                id="timeout",
            ),
            pytest.param(
                istio("503 UH no_healthy_upstream -"), "no_healthy_upstream", id="no-healthy"
            ),
            pytest.param(
                istio("502 - direct_response -", cluster="BlackHoleCluster", route="block_all"),
                "host_not_in_mesh",
                id="blackhole",
            ),
            pytest.param(
                istio(
                    "503 UF upstream_reset_before_response_started{remote_connection_failure} -",
                    cluster="PassthroughCluster",
                    route="allow_any",
                ),
                "host_not_in_mesh",
                id="passthrough",
            ),
            pytest.param(istio("200 - via_upstream -", service_time="2"), None, id="success"),
        ],
    )
    def test_reason(self, line: str, expected: str | None) -> None:
        """The line's evidence classifies to the reason a human would give it."""
        assert reason(line) == expected


class TestEnvoyDefaultFormat:
    """Envoy's default text format: flags but no code details."""

    def test_reads_the_fields_it_has(self) -> None:
        """Status, flags, host and upstream are read; details, cluster and route stay empty."""
        ev = parse_access_log_line(envoy("503 UF,URX"))
        assert ev == Evidence(
            status=503,
            flags=F.UF | F.URX,
            upstream_address="10.1.2.3:9080",
            host="reviews:9080",
            upstream_answered=False,
            has_attributes=False,
        )

    def test_service_time_means_upstream_answered(self) -> None:
        """A logged upstream service time sets upstream_answered."""
        assert parse_access_log_line(envoy("503 -", service_time="11")).upstream_answered is True

    def test_is_not_mistaken_for_istio(self) -> None:
        """The default format matches only its own row of the format table."""
        line = envoy("503 UF")
        rest = line.split("503 UF ", 1)[1]
        assert [f.name for f in TEXT_FORMATS if f.tail.fullmatch(rest)] == [
            "Envoy's default format"
        ]

    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            pytest.param(envoy("503 UF,URX"), "upstream_failure", id="connect-failure"),
            pytest.param(envoy("503 -", service_time="11"), "upstream_app_error", id="app-503"),
            pytest.param(envoy("404 NR"), "no_route", id="no-route"),
            pytest.param(envoy("504 UT"), "upstream_timeout", id="timeout"),
            pytest.param(envoy("503 UH"), "no_healthy_upstream", id="no-healthy"),
            pytest.param(envoy("404 -", service_time="4"), None, id="app-404"),
            pytest.param(envoy("200 -", service_time="2"), None, id="success"),
        ],
    )
    def test_reason(self, line: str, expected: str | None) -> None:
        """The line's evidence classifies to the reason a human would give it."""
        assert reason(line) == expected


def istio_json(**overrides: object) -> str:
    """An Istio JSON-encoded line for a refused connection, with some keys overridden."""
    obj: dict[str, object] = {
        "start_time": "2026-11-20T10:00:00.000Z",
        "method": "GET",
        "path": "/api",
        "protocol": "HTTP/1.1",
        "response_code": 503,
        "response_flags": "UF,URX",
        "response_code_details": (
            "upstream_reset_before_response_started{remote_connection_failure|"
            "delayed_connect_error:_Connection_refused}"
        ),
        "connection_termination_details": None,
        "upstream_transport_failure_reason": "delayed_connect_error:_Connection_refused",
        "bytes_received": 0,
        "bytes_sent": 145,
        "duration": 1,
        "upstream_service_time": None,
        "x_forwarded_for": None,
        "user_agent": "curl/8.5.0",
        "request_id": "5c1b6f0e-2d1a-4c3b-9e8f-0a1b2c3d4e5f",
        "authority": "reviews:9080",
        "upstream_host": "10.1.2.3:9080",
        "upstream_cluster": CLUSTER,
        "upstream_local_address": None,
        "downstream_local_address": "10.96.0.10:9080",
        "downstream_remote_address": "10.1.0.5:41234",
        "requested_server_name": None,
        "route_name": "default",
    }
    obj.update(overrides)
    return json.dumps(obj)


class TestIstioJson:
    """Istio's JSON access-log encoding, one object per line."""

    def test_reads_every_evidence_field(self) -> None:
        """The JSON keys map onto the same Evidence fields as the text format."""
        ev = parse_access_log_line(istio_json())
        assert ev == Evidence(
            status=503,
            flags=F.UF | F.URX,
            code_details=(
                "upstream_reset_before_response_started{remote_connection_failure|"
                "delayed_connect_error:_Connection_refused}"
            ),
            transport_failure_reason="delayed_connect_error:_Connection_refused",
            cluster=CLUSTER,
            upstream_address="10.1.2.3:9080",
            route="default",
            host="reviews:9080",
            upstream_answered=False,
            has_attributes=True,
        )

    def test_string_values_and_dashes(self) -> None:
        """A status logged as a string is read and a `-` value counts as empty."""
        ev = parse_access_log_line(istio_json(response_code="404", response_flags="-"))
        assert (ev.status, ev.flags) == (404, 0)

    def test_numeric_service_time_means_upstream_answered(self) -> None:
        """An upstream service time logged as a number sets upstream_answered."""
        assert parse_access_log_line(istio_json(upstream_service_time=12)).upstream_answered is True

    def test_without_details_key_has_no_attributes(self) -> None:
        """A custom JSON format without response_code_details leaves has_attributes False."""
        line = json.dumps(
            {"response_code": 503, "response_flags": "-", "upstream_service_time": "9"}
        )
        ev = parse_access_log_line(line)
        assert (ev.has_attributes, ev.upstream_answered) == (False, True)

    def test_without_service_time_key_answered_is_unknown(self) -> None:
        """A JSON format that does not log the upstream service time leaves it None."""
        line = json.dumps({"response_code": 200, "response_code_details": "via_upstream"})
        assert parse_access_log_line(line).upstream_answered is None

    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            pytest.param(istio_json(), "upstream_refused", id="connection-refused"),
            pytest.param(
                istio_json(
                    response_flags="UC",
                    response_code_details=(
                        "upstream_reset_before_response_started{connection_termination}"
                    ),
                    upstream_transport_failure_reason=None,
                ),
                "upstream_requires_mtls",
                id="connection-termination",
            ),
            pytest.param(
                istio_json(
                    response_code=404,
                    response_flags="NR",
                    response_code_details="route_not_found",
                    upstream_transport_failure_reason=None,
                    upstream_cluster=None,
                    route_name=None,
                ),
                "no_route",
                id="no-route",
            ),
            pytest.param(
                istio_json(
                    response_flags="-",
                    response_code_details="via_upstream",
                    upstream_transport_failure_reason=None,
                    upstream_service_time="7",
                ),
                "upstream_app_error",
                id="app-503",
            ),
        ],
    )
    def test_reason(self, line: str, expected: str) -> None:
        """The line's evidence classifies to the reason a human would give it."""
        assert reason(line) == expected


class TestLinePrefixes:
    """Prefixes that kubectl and container runtimes put in front of the log line."""

    @pytest.mark.parametrize(
        "prefix",
        [
            pytest.param("2026-11-20T10:00:00.123456789Z ", id="kubectl-timestamps"),
            pytest.param("2026-11-20T10:00:00.123456789Z stdout F ", id="cri-log-file"),
            pytest.param("2026-11-20T10:00:00.123+01:00 ", id="offset"),
            pytest.param("[pod/reviews-v1-7d9/istio-proxy] ", id="kubectl-prefix"),
            pytest.param(
                "[pod/reviews-v1-7d9/istio-proxy] 2026-11-20T10:00:00.1Z ", id="prefix-and-time"
            ),
        ],
    )
    def test_prefix_is_skipped(self, prefix: str) -> None:
        """The prefixed text line parses like the bare line."""
        assert parse_access_log_line(prefix + ISTIO_NOT_TLS) == parse_access_log_line(ISTIO_NOT_TLS)

    def test_prefix_before_json(self) -> None:
        """A timestamp prefix before a JSON object is skipped too."""
        line = "2026-11-20T10:00:00.123456789Z " + istio_json()
        assert parse_access_log_line(line) == parse_access_log_line(istio_json())


class TestErrors:
    """Input that is no access-log line raises AccessLogError saying what was expected."""

    @pytest.mark.parametrize(
        "line",
        [
            pytest.param("", id="empty"),
            pytest.param("hello world", id="prose"),
            pytest.param(
                "2026-11-20T10:00:00.000Z info ads XDS: Pushing Services:12", id="istio-agent-log"
            ),
            pytest.param('[2026-11-20T10:00:00.000Z] "GET /api HTTP/1.1" abc UF', id="bad-status"),
        ],
    )
    def test_not_a_log_line(self, line: str) -> None:
        """A line without the `[START_TIME] "REQUEST" STATUS FLAGS` head names that head."""
        with pytest.raises(AccessLogError, match="not an Envoy access log line: expected") as err:
            parse_access_log_line(line)
        assert '[START_TIME] "METHOD PATH PROTOCOL" STATUS FLAGS ...' in str(err.value)

    def test_unknown_tail(self) -> None:
        """A line with the right head but a custom tail names both known formats."""
        line = '[2026-11-20T10:00:00.000Z] "GET /api HTTP/1.1" 503 UF "outbound|9080||reviews"'
        with pytest.raises(AccessLogError, match="match no known format") as err:
            parse_access_log_line(line)
        message = str(err.value)
        assert "Istio's default proxy format: `RESPONSE_CODE_DETAILS" in message
        assert '"UPSTREAM_TRANSPORT_FAILURE_REASON"' in message
        assert "Envoy's default format: `BYTES_RECEIVED" in message
        assert "outbound|9080||reviews" in message

    def test_truncated_istio_line(self) -> None:
        """An Istio line cut short by a terminal matches no format."""
        with pytest.raises(AccessLogError, match="match no known format"):
            parse_access_log_line(ISTIO_NOT_TLS[:200])

    def test_unknown_flag(self) -> None:
        """An unknown response flag is reported by name."""
        with pytest.raises(AccessLogError, match=r"response flags 'UF,XYZ'.*'XYZ'"):
            parse_access_log_line(envoy("503 UF,XYZ"))

    def test_error_is_a_value_error(self) -> None:
        """AccessLogError is a ValueError, so generic callers can catch it."""
        with pytest.raises(ValueError, match="not an Envoy access log line"):
            parse_access_log_line("garbage")

    @pytest.mark.parametrize(
        ("line", "match"),
        [
            pytest.param(
                '{"response_code": 503,', "not a JSON access log line: expected", id="cut"
            ),
            pytest.param('{"status": 503}', "with a response_code key, got", id="no-code"),
            pytest.param(
                '{"response_code": "abc"}', "response code 'abc' is not a number", id="nan"
            ),
            pytest.param('{"response_code": true}', "is not a number", id="bool"),
        ],
    )
    def test_bad_json(self, line: str, match: str) -> None:
        """Malformed JSON, a missing or non-numeric response_code are reported."""
        with pytest.raises(AccessLogError, match=match):
            parse_access_log_line(line)

    def test_long_input_is_excerpted(self) -> None:
        """The error message quotes at most the start of a long bad line."""
        with pytest.raises(AccessLogError) as err:
            parse_access_log_line("x" * 1000)
        assert len(str(err.value)) < 250
