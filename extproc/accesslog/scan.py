"""Evidence wherever it stands: the reader for lines in no known format, and pasted text.

Strategy: each kind of evidence has its own small patterns, tried in order of trust
(a labelled field such as `status=503` before a status guessed from its position), and
the first that matches wins. Evidence has a grammar of its own that rarely occurs by
chance: response code details (`upstream_reset_before_response_started{...}` or a name
Envoy defines), flags made only of Envoy's flag names, BoringSSL's
`OPENSSL_internal:REASON`, Istio's cluster names (`outbound|PORT|SUBSET|FQDN`). Envoy's
local-reply bodies and gRPC client errors carry the reset reason in words; they are
turned back into the code details Envoy would have logged.

Every pattern has bounded repetition and no nested quantifier, so a search costs at most
a constant per character of input: a test walks these patterns and checks it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from extproc.accesslog.formats import is_flags_token

# Envoy's core response code details (envoy/stream_info/stream_info.h,
# ResponseCodeDetailValues, envoyproxy/envoy 0034b6f), the ones a log line can show alone.
CORE_DETAILS: tuple[str, ...] = (
    "via_upstream",
    "request_payload_too_large",
    "response_payload_too_large",
    "request_payload_exceeded_retry_buffer_limit",
    "stream_idle_timeout",
    "max_duration_timeout",
    "request_overall_timeout",
    "request_header_timeout",
    "overload",
    "low_version",
    "missing_host_header",
    "request_headers_failed_strict_check",
    "missing_path_rejected",
    "invalid_path",
    "absolute_path_rejected",
    "path_normalization_failed",
    "upgrade_failed",
    "websocket_handshake_unsuccessful",
    "route_configuration_not_found",
    "route_not_found",
    "direct_response",
    "cluster_not_found",
    "maintenance_mode",
    "drop_overload",
    "unconditional_drop_overload",
    "no_healthy_upstream",
    "response_timeout",
    "upstream_per_try_timeout",
    "upstream_per_try_idle_timeout",
    "upstream_max_stream_duration_reached",
    "upstream_reset_before_response_started",
    "upstream_reset_after_response_started",
    "filter_chain_not_found",
    "downstream_remote_disconnect",
    "duration_timeout",
    "downstream_header_timeout",
    "admin_filter_response",
    "internal_redirect",
)
# Details set by filters, as public threads show them (not checked against Envoy's source).
FILTER_DETAILS: tuple[str, ...] = (
    "ext_authz_denied",
    "ext_authz_error",
    "request_rate_limited",
    "local_rate_limited",
    "fault_filter_abort",
    "cors_response",
    "upstream_response_timeout",
    "rbac_access_denied",
)
_DETAIL_NAMES = "|".join(sorted(CORE_DETAILS + FILTER_DETAILS, key=len, reverse=True))

# gRPC status names (grpc/grpc doc/statuscodes.md), as clients print them.
GRPC_CODES: dict[str, int] = {
    "ok": 0,
    "canceled": 1,
    "cancelled": 1,
    "unknown": 2,
    "invalidargument": 3,
    "deadlineexceeded": 4,
    "notfound": 5,
    "alreadyexists": 6,
    "permissiondenied": 7,
    "resourceexhausted": 8,
    "failedprecondition": 9,
    "aborted": 10,
    "outofrange": 11,
    "unimplemented": 12,
    "internal": 13,
    "unavailable": 14,
    "dataloss": 15,
    "unauthenticated": 16,
}
# The error names clients print: grpc/grpc's upper-case names (Java's `Status.Code`,
# grpc-js's `Status`, Python's `StatusCode`) and grpc-go's `codes.Code.String()` names.
# `OK` is left out: it is no error, and `OK: ` is common prose.
_UPPER_NAMES = (
    "CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|ALREADY_EXISTS|"
    "PERMISSION_DENIED|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|ABORTED|OUT_OF_RANGE|"
    "UNIMPLEMENTED|INTERNAL|UNAVAILABLE|DATA_LOSS|UNAUTHENTICATED"
)
_GO_NAMES = (
    "Canceled|Unknown|InvalidArgument|DeadlineExceeded|NotFound|AlreadyExists|"
    "PermissionDenied|ResourceExhausted|FailedPrecondition|Aborted|OutOfRange|"
    "Unimplemented|Internal|Unavailable|DataLoss|Unauthenticated"
)

_LABEL_END = r"""["']?\s{0,3}[=:]\s{0,3}["']?"""


def _labelled(names: str, value: str) -> re.Pattern[str]:
    """A `name=value` / `"name": value` pattern; the value is group 1."""
    return re.compile(rf"""(?<![\w-])(?:{names}){_LABEL_END}({value})""", re.IGNORECASE)


_TIME = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d{1,9})?(?:Z|[+-]\d\d:?\d\d)?")
_STATUS_PATTERNS = (
    _labelled("response_code|status_code|status|responsecode|code", r"\d{3}(?!\d)"),
    # After the request line or in a status line: `HTTP/1.1" 503`, `HTTP/2 503`.
    re.compile(r"\bHTTP/\d(?:\.\d)?\"?\s{1,3}(\d{3})\b"),
    # A status followed by flags, wherever the line was cut: `503 UF,URX "-" ...`.
    re.compile(r"(?<![\w.:/-])([1-5]\d\d)\s{1,3}(?=(?:[A-Z]{2,5},){0,8}[A-Z]{2,5}(?:\s|$))"),
)
# `- - -" 0` on a TCP proxy line: no HTTP status at all.
_TCP_STATUS = re.compile(r"\"- - -\"\s{1,3}0\b")
_FLAGS_PATTERNS = (
    _labelled("response_flags|response_flag|flags", r"[A-Za-z,|-]{1,80}"),
    re.compile(r"\b\d{3}\s{1,3}([A-Z][A-Z,|]{0,80}|-)(?=[\s\"',;]|$)"),
)
_FLAG_TOKEN = re.compile(r"(?<![\w.|/-])([A-Z]{2,5}(?:,[A-Z]{2,5}){0,8})(?![\w.|/-])")
_DETAILS_PATTERNS = (
    _labelled(
        "response_code_details|status_details|code_details",
        r"[a-z][a-z0-9_]{0,80}(?:\{[^{}\s\"]{0,400}\})?",
    ),
    re.compile(rf"\b((?:{_DETAIL_NAMES})(?:\{{[^{{}}\s\"]{{0,400}}\}}|\[[^\[\]\s\"]{{0,200}}\])?)"),
    re.compile(r"\b(rbac_access_denied_matched_policy\[[^\[\]\s\"]{0,200}\])"),
)
_TFR_PATTERNS = (
    _labelled(
        "upstream_transport_failure_reason|transport_failure_reason",
        r"[^\"\n]{1,400}?(?=\"|$|\s\w{1,40}=)",
    ),
    re.compile(r"transport failure reason: ([^\n\"]{1,400})"),
    re.compile(r"(TLS[ _]error:[^\"\n]{0,400}?OPENSSL_internal:[^\"\s}]{1,200})"),
    re.compile(r"((?:delayed|immediate)[ _]connect[ _]error:[ _]?[\w ]{1,40}?)(?=[\"}|,]|$)"),
)
_CLUSTER_PATTERNS = (
    re.compile(r"(?<![\w.])((?:outbound|inbound)\|\d{0,5}\|[^|\s\"',]{0,253}\|[^\s\"',|]{0,253})"),
    re.compile(r"\b((?:Inbound)?PassthroughCluster(?:Ipv[46])?|BlackHoleCluster)\b"),
    _labelled("upstream_cluster|cluster_name|cluster", r"[^\s\"',]{1,253}"),
)
_ROUTE = _labelled("route_name|route", r"[^\s\"',]{1,253}")
_HOST_PATTERNS = (
    _labelled(":authority|authority|host", r"[^\s\"',]{1,253}"),
    re.compile(r"^> Host: (\S{1,253})", re.MULTILINE),
)
_UPSTREAM_HOST = _labelled("upstream_host|upstream_address", r"[^\s\"',]{1,253}")
_SERVICE_TIME = _labelled("x-envoy-upstream-service-time|upstream_service_time", r"\d{1,12}|-|null")
_GRPC_STATUS = _labelled("grpc-status|grpc_status", r"\d{1,2}")
# A gRPC client's error, as each client prints it; each form names its group:
# grpc-go `rpc error: code = Unavailable desc = …` (internal/status/status.go, String);
# grpc-js `14 UNAVAILABLE: …` (packages/grpc-js/src/call.ts); Java `UNAVAILABLE: …`,
# also after `io.grpc.StatusRuntimeException: ` (api/src/main/java/io/grpc/Status.java,
# formatThrowableMessage); Python `StatusCode.UNAVAILABLE`; and a Go name with a colon
# (`Unavailable: upstream connect error …`) where Envoy's own words follow.
_GRPC_ERROR = re.compile(
    rf"rpc error: code = (?P<go>\w{{2,20}}) desc ="
    rf"|\b(?P<number>\d{{1,2}}) (?P<js>{_UPPER_NAMES}):"
    rf"|\bStatusCode\.(?P<python>{_UPPER_NAMES})\b"
    rf"|(?<![\w.])(?P<java>{_UPPER_NAMES}): "
    rf"|(?<![\w.])(?P<short>{_GO_NAMES}): (?=upstream |no healthy upstream)"
)
# The doctor's own `dr="ns/name"` parameter (JSON-escaped in a JSON log), or Istio's metadata.
_DR = re.compile(r"""(?:\bdr=\\?"?|/destination-rule/)([A-Za-z0-9.\-/]{1,253})""")
_DR_NS = re.compile(r"/namespaces/([A-Za-z0-9.\-]{1,63})/destination-rule/([A-Za-z0-9.\-]{1,253})")

# Envoy's local-reply bodies (recorded from Envoy 1.40; see tests/corpus/lines/), in
# words, and the code details that stand behind them.
_RESET_BODY = re.compile(
    r"upstream connect error or disconnect/reset before headers\."
    r"(?:\s{0,3}(?:retried and the latest )?reset reason: ([a-z ]{1,40}))?"
)
_BODY_DETAILS: tuple[tuple[re.Pattern[str], str, int], ...] = (
    (re.compile(r"\bno healthy upstream\b"), "no_healthy_upstream", 503),
    (re.compile(r"\bupstream request timeout\b"), "response_timeout", 504),
    (re.compile(r"\bRBAC: access denied\b"), "rbac_access_denied", 403),
    (re.compile(r"\bfault filter abort\b"), "fault_filter_abort", 503),
)


@dataclass(slots=True)
class Found:
    """What the scanner found, field by field; '' or None where nothing was."""

    status: int | None = None
    flags: str = ""
    details: str = ""
    tfr: str = ""
    cluster: str = ""
    route: str = ""
    host: str = ""
    upstream_host: str = ""
    service_time: str | None = None
    grpc_status: int | None = None
    time: str = ""
    destination_rule: str = ""
    doctor_reason: str = ""
    doctor_hint: str = ""
    used: list[str] = field(default_factory=list)


def scan(text: str) -> Found:
    """Every piece of evidence `text` holds, wherever it stands."""
    found = Found()
    _scan_status(text, found)
    _scan_flags(text, found)
    found.details = _first(_DETAILS_PATTERNS, text)
    found.tfr = _first(_TFR_PATTERNS, text)
    found.cluster = _first(_CLUSTER_PATTERNS, text)
    found.route = _group(_ROUTE, text)
    found.host = _first(_HOST_PATTERNS, text)
    found.upstream_host = _group(_UPSTREAM_HOST, text)
    service_time = _group(_SERVICE_TIME, text)
    found.service_time = service_time or None
    grpc = _group(_GRPC_STATUS, text)
    found.grpc_status = int(grpc) if grpc else None
    time = _TIME.search(text)
    found.time = time.group(0) if time else ""
    found.destination_rule = destination_rule(text)
    _scan_pasted(text, found)
    doctor = _DOCTOR.search(text)
    if doctor:
        found.doctor_reason = doctor["header"] or doctor["reason"] or doctor["first_reason"] or ""
        found.doctor_hint = doctor["hint"] or doctor["first_hint"] or ""
    if not (_envoy_shaped(text, found) or found.doctor_reason):
        found.status, found.flags, found.grpc_status = None, "", None
    return found


# The doctor's own diagnosis in a line: its header (`x-extproc-diagnosis: REASON;…`), or
# its metadata as `%DYNAMIC_METADATA(extproc_doctor)%` prints it in a text format. Envoy
# 1.40 prints the namespace's keys sorted (`{"actions":…,"cluster":…,"hint":…,"reason":…}`,
# tests/envoy/test_access_log_metadata.py), so the hint comes before the reason there, with
# other keys between, never a brace; a printer that keeps the written order puts the
# reason first. Each gap is bounded, and a brace ends it: the scan stays linear.
_DOCTOR = re.compile(
    r"x-extproc-diagnosis\W{1,4}(?P<header>[a-z_]{3,40})"
    r'|\{[^{}]{0,2000}?"hint":\s?"(?P<hint>[^"\\]{0,400})"'
    r'[^{}]{0,2000}?"reason":\s?"(?P<reason>[a-z_]{3,40})"'
    r'|\{"reason":\s?"(?P<first_reason>[a-z_]{3,40})",\s?"hint":\s?"(?P<first_hint>[^"\\]{0,400})'
)

# Envoy-shaped structure. Without one of these a status, a flag word or a gRPC code is
# no evidence: "502 UH oh", "Washington DC office returned 500", an nginx line or an
# application's own JSON `{"status": 503}` say nothing about Envoy.
_LABELLED_FLAGS = _labelled("response_flags|response_flag", r"[A-Za-z,|-]{1,80}")
_REQUEST_LINE_FLAGS = re.compile(
    r"HTTP/\d(?:\.\d)?\"?\s{1,3}\d{3}\s{1,3}([A-Z]{2,5}(?:,[A-Z]{2,5}){0,8}|-)(?=\s)"
)


def _envoy_shaped(text: str, found: Found) -> bool:
    """Whether the text shows Envoy's own structure: code details or a transport failure
    reason (Envoy's vocabulary), an Istio/Envoy cluster name, a labelled flags field, or
    Envoy's `"METHOD PATH PROTOCOL" STATUS FLAGS` (nginx logs bytes where Envoy logs flags)."""
    if found.details or found.tfr:
        return True
    if _CLUSTER_PATTERNS[0].search(text) or _CLUSTER_PATTERNS[1].search(text):
        return True
    return any(
        m is not None and (m.group(1) == "-" or is_flags_token(m.group(1), any_known=True))
        for m in (_LABELLED_FLAGS.search(text), _REQUEST_LINE_FLAGS.search(text))
    )


def _scan_status(text: str, found: Found) -> None:
    if _TCP_STATUS.search(text):
        return
    status = _first(_STATUS_PATTERNS, text)
    found.status = int(status) if status else None


def _scan_flags(text: str, found: Found) -> None:
    """Flags: labelled, else right after the status, else any token of known flag names only."""
    for pattern in _FLAGS_PATTERNS:
        for m in pattern.finditer(text):
            # Where flags stand, one known name is enough: a newer Envoy may add others.
            if is_flags_token(m.group(1), any_known=True):
                found.flags = m.group(1)
                return
    for m in _FLAG_TOKEN.finditer(text):
        if is_flags_token(m.group(1)):
            found.flags = m.group(1)
            return


def _scan_pasted(text: str, found: Found) -> None:
    """A local-reply body or a gRPC client error: the details Envoy would have logged."""
    grpc = _GRPC_ERROR.search(text)
    if grpc and found.grpc_status is None:
        found.grpc_status = _grpc_code(grpc)
    if found.details:
        return
    reset = _RESET_BODY.search(text)
    if reset:
        reason = (reset.group(1) or "").strip().replace(" ", "_")
        found.details = "upstream_reset_before_response_started" + (
            f"{{{reason}}}" if reason else ""
        )
        found.status = found.status or (None if found.grpc_status else 503)
        return
    for pattern, details, status in _BODY_DETAILS:
        if pattern.search(text):
            found.details = details
            found.status = found.status or (None if found.grpc_status else status)
            return


def _grpc_code(match: re.Match[str]) -> int | None:
    """The status code a gRPC error names: its number, else its name (any form)."""
    if match["number"]:
        return int(match["number"])
    name = next(name for name in match.groups() if name)
    return GRPC_CODES.get(name.replace("_", "").lower())


def destination_rule(text: str) -> str:
    """`namespace/name` of a DestinationRule named in the text (by Istio or the doctor)."""
    m = _DR_NS.search(text)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    m = _DR.search(text)
    return m.group(1) if m else ""


def _first(patterns: tuple[re.Pattern[str], ...], text: str) -> str:
    for pattern in patterns:
        value = _group(pattern, text)
        if value:
            return value
    return ""


def _group(pattern: re.Pattern[str], text: str) -> str:
    m = pattern.search(text)
    if not m:
        return ""
    value = m.group(1) or ""
    return "" if value in ("-", "null") else value


# Every compiled pattern of this module, for the linear-time check.
PATTERNS: tuple[re.Pattern[str], ...] = (
    _TIME,
    *_STATUS_PATTERNS,
    _TCP_STATUS,
    *_FLAGS_PATTERNS,
    _FLAG_TOKEN,
    *_DETAILS_PATTERNS,
    *_TFR_PATTERNS,
    *_CLUSTER_PATTERNS,
    _ROUTE,
    *_HOST_PATTERNS,
    _UPSTREAM_HOST,
    _SERVICE_TIME,
    _GRPC_STATUS,
    _GRPC_ERROR,
    _DR,
    _DR_NS,
    _RESET_BODY,
    *(p for p, _, _ in _BODY_DETAILS),
    _LABELLED_FLAGS,
    _REQUEST_LINE_FLAGS,
    _DOCTOR,
)
