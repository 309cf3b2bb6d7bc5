"""Envoy access-log lines in, `Evidence` out: diagnose a failure from a pasted log line.

Three encodings are understood:

* Istio's default proxy text format (what `kubectl logs -c istio-proxy` prints),
* Envoy's default text format,
* Istio's JSON encoding (`accessLogEncoding: JSON`), one object per line.

Both text formats share a head (`[START_TIME] "METHOD PATH PROTOCOL" STATUS FLAGS `)
and differ in the fields after it, so each is one row of `TEXT_FORMATS`: the list of
those fields, named by the keys of Istio's JSON encoding and compiled into a regex with
one named group per field. Every encoding thus ends up as one mapping keyed like the
JSON encoding, and one function (`_evidence`) turns that into an `Evidence`. A `-`
(text) or `null` (JSON) value means "empty".

A timestamp prefix added by `kubectl logs --timestamps` or by the container runtime's
log files (`2026-11-20T10:00:00.123456789Z stdout F `), and the `[pod/NAME/CONTAINER] `
prefix of `kubectl logs --prefix`, are skipped.

Pure: no grpc or protobuf, like `diagnosis`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from extproc.diagnosis import Evidence
from extproc.flags import UnknownFlagError, parse_flags

EXPECTED_TEXT = '[START_TIME] "METHOD PATH PROTOCOL" STATUS FLAGS ...'
EXPECTED_JSON = "a JSON object with a response_code key"
QUOTE = '"'


class AccessLogError(ValueError):
    """A line that is not an access-log line in any format this module knows."""


@dataclass(frozen=True, slots=True)
class TextFormat:
    """One text access-log format, by the fields it logs after STATUS FLAGS.

    `fields` are Istio JSON keys, a quoted field in double quotes as Envoy writes it;
    `tail` matches them, one named group per field. `has_attributes` says whether the
    format logs the response code details: without them `classify` relies on the status
    and the upstream service time instead.
    """

    name: str
    fields: tuple[str, ...]
    tail: re.Pattern[str]
    has_attributes: bool

    def describe(self) -> str:
        """The first few fields, upper-cased like Envoy's operators, for error messages."""
        return " ".join(f.upper() for f in self.fields[:5]) + " ..."


def text_format(name: str, fields: str, *, has_attributes: bool) -> TextFormat:
    """A `TextFormat` from space-separated Istio JSON keys; `"key"` is a quoted field.

    A bare field is one token without blanks (`(?P<key>\\S+)`); a quoted field is
    everything up to the closing quote, so it may contain spaces.
    """
    names = fields.split()
    tokens = [
        f'"(?P<{n.strip(QUOTE)}>[^"]*)"' if n.startswith(QUOTE) else rf"(?P<{n}>\S+)" for n in names
    ]
    return TextFormat(
        name,
        tuple(names),
        re.compile(" ".join(tokens) + r"\s*"),
        has_attributes,
    )


_HEAD = re.compile(
    r'\[(?P<start_time>[^\]]*)\] "(?P<request>[^"]*)" '
    r"(?P<response_code>\d+) (?P<response_flags>\S+) "
)
_PREFIX = re.compile(
    r"(?:\[pod/[^\]]*\]\s+)?"
    r"(?:\d{4}-\d\d-\d\dT[\d:.]+(?:Z|[+-]\d\d:?\d\d)\s+(?:(?:stdout|stderr)\s+[FP]\s+)?)?"
)

# Tried in order; a line fits at most one (they differ in where the quoted fields fall).
TEXT_FORMATS: tuple[TextFormat, ...] = (
    text_format(
        "Istio's default proxy format",
        'response_code_details connection_termination_details "upstream_transport_failure_reason"'
        ' bytes_received bytes_sent duration upstream_service_time "x_forwarded_for" "user_agent"'
        ' "request_id" "authority" "upstream_host" upstream_cluster upstream_local_address'
        " downstream_local_address downstream_remote_address requested_server_name route_name",
        has_attributes=True,
    ),
    text_format(
        "Envoy's default format",
        'bytes_received bytes_sent duration upstream_service_time "x_forwarded_for" "user_agent"'
        ' "request_id" "authority" "upstream_host"',
        has_attributes=False,
    ),
)

# Evidence text field ← key of Istio's JSON encoding (and group name in the text regexes).
_TEXT_FIELDS: tuple[tuple[str, str], ...] = (
    ("code_details", "response_code_details"),
    ("transport_failure_reason", "upstream_transport_failure_reason"),
    ("cluster", "upstream_cluster"),
    ("upstream_address", "upstream_host"),
    ("route", "route_name"),
    ("host", "authority"),
)


def parse_access_log_line(line: str) -> Evidence:
    """The `Evidence` in one Envoy or Istio access-log line, text or JSON.

    Raises `AccessLogError` naming the expected format and what did not fit.
    """
    body = _PREFIX.sub("", line.strip(), count=1)
    if body.startswith("{"):
        return _from_json(body)
    return _from_text(body)


def _from_text(body: str) -> Evidence:
    """Match the shared head, then the first `TEXT_FORMATS` row whose tail fits."""
    head = _HEAD.match(body)
    if head is None:
        raise AccessLogError(
            f"not an Envoy access log line: expected `{EXPECTED_TEXT}` "
            f"or {EXPECTED_JSON}, got {_excerpt(body)}"
        )
    rest = body[head.end() :]
    for fmt in TEXT_FORMATS:
        tail = fmt.tail.fullmatch(rest)
        if tail is not None:
            return _evidence(head.groupdict() | tail.groupdict(), fmt.has_attributes)
    tried = "; ".join(f"{fmt.name}: `{fmt.describe()}`" for fmt in TEXT_FORMATS)
    raise AccessLogError(
        "not an Envoy access log line: the fields after STATUS FLAGS match no known "
        f"format (expected {tried}), got {_excerpt(rest)}"
    )


def _from_json(body: str) -> Evidence:
    """Decode one JSON object; the presence of the code details key decides `has_attributes`."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as err:
        raise AccessLogError(
            f"not a JSON access log line: expected {EXPECTED_JSON}, but {err}"
        ) from err
    if not isinstance(obj, dict) or "response_code" not in obj:
        raise AccessLogError(
            f"not a JSON access log line: expected {EXPECTED_JSON}, got {_excerpt(body)}"
        )
    return _evidence(obj, has_attributes="response_code_details" in obj)


def _evidence(fields: Mapping[str, object], has_attributes: bool) -> Evidence:
    """Build the `Evidence` from a mapping keyed like Istio's JSON encoding.

    `upstream_answered` is whether an upstream service time was logged, None when the
    format has no such field.
    """
    text = {attr: _text(fields.get(key)) for attr, key in _TEXT_FIELDS}
    answered = None
    if "upstream_service_time" in fields:
        answered = _text(fields["upstream_service_time"]) != ""
    return Evidence(
        status=_status(fields.get("response_code")),
        flags=_flags(_text(fields.get("response_flags"))),
        code_details=text["code_details"],
        transport_failure_reason=text["transport_failure_reason"],
        cluster=text["cluster"],
        upstream_address=text["upstream_address"],
        route=text["route"],
        host=text["host"],
        upstream_answered=answered,
        has_attributes=has_attributes,
    )


def _text(value: object) -> str:
    """A logged value as text; `None` and `-` (Envoy's "no value") become ''."""
    text = "" if value is None else str(value)
    return "" if text == "-" else text


def _status(value: object) -> int | None:
    """The response code as an int; 0 or no value (no response was sent) is None."""
    text = _text(value)
    if not text:
        return None
    if isinstance(value, bool) or not (text.isascii() and text.isdigit()):
        raise AccessLogError(f"response code {text!r} is not a number")
    return int(text) or None


def _flags(text: str) -> int:
    """The response flags bitmask; an unknown flag name raises `AccessLogError`."""
    try:
        return parse_flags(text)
    except UnknownFlagError as err:
        raise AccessLogError(f"response flags {text!r}: {err}") from err


def _excerpt(text: str, limit: int = 80) -> str:
    """`text` repr-quoted and cut to `limit` characters, for error messages."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
