"""What users paste, in; `Evidence` for the classifier, out. Never an error.

Two readers, one answer:

* `formats`: the access-log formats known exactly (Istio's text format, current and
  older; Envoy's default; Istio's and Envoy Gateway's JSON), read from both ends of the
  line so that a stray quote in a free-text field costs nothing;
* `scan`: evidence wherever it stands, for any other line or pasted text (a custom
  format, a line copied from the middle, a local-reply body, a gRPC client error,
  `curl -v` output).

`read_text` tries the first and falls back to the second, and says which evidence it
used and which access-log fields would have told more (`Reading.missing`). `summary`
reads a whole log in bounded memory.

Pure: no grpc or protobuf, like `diagnosis`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from extproc.accesslog import formats, scan
from extproc.annotate import printable
from extproc.diagnosis import Diagnosis, Evidence, classify
from extproc.flags import RESPONSE_FLAGS

__all__ = [
    "ISTIO_ACCESS_LOG_FORMAT",
    "Read",
    "Reading",
    "Unread",
    "diagnose_text",
    "parse_access_log_line",
    "read_text",
]

# What to log so that every line can be diagnosed: Istio's default text format, which
# has all three fields (`formats.TEXT_FORMATS[0]`).
ISTIO_ACCESS_LOG_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% "
    '"%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER% '
    "%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% "
    "%REQUESTED_SERVER_NAME% %ROUTE_NAME%\\n"
)
# The doctor's own reason and hint read from a line are at most this long (a hint is
# under 300 characters; tests/unit/test_diagnosis.py checks).
MAX_DOCTOR_TEXT = 400
# Evidence the diagnosis needs, by the Istio JSON key, and the operator that logs it.
OPERATORS: tuple[tuple[str, str], ...] = (
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    ("upstream_transport_failure_reason", "%UPSTREAM_TRANSPORT_FAILURE_REASON%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER%"),
)
# Evidence name (as `Reading.used` says it) ← Istio JSON key.
_USED_NAMES: tuple[tuple[str, str], ...] = (
    ("status", "response_code"),
    ("flags", "response_flags"),
    ("details", "response_code_details"),
    ("transport_failure_reason", "upstream_transport_failure_reason"),
    ("cluster", "upstream_cluster"),
    ("route", "route_name"),
    ("host", "authority"),
    ("grpc", "grpc_status"),
)
_FLAG_BITS = {short: bit for bit, short, _ in RESPONSE_FLAGS} | {
    long.lower(): bit for bit, _, long in RESPONSE_FLAGS
}
# kubectl's `[pod/NAME/CONTAINER] ` and a runtime timestamp (`... stdout F `) before a line.
_PREFIX = re.compile(
    r"(?:\[pod/[^\]\s]{1,253}\]\s{1,3})?"
    r"(?:\d{4}-\d\d-\d\dT[\d:.]{1,30}(?:Z|[+-]\d\d:?\d\d)\s{1,3}(?:(?:stdout|stderr)\s[FP]\s)?)?"
)


@dataclass(frozen=True, slots=True)
class Reading:
    """The evidence read from one text, how it was read, and what the log lacked.

    `form` names the known format (`istio`, `envoy`, `istio-json`, ...) or `scan` when the
    evidence was searched for; `used` names the evidence found; `missing` lists the
    access-log operators that would have told more; `unknown_flags` the flag names this
    version does not know (they are left out of the bitmask, never fatal).
    """

    evidence: Evidence
    form: str
    used: tuple[str, ...]
    missing: tuple[str, ...] = ()
    time: str = ""
    destination_rule: str = ""
    unknown_flags: tuple[str, ...] = ()

    @property
    def is_log(self) -> bool:
        """Whether the text held any failure evidence at all (status, flags or details)."""
        return bool({"status", "flags", "details", "grpc"} & set(self.used))


@dataclass(frozen=True, slots=True)
class Read:
    """A text read, and its diagnosis (None: Envoy did not fail the response, or no evidence)."""

    reading: Reading
    diagnosis: Diagnosis | None


@dataclass(frozen=True, slots=True)
class Unread:
    """A text the reader could not read, and the type of the error that stopped it."""

    error: str


def diagnose_text(text: str) -> Read | Unread:
    """Read and classify one text (a line of a log, or a whole paste). The one place that
    stops an error: whatever a text makes the reader raise (a bug, a RecursionError, a
    MemoryError) makes that text unread, and the caller goes on with the next."""
    try:
        reading = read_text(text)
        return Read(reading, classify(reading.evidence))
    except Exception as exc:  # by design: any error makes this one text unread
        return Unread(type(exc).__name__)


def parse_access_log_line(line: str) -> Evidence:
    """The `Evidence` in one pasted text; never raises (see `read_text`)."""
    return read_text(line).evidence


def read_text(text: str) -> Reading:
    """Read `text` as a known access-log format if it is one, else search it for evidence."""
    body = _PREFIX.sub("", text.strip(), count=1)
    if body.startswith("{"):
        decoded = formats.read_json(body)
        if decoded is not None and decoded.wrapped_text:
            return read_text(decoded.wrapped_text)
        if decoded is not None and "response_code" in decoded.fields:
            return _from_fields(decoded.form, decoded.fields, frozenset(decoded.fields), body)
    if "\n" not in body:
        matched = formats.match_text(body)
        if matched is not None:
            fmt, fields = matched
            return _from_fields(fmt.name, fields, fmt.logged, body)
    return _from_scan(text)


def _from_fields(
    form: str, fields: Mapping[str, object], logged: frozenset[str], text: str
) -> Reading:
    """A reading from a known format's fields (keyed like Istio's JSON encoding)."""
    values = {key: _text(value) for key, value in fields.items()}
    flags, unknown = _flags(values.get("response_flags", ""))
    answered = None
    if "upstream_service_time" in logged:
        answered = values.get("upstream_service_time", "") != ""
    dr = scan.destination_rule(text)
    evidence = Evidence(
        status=_status(values.get("response_code", "")),
        flags=flags,
        code_details=values.get("response_code_details", ""),
        transport_failure_reason=values.get("upstream_transport_failure_reason", ""),
        cluster=values.get("upstream_cluster", ""),
        upstream_address=values.get("upstream_host", ""),
        route=values.get("route_name", ""),
        host=values.get("authority", ""),
        # A JSON format may log `%GRPC_STATUS_NUMBER%` under this key (Istio's does not).
        grpc_status=_status(values.get("grpc_status", "")),
        upstream_answered=answered,
        cluster_metadata=_metadata(dr),
        has_attributes="response_code_details" in logged,
        doctor_reason=values.get("doctor_reason", "")[:MAX_DOCTOR_TEXT],
        doctor_hint=printable(values.get("doctor_hint", ""), MAX_DOCTOR_TEXT),
    )
    used = tuple(name for name, key in _USED_NAMES if values.get(key))
    missing = tuple(op for key, op in OPERATORS if key not in logged)
    time = values.get("start_time", "")
    return Reading(evidence, form, used, missing, time, dr, unknown)


def _from_scan(text: str) -> Reading:
    """A reading from evidence found wherever it stands."""
    found = scan.scan(text)
    flags, unknown = _flags(found.flags)
    answered = None if found.service_time is None else found.service_time.isdigit()
    evidence = Evidence(
        status=found.status or None,
        flags=flags,
        code_details=found.details,
        transport_failure_reason=found.tfr,
        cluster=found.cluster,
        upstream_address=found.upstream_host,
        route=found.route,
        host=found.host,
        grpc_status=found.grpc_status or None,
        upstream_answered=answered,
        cluster_metadata=_metadata(found.destination_rule),
        has_attributes=bool(found.details or found.tfr),
        doctor_reason=found.doctor_reason,
        doctor_hint=printable(found.doctor_hint, MAX_DOCTOR_TEXT),
    )
    present = {
        "status": found.status,
        "grpc": found.grpc_status,
        "flags": found.flags not in ("", "-"),
        "details": found.details,
        "transport_failure_reason": found.tfr,
        "cluster": found.cluster,
        "route": found.route,
        "host": found.host,
    }
    used = tuple(name for name, value in present.items() if value)
    missing = _missing_after_scan(found)
    return Reading(evidence, "scan", used, missing, found.time, found.destination_rule, unknown)


def _missing_after_scan(found: scan.Found) -> tuple[str, ...]:
    """The operators whose evidence the scan did not find.

    The transport failure reason is asked for only where it could have said something:
    a connection failure, or no details at all.
    """
    missing = []
    if not found.details:
        missing.append("%RESPONSE_CODE_DETAILS%")
    connect_failure = "connection_failure" in found.details or "UF" in found.flags
    if not found.tfr and (connect_failure or not found.details):
        missing.append("%UPSTREAM_TRANSPORT_FAILURE_REASON%")
    if not found.cluster:
        missing.append("%UPSTREAM_CLUSTER%")
    return tuple(missing)


def _metadata(destination_rule: str) -> str:
    """Cluster metadata naming the DestinationRule, as Istio writes it, so that the
    diagnosis can name it too."""
    if not destination_rule:
        return ""
    ns, _, name = destination_rule.rpartition("/")
    if not ns:
        return f"/destination-rule/{name}"
    return f"/apis/networking.istio.io/v1/namespaces/{ns}/destination-rule/{name}"


def _text(value: object) -> str:
    """A logged value as text; `None` and `-` (Envoy's "no value") become ''."""
    text = "" if value is None else str(value)
    return "" if text in ("-", "null") else text


def _status(text: str) -> int | None:
    """The response code as an int; 0, no value or not a number is None."""
    if not (text.isascii() and text.isdigit()) or len(text) > 3:
        return None
    return int(text) or None


def _flags(text: str) -> tuple[int, tuple[str, ...]]:
    """The bitmask of the known flag names in `text`, and the unknown names left out."""
    mask = 0
    unknown = []
    for raw in text.replace("|", ",").split(","):
        name = raw.strip()
        if not name or name == "-":
            continue
        bit = _FLAG_BITS.get(name) or _FLAG_BITS.get(name.lower())
        if bit is None:
            unknown.append(name[:40])
        else:
            mask |= bit
    return mask, tuple(unknown)
