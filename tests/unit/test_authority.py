"""Authorities on one grammar, checked against a maintained RFC 3986 parser (rfc3986)."""

from __future__ import annotations

import pytest
import rfc3986
from hypothesis import example, given, settings
from hypothesis import strategies as st
from rfc3986.exceptions import RFC3986Exception

from extproc.authority import Authority, parse_authority, parse_host


def rfc3986_authority(text: str) -> tuple[str, str] | None:
    """host and port as rfc3986 reads `//text`, or None if it is not a valid authority."""
    uri = rfc3986.uri_reference("//" + text)
    try:
        rfc3986.validators.Validator().check_validity_of("host", "port").validate(uri)
        info = uri.authority_info()
    except (RFC3986Exception, ValueError):
        return None
    if info["userinfo"] is not None or uri.path or uri.query is not None or uri.fragment:
        return None
    return info["host"], info["port"] or ""


@pytest.mark.parametrize(
    "text",
    # The hostile Hosts of issue 9: each was once cut into a wrong host or port.
    ["::1", "fe80::1:8080", "a.example.com:8080:9090", "[::1]:abc", "[::1", "[::1]x"],
)
def test_hostile_hosts_are_not_authorities(text):
    """Neither we nor rfc3986 read these as host[:port]; nothing is cut out of them."""
    assert parse_authority(text) is None
    assert rfc3986_authority(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a.example", Authority("a.example", "")),
        ("a.example:80", Authority("a.example", "80")),
        ("A.Example.:443", Authority("A.Example.", "443")),
        ("[::1]:8080", Authority("[::1]", "8080")),
        ("[::1]", Authority("[::1]", "")),
        ("a.example:", Authority("a.example", "")),
        ("10.0.0.1:9080", Authority("10.0.0.1", "9080")),
        ("reviews", Authority("reviews", "")),
    ],
)
def test_authorities(text, expected):
    assert parse_authority(text) == expected


def test_port_range():
    """A port above 65535 is not a port (rfc3986 agrees)."""
    assert parse_authority("a.example:65535") == Authority("a.example", "65535")
    assert parse_authority("a.example:65536") is None
    assert rfc3986_authority("a.example:65536") is None


def test_host_alone():
    assert parse_host("a.example") == "a.example"
    assert parse_host("[::1]") == "[::1]"
    assert parse_host("a.example:80") is None
    assert parse_host("a.example:") is None
    assert parse_host("::1") is None


_ALPHABET = st.sampled_from([*list("ab09.-_:[]%!$ "), "::", "1", "ff", "fe80", "8080", "é"])


@settings(max_examples=2000, deadline=None)
@given(st.lists(_ALPHABET, max_size=14).map("".join))
@example("fe80::1:8080")
@example("[fe80::1]:8080")
@example("a..b")
def test_whatever_we_accept_rfc3986_accepts_the_same_way(text):
    """Our grammar is RFC 3986's narrowed to DNS names: anything we accept, rfc3986
    accepts with the same host and port."""
    ours = parse_authority(text)
    if ours is None:
        return
    assert rfc3986_authority(text) == (ours.host, ours.port), text
