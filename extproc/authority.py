"""Authorities (`host[:port]`) on one grammar: RFC 3986 §3.2.2 and §3.2.3.

The policy file, the Host rewrite, the port strip and the render options all read an
authority through `parse_authority`, so a Host that one of them accepts the others read
the same way. What does not parse is None: the caller leaves it alone and reports it,
and never builds a new `:authority` from a piece of it.

    authority   = host [ ":" port ]
    host        = IP-literal / IPv4address / reg-name
    IP-literal  = "[" IPv6address "]"          (IPvFuture and zone IDs: not accepted)
    reg-name    = *( unreserved / pct-encoded / sub-delims )
    port        = *DIGIT

A mesh routes by DNS names, so `reg-name` is narrowed to what a DNS name or a Kubernetes
service name can be (letters, digits, `-`, `_`, dots; labels of 1 to 63 characters); a
port, when present, is 1 to 5 digits up to 65535. An empty port (`host:`) is allowed by
RFC 3986 and means no port. Nothing here imports grpc or protobuf.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

# A DNS-like name: labels of letters, digits, `-` and `_`, not starting or ending in `-`;
# one optional trailing dot (a fully qualified name).
_LABEL = r"[a-z0-9_](?:[a-z0-9_\-]{0,61}[a-z0-9_])?"
_NAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\.?", re.IGNORECASE)
_PORT = re.compile(r"[0-9]{1,5}")
# The common case, decided by one regex: a name with an optional port.
_SIMPLE = re.compile(rf"(?P<host>{_NAME.pattern})(?::(?P<port>[0-9]{{0,5}}))?", re.IGNORECASE)

MAX_LENGTH = 255 + 1 + 2 + 5  # a DNS name (or bracketed IPv6), ":", and a port


class Authority(NamedTuple):
    """A parsed authority: `host` keeps an IPv6 literal's brackets; `port` may be ''."""

    host: str
    port: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" if self.port else self.host


def parse_authority(text: str) -> Authority | None:
    """`text` as host and port, or None when it is not an authority."""
    if not text or len(text) > MAX_LENGTH:
        return None
    if text[0] == "[":
        return _ip_literal(text)
    match = _SIMPLE.fullmatch(text)
    if match is None or len(match["host"]) > 255:
        return None
    port = match["port"] or ""
    if port and not _valid_port(port):
        return None
    return Authority(match["host"], port)


def _ip_literal(text: str) -> Authority | None:
    """`[IPv6]` with an optional `:port`."""
    end = text.find("]")
    if end == -1 or not is_ipv6_literal(text[: end + 1]):
        return None
    rest = text[end + 1 :]
    if rest and (rest[0] != ":" or not _valid_port(rest[1:])):
        return None
    return Authority(text[: end + 1], rest[1:])


def parse_host(text: str) -> str | None:
    """`text` as a host alone (a name, an IPv4 address or a bracketed IPv6 literal)."""
    parsed = parse_authority(text)
    if parsed is None or parsed.port or text.endswith(":"):
        return None
    return parsed.host


def is_ipv6_literal(text: str) -> bool:
    """`[IPv6address]`, without a zone ID."""
    if len(text) < 4 or text[0] != "[" or text[-1] != "]" or "%" in text:
        return False
    try:
        ipaddress.IPv6Address(text[1:-1])
    except ValueError:
        return False
    return True


def _valid_port(port: str) -> bool:
    return port == "" or (_PORT.fullmatch(port) is not None and int(port) <= 65535)
