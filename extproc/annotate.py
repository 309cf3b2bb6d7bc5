"""Annotations as RFC 8941 structured fields, safe whatever bytes the evidence holds.

Evidence comes from the wire (a Host, a cluster name, an Envoy error string) and may hold
any byte. An sf-string allows only printable ASCII, so everything else, and `%` itself, is
percent-encoded from its UTF-8 bytes (the same idea as RFC 9651's Display String), which
keeps the value reversible and the header free of CR, LF and control bytes. Each value is
cut at `MAX_VALUE` characters, ending in `...`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from extproc.diagnosis import Diagnosis
from extproc.headers import Applied

DIAGNOSIS_HEADER = "x-extproc-diagnosis"
HINT_HEADER = "x-extproc-hint"
ACTIONS_HEADER = "x-extproc-actions"

MAX_VALUE = 256

_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_PLAIN = frozenset(range(0x20, 0x7F)) - {ord("%"), ord('"'), ord("\\")}
_ESCAPES = {ord('"'): '\\"', ord("\\"): "\\\\"}
# What each byte becomes inside an sf-string.
_PLAIN_TEXT = re.compile(r"[ !#$&-\[\]-~]*")  # printable ASCII except " % \\
_PIECES = tuple(chr(b) if b in _PLAIN else _ESCAPES.get(b) or f"%{b:02x}" for b in range(256))


def _utf8(value: str) -> bytes:
    """The bytes behind `value`: surrogate escapes become their raw byte again.

    A lone surrogate that no decoder produced (possible in JSON input) is written as its
    backslash escape rather than refused.
    """
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace")


def sf_string(value: str, limit: int = MAX_VALUE) -> str:
    """`value` as an RFC 8941 sf-string, percent-encoding non-printable bytes.

    The content is at most `limit` characters; a longer one is cut, never inside an
    escape, and ends in `...`.
    """
    if len(value) <= limit and _PLAIN_TEXT.fullmatch(value):
        return f'"{value}"'  # the common case: nothing to escape or cut
    # Each character becomes at least one: past `limit + 1` nothing more can be kept.
    pieces = [_PIECES[byte] for byte in _utf8(value[: limit + 1])]
    if sum(map(len, pieces)) > limit:
        kept, size = [], 0
        for piece in pieces:
            if size + len(piece) > limit - 3:
                break
            kept.append(piece)
            size += len(piece)
        pieces = [*kept, "..."]
    return '"' + "".join(pieces) + '"'


_MAX_INTEGER = 999_999_999_999_999  # RFC 8941 §3.3.1


def _bare(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "" if value else "=?0"
    if isinstance(value, int):
        if abs(value) > _MAX_INTEGER:
            raise ValueError(f"integer out of RFC 8941 range: {value}")
        return f"={value}"
    return f"={sf_string(value)}"


def sf_item(token: str, params: Iterable[tuple[str, str | int | bool]] = ()) -> str:
    """A token with parameters. Keys must be valid RFC 8941 keys (they come from code)."""
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"not an RFC 8941 token: {token!r}")
    parts = [token]
    for key, value in params:
        if not _KEY.fullmatch(key):
            raise ValueError(f"not an RFC 8941 key: {key!r}")
        parts.append(f";{key}{_bare(value)}")
    return "".join(parts)


def diagnosis_headers(diagnosis: Diagnosis) -> tuple[tuple[str, str], ...]:
    """The x-extproc-diagnosis Item and the x-extproc-hint line."""
    return (
        (DIAGNOSIS_HEADER, sf_item(diagnosis.reason, diagnosis.evidence)),
        (HINT_HEADER, printable(diagnosis.hint)),
    )


def actions_header(applied: Sequence[Applied]) -> str:
    """The x-extproc-actions List: one token per rule, `;report` when nothing was changed."""
    members = []
    for entry in applied:
        params: list[tuple[str, str | int | bool]] = []
        if entry.names:
            params.append(("headers", " ".join(entry.names)))
        if entry.report:
            params.append(("report", True))
        members.append(sf_item(entry.token, params))
    return ", ".join(members)


def printable(text: str, limit: int = 512) -> str:
    """Plain text made safe for a header value: visible ASCII and spaces only."""
    inner = sf_string(text, limit)[1:-1]
    return inner.replace('\\"', '"').replace("\\\\", "\\")
