"""The access-log formats known exactly, read from both ends of the line.

Strategy: Envoy's text formats do not escape a `"` inside a quoted field (a User-Agent
or a path may hold one), so a line is not split by a grammar but by a tokenizer that
tolerates them, and the format's fields are then matched from both ends: the fields
before the first free-text field from the left, the fields after the last one from the
right. Whatever is left in the middle belongs to the free-text fields, however many
tokens their stray quotes made of it. Every field the diagnosis reads (status, flags,
details, transport failure reason, cluster, upstream host, Host, route) stands outside
the free-text fields, so a stray quote never costs evidence.

Each format is a row of `TEXT_FORMATS`: its fields named by the keys of Istio's JSON
encoding, so that every encoding ends up as one mapping keyed alike. The rows quote the
formats from their sources (see each row). JSON lines are mapped by key aliases instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from extproc.flags import RESPONSE_FLAGS

QUOTE = '"'
# The short and long flag names Envoy prints, for validating a flags field.
FLAG_NAMES = frozenset(short for _, short, _ in RESPONSE_FLAGS) | frozenset(
    long.lower() for _, _, long in RESPONSE_FLAGS
)


class Kind(StrEnum):
    """What a field's token must look like for the line to be in this format."""

    TIME = "time"  # `[START_TIME]`
    REQUEST = "request"  # `"METHOD PATH PROTOCOL"`, free text
    STATUS = "status"  # digits
    FLAGS = "flags"  # known flag names, comma-separated, or `-`
    NUMBER = "number"  # digits or `-`
    BARE = "bare"  # any unquoted token
    QUOTED = "quoted"  # any quoted token
    FREE = "free"  # a quoted field of free text (may hold stray quotes)


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a text format, by its Istio JSON key and its kind."""

    key: str
    kind: Kind


@dataclass(frozen=True, slots=True)
class TextFormat:
    """A text access-log format: its name, where it comes from, and its fields in order."""

    name: str
    source: str
    fields: tuple[Field, ...]

    @property
    def logged(self) -> frozenset[str]:
        """The keys this format logs."""
        return frozenset(f.key for f in self.fields)


_KINDS: dict[str, Kind] = {
    "start_time": Kind.TIME,
    "request": Kind.REQUEST,
    "response_code": Kind.STATUS,
    "response_flags": Kind.FLAGS,
    "bytes_received": Kind.NUMBER,
    "bytes_sent": Kind.NUMBER,
    "duration": Kind.NUMBER,
    "upstream_service_time": Kind.NUMBER,
    "x_forwarded_for": Kind.FREE,
    "user_agent": Kind.FREE,
}


def text_format(name: str, source: str, fields: str) -> TextFormat:
    """A `TextFormat` from space-separated Istio JSON keys; `"key"` is a quoted field."""
    parsed = []
    for word in fields.split():
        key = word.strip(QUOTE)
        kind = _KINDS.get(key) or (Kind.QUOTED if word.startswith(QUOTE) else Kind.BARE)
        parsed.append(Field(key, kind))
    return TextFormat(name, source, tuple(parsed))


_HEAD = 'start_time "request" response_code response_flags'
_ENVOY_TAIL = (
    'bytes_received bytes_sent duration upstream_service_time "x_forwarded_for" "user_agent"'
    ' "request_id" "authority" "upstream_host"'
)
_ISTIO_TAIL = (
    'bytes_received bytes_sent duration upstream_service_time "x_forwarded_for" "user_agent"'
    ' "request_id" "authority" "upstream_host" upstream_cluster upstream_local_address'
    " downstream_local_address downstream_remote_address requested_server_name"
)

# Tried in order; they differ in the fields after the flags, so a line fits at most one.
TEXT_FORMATS: tuple[TextFormat, ...] = (
    text_format(
        "istio",
        "Istio's default text format (istio/istio pilot/pkg/model/telemetry_logging.go, "
        "EnvoyTextLogFormat, 7790f42)",
        f"{_HEAD} response_code_details connection_termination_details"
        f' "upstream_transport_failure_reason" {_ISTIO_TAIL} route_name',
    ),
    text_format(
        "istio-1.5",
        "Istio 1.4-1.6 (mixer status and transport failure reason after the flags)",
        f'{_HEAD} "istio_policy_status" "upstream_transport_failure_reason" {_ISTIO_TAIL}'
        " route_name",
    ),
    text_format(
        "istio-1.1",
        "Istio 1.1-1.3 (mixer status after the flags, no transport failure reason)",
        f'{_HEAD} "istio_policy_status" {_ISTIO_TAIL}',
    ),
    text_format(
        "envoy",
        "Envoy's default format (recorded from Envoy 1.40 with no log_format)",
        f"{_HEAD} {_ENVOY_TAIL}",
    ),
)


def tokens(body: str) -> list[tuple[str, bool]]:
    """Split a text line into (text, quoted) tokens, tolerating quotes inside quoted fields.

    A quoted token opens at a `"` that starts a field and closes at the first `"` that
    ends a field (followed by a blank or the end). A quote that never closes leaves its
    opening piece a bare token. Linear: where each piece closes is computed in one pass.
    """
    pieces = body.split(" ")
    closes = _closing_pieces(pieces)
    out: list[tuple[str, bool]] = []
    i = 0
    while i < len(pieces):
        piece = pieces[i]
        end = closes[i] if piece.startswith(QUOTE) else -1
        if end < 0:
            if piece:
                out.append((piece, False))
            i += 1
            continue
        out.append((" ".join(pieces[i : end + 1])[1:-1], True))
        i = end + 1
    return out


def _closing_pieces(pieces: list[str]) -> list[int]:
    """For each piece that opens a quoted field, the index of the piece that closes it, or -1.

    An opening piece closes its own field when it ends with a quote too (`"x"`, `""`);
    otherwise the field closes at the next piece that ends with a quote.
    """
    closes = [-1] * len(pieces)
    next_end = -1
    for i in range(len(pieces) - 1, -1, -1):
        piece = pieces[i]
        closes[i] = i if len(piece) > 1 and piece.endswith(QUOTE) else next_end
        if piece.endswith(QUOTE):
            next_end = i
    return closes


def match_text(body: str) -> tuple[TextFormat, dict[str, str]] | None:
    """The first known text format that `body` is in, and its fields; None when none fits."""
    toks = tokens(body)
    for fmt in TEXT_FORMATS:
        fields = _align(fmt, toks)
        if fields is not None:
            return fmt, fields
    return None


# How far past the time the status may stand when stray quotes split the request.
_REQUEST_TOKENS_MAX = 8


def _align(fmt: TextFormat, toks: list[tuple[str, bool]]) -> dict[str, str] | None:
    """Match `fmt`'s fields to the tokens from both ends; free-text fields take the rest.

    From the left: the time, then the status and flags wherever they stand after it (the
    request between them, however many tokens stray quotes made of it), then the fields
    up to the first free-text one. From the right: the fields after the last free-text
    one. The free-text fields share what is left in the middle.
    """
    kinds = [f.kind for f in fmt.fields]
    free = [i for i, k in enumerate(kinds) if k is Kind.FREE]
    first_free, last_free = free[0], free[-1]
    if not toks or not _fits(Kind.TIME, toks[0]):
        return None
    status_at = _status_index(toks)
    if status_at is None:
        return None
    head = fmt.fields[2:first_free]
    tail = fmt.fields[last_free + 1 :]
    middle_start = status_at + len(head)
    middle_end = len(toks) - len(tail)
    if middle_end < middle_start:
        return None
    pairs = list(zip(head, toks[status_at:middle_start], strict=True))
    pairs += zip(tail, toks[middle_end:], strict=True)
    if not all(_fits(f.kind, tok) for f, tok in pairs):
        return None
    fields = {f.key: text for f, (text, _) in pairs}
    fields["start_time"] = toks[0][0][1:-1]
    fields["request"] = " ".join(text for text, _ in toks[1:status_at])
    middle = toks[middle_start:middle_end]
    if len(middle) != len(free) and not any(_stray(tok) for tok in middle):
        return None  # more fields than the format has, all well formed: another format
    for f, (text, _) in zip(fmt.fields[first_free : last_free + 1], middle, strict=False):
        fields[f.key] = text
    return fields


def _stray(token: tuple[str, bool]) -> bool:
    """A token that only a stray quote makes: bare where a quoted field stands, or holding a quote."""
    text, quoted = token
    return not quoted or QUOTE in text


def _status_index(toks: list[tuple[str, bool]]) -> int | None:
    """Where the status stands: the first token after the request followed by flags."""
    for k in range(2, min(len(toks) - 1, 2 + _REQUEST_TOKENS_MAX)):
        if _fits(Kind.STATUS, toks[k]) and _fits(Kind.FLAGS, toks[k + 1]):
            return k
    return None


def _fits(kind: Kind, token: tuple[str, bool]) -> bool:
    """Whether a token can be a field of this kind (quoted where quoted, digits, flags)."""
    text, quoted = token
    return quoted == (kind in _QUOTED_KINDS) and _SHAPES[kind](text)


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


_QUOTED_KINDS = frozenset({Kind.REQUEST, Kind.QUOTED, Kind.FREE})
_SHAPES: dict[Kind, Callable[[str], bool]] = {
    Kind.TIME: lambda t: t.startswith("[") and t.endswith("]"),
    Kind.REQUEST: lambda _: True,
    Kind.QUOTED: lambda _: True,
    Kind.FREE: lambda _: True,
    Kind.STATUS: lambda t: _is_number(t) and len(t) <= 3,
    Kind.NUMBER: lambda t: t == "-" or _is_number(t),
    Kind.FLAGS: lambda t: is_flags_token(t),  # noqa: PLW0108 (defined below)
    Kind.BARE: lambda _: True,
}


def is_flags_token(text: str, *, any_known: bool = False) -> bool:
    """`-`, or flag names joined by `,` (or `|`), every one known to Envoy (or one, with
    `any_known`: where flags stand for sure, an unknown name is a newer flag)."""
    if text == "-":
        return True
    known = [n in FLAG_NAMES or n.lower() in FLAG_NAMES for n in text.replace("|", ",").split(",")]
    return any(known) if any_known else all(known)


# --- JSON ------------------------------------------------------------------------------

# Istio JSON key ← the keys other JSON formats use for the same thing. Envoy Gateway's
# default JSON format (envoyproxy/gateway internal/xds/translator/accesslog.go,
# EnvoyTextLogFormat, 00175ad) names four fields after the header they read.
JSON_ALIASES: dict[str, tuple[str, ...]] = {
    "start_time": ("start_time", "timestamp", "time", "@timestamp"),
    "response_code": ("response_code", "status", "responsecode", "status_code", "code"),
    "response_flags": ("response_flags", "response_flag", "flags"),
    "response_code_details": ("response_code_details", "status_details", "details"),
    "upstream_transport_failure_reason": (
        "upstream_transport_failure_reason",
        "transport_failure_reason",
    ),
    "upstream_cluster": ("upstream_cluster", "cluster", "upstream.cluster"),
    "upstream_host": ("upstream_host", "upstream.host", "upstream_address"),
    "route_name": ("route_name", "route"),
    "authority": ("authority", ":authority", "host"),
    "upstream_service_time": (
        "upstream_service_time",
        "x-envoy-upstream-service-time",
        "x_envoy_upstream_service_time",
    ),
    # `%GRPC_STATUS_NUMBER%`, where a format logs it (Istio's default does not).
    "grpc_status": ("grpc_status", "grpc-status", "grpc_status_number"),
    # The doctor's own diagnosis, `%DYNAMIC_METADATA(extproc_doctor)%` (the lab's format).
    "doctor_reason": ("extproc_doctor.reason",),
    "doctor_hint": ("extproc_doctor.hint",),
}
ENVOY_GATEWAY_KEYS = frozenset(
    {":authority", "x-envoy-origin-path", "x-envoy-upstream-service-time"}
)
# Fields only an Envoy access log has: a JSON object with none of them (`{"status": 503}`)
# is no access-log line.
ENVOY_JSON_FIELDS = frozenset(
    {"response_flags", "response_code_details", "upstream_transport_failure_reason",
     "upstream_cluster", "upstream_service_time"}
)  # fmt: skip
# Keys only Istio's JSON encoding has together (its text format's fields, JSON-named).
ISTIO_JSON_KEYS = frozenset({"response_code", "response_flags", "upstream_cluster", "authority"})


@dataclass(frozen=True, slots=True)
class JsonLine:
    """A decoded JSON log line: the form it was recognised as and its Istio-keyed fields."""

    form: str
    fields: dict[str, object]
    # A container runtime's wrapper (`{"log": "...", "stream": ...}`) around a text line.
    wrapped_text: str = ""


def read_json(body: str) -> JsonLine | None:
    """Decode one JSON object line; None when it is not one (the scanner reads it then)."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):  # deep nesting: no access-log format nests so
        return None
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("log"), str) and "response_code" not in obj:
        return JsonLine("docker-json", {}, obj["log"])
    flat = _flatten(obj)
    fields = {
        key: flat[alias]
        for key, aliases in JSON_ALIASES.items()
        for alias in reversed(aliases)
        if alias in flat
    }
    if ENVOY_GATEWAY_KEYS & obj.keys() and "response_code" in obj:
        form = "envoy-gateway-json"
    elif obj.keys() >= ISTIO_JSON_KEYS:
        form = "istio-json"
    elif ENVOY_JSON_FIELDS.isdisjoint(fields):
        return None  # a status alone is any application's JSON: the scanner decides
    else:
        form = "json"
    return JsonLine(form, fields)


def _flatten(obj: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    """Nested objects as dotted keys, lower-cased (`upstream.host`)."""
    flat: dict[str, object] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}".lower()
        if isinstance(value, dict) and len(prefix) < 64:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
