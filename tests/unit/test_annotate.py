"""Tests for extproc.annotate: RFC 8941 serialization of diagnoses and actions.

Neither `http_sfv` nor `http-sf` is installed in the virtualenv, so a small RFC 8941
parser for Items and Lists (tokens, integers, sf-strings, booleans, parameters) lives
here and is used to check that what we write parses back to what we meant.
"""

from __future__ import annotations

import re

import http_sfv
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc import flags as F
from extproc.annotate import (
    DIAGNOSIS_HEADER,
    HINT_HEADER,
    MAX_VALUE,
    actions_header,
    diagnosis_headers,
    printable,
    sf_item,
    sf_string,
)
from extproc.diagnosis import CATALOGUE, HINTS, Diagnosis, Evidence, classify, is_envoy_failure
from extproc.headers import Applied

# --- RFC 8941 parsing by a maintained parser (http-sfv), not by our own regexes ---------

BareItem = str | int | bool
Params = list[tuple[str, BareItem]]
Token = http_sfv.Token  # a parsed sf-token, told apart from an sf-string by its type
ParseError = ValueError  # what http-sfv raises on anything that is not a structured field


def parse_item(text: str) -> tuple[BareItem, Params]:
    """Parse an RFC 8941 Item with http-sfv; raise ValueError on anything else."""
    item = http_sfv.Item()
    item.parse(text.encode("ascii"))
    return item.value, list(item.params.items())


def parse_string(text: str) -> str:
    """An sf-string alone (an Item without parameters), parsed by http-sfv."""
    value, params = parse_item(text)
    assert isinstance(value, str)
    assert not isinstance(value, Token)
    assert params == []
    return value


def parse_list(text: str) -> list[tuple[BareItem, Params]]:
    """Parse an RFC 8941 List of Items with http-sfv; raise ValueError on anything else."""
    members = http_sfv.List()
    members.parse(text.encode("ascii"))
    return [(m.value, list(m.params.items())) for m in members]


def percent_decode(text: str) -> bytes:
    """Undo the percent-encoding of an sf-string's content; only lower-case `%xx` is valid."""
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "%":
            pair = text[i + 1 : i + 3]
            if not re.fullmatch(r"[0-9a-f]{2}", pair):
                raise ParseError(f"bad percent escape {text[i : i + 3]!r}")
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(ord(text[i]))
            i += 1
    return bytes(out)


def raw(value: str) -> bytes:
    """The bytes a value stands for: UTF-8, with surrogate escapes back to their byte."""
    return value.encode("utf-8", "surrogateescape")


def visible(value: str) -> bool:
    """True when every character is a byte 0x20-0x7E."""
    return all(0x20 <= ord(c) <= 0x7E for c in value)


# --- strategies ----------------------------------------------------------------------------

# Any text: Unicode (no lone surrogates), raw bytes decoded with surrogateescape, and a mix
# rich in the characters that need escaping.
TEXT = st.one_of(
    st.text(),
    st.binary().map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.text(alphabet=st.sampled_from('\r\n\x00\x7f\t"\\%é\udcff ax_|:;,=?')),
)
STATUS = st.none() | st.integers(min_value=0, max_value=999)
GRPC = st.none() | st.integers(min_value=0, max_value=16)

EVIDENCE = st.builds(
    Evidence,
    status=STATUS,
    flags=st.integers(min_value=0, max_value=F.ALL_FLAGS),
    code_details=TEXT,
    transport_failure_reason=TEXT,
    cluster=TEXT,
    upstream_address=TEXT,
    route=TEXT,
    host=TEXT,
    grpc_status=GRPC,
    upstream_answered=st.none() | st.booleans(),
    overloaded=st.booleans(),
    cluster_metadata=TEXT,
    has_attributes=st.booleans(),
)

# Nine parameters at most (status, grpc, flags, cluster, route, upstream, host, dr, detail),
# each `;key=` plus a value of at most MAX_VALUE characters and its quotes.
LONGEST_REASON = max(len(r) for r in HINTS)
DIAGNOSIS_BOUND = LONGEST_REASON + 9 * (len(";upstream=") + MAX_VALUE + 2)
HINT_BOUND = 512

# --- tests ---------------------------------------------------------------------------------


class TestSfString:
    """sf_string: escapes, percent-encoding, and the length bound."""

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            pytest.param("plain text", '"plain text"', id="plain"),
            pytest.param("", '""', id="empty"),
            pytest.param(" ~", '" ~"', id="range-ends-plain"),
            pytest.param('say "hi"', r'"say \"hi\""', id="dquote"),
            pytest.param("a\\b", r'"a\\b"', id="backslash"),
            pytest.param("100%", '"100%25"', id="percent"),
            pytest.param("a\r\nb", '"a%0d%0ab"', id="crlf"),
            pytest.param("\x00", '"%00"', id="nul"),
            pytest.param("\x1f", '"%1f"', id="below-space"),
            pytest.param("\t", '"%09"', id="tab"),
            pytest.param("\x7f", '"%7f"', id="del"),
            pytest.param("é", '"%c3%a9"', id="latin-utf8"),
            pytest.param("\u2603", '"%e2%98%83"', id="bmp-utf8"),
            pytest.param("\U0001f600", '"%f0%9f%98%80"', id="astral-utf8"),
            pytest.param("\udcff", '"%ff"', id="surrogate-escape-ff"),
            pytest.param("\udc80", '"%80"', id="surrogate-escape-80"),
            pytest.param("\udcab\udccd", '"%ab%cd"', id="lower-case-hex"),
        ],
    )
    def test_encoding(self, value: str, expected: str) -> None:
        """`"` and `\\` are backslash-escaped; `%` and bytes outside 0x20-0x7E become lower-case `%xx`."""
        assert sf_string(value) == expected

    @pytest.mark.parametrize(
        "value",
        ["\ud800", "\udfff", "\udc7f", "a\ud83d", "\ude00b"],
        ids=["high-first", "low-last", "below-escape-range", "half-pair-end", "half-pair-start"],
    )
    def test_lone_surrogate_does_not_crash(self, value: str) -> None:
        """A lone surrogate that is no surrogate escape (JSON `\\ud800`) still renders as visible ASCII."""
        encoded = sf_string(value)
        assert visible(encoded)
        assert parse_item("t;v=" + encoded)[1][0][0] == "v"

    def test_long_value_is_cut_with_ellipsis(self) -> None:
        """A value longer than MAX_VALUE is cut to MAX_VALUE characters ending in `...`."""
        encoded = sf_string("a" * (MAX_VALUE * 4))
        inner = encoded[1:-1]
        assert len(inner) <= MAX_VALUE
        assert inner.endswith("...")
        assert inner[:-3] == "a" * len(inner[:-3])

    def test_value_that_fits_is_not_cut(self) -> None:
        """A plain value of exactly MAX_VALUE characters fits and is kept whole."""
        value = "a" * MAX_VALUE
        assert sf_string(value) == f'"{value}"'

    def test_custom_limit(self) -> None:
        """The limit argument bounds the content, `...` included."""
        assert sf_string("abcdefghij", limit=8) == '"abcde..."'

    @pytest.mark.parametrize("piece", ['"', "\\", "%", "\n", "é", "\U0001f600", "\udcff"])
    @pytest.mark.parametrize("offset", range(-6, 3))
    def test_cut_never_splits_an_escape(self, piece: str, offset: int) -> None:
        """Around the cut, a `\\"`, `\\\\` or `%xx` escape is kept whole or left out whole."""
        value = "a" * (MAX_VALUE - 3 + offset) + piece * 10
        encoded = sf_string(value)
        content = parse_string(encoded)  # raises on a broken backslash escape
        assert len(encoded) - 2 <= MAX_VALUE
        assert content.endswith("...")
        decoded = percent_decode(content[:-3])  # raises on a broken percent escape
        assert raw(value).startswith(decoded)

    @given(TEXT)
    def test_any_text_round_trips(self, value: str) -> None:
        """Any value encodes to a valid bounded sf-string whose decoding is the value or a prefix of it."""
        encoded = sf_string(value)
        assert visible(encoded)
        assert len(encoded) <= MAX_VALUE + 2
        content = parse_string(encoded)
        if content.endswith("...") and len(content) > MAX_VALUE - 3:
            assert raw(value).startswith(percent_decode(content[:-3]))
        else:
            assert percent_decode(content) == raw(value)


class TestSfItem:
    """sf_item: a token with int, string and boolean parameters."""

    @pytest.mark.parametrize(
        ("token", "params", "expected"),
        [
            pytest.param("no_route", [], "no_route", id="bare-token"),
            pytest.param("t", [("status", 503)], "t;status=503", id="int"),
            pytest.param("t", [("n", -1)], "t;n=-1", id="negative-int"),
            pytest.param("t", [("n", 0)], "t;n=0", id="zero"),
            pytest.param("t", [("host", "a b")], 't;host="a b"', id="string"),
            pytest.param("t", [("host", "")], 't;host=""', id="empty-string"),
            pytest.param("t", [("report", True)], "t;report", id="true"),
            pytest.param("t", [("report", False)], "t;report=?0", id="false"),
            pytest.param(
                "upstream_not_tls",
                [("status", 503), ("flags", "UF"), ("detail", "WRONG_VERSION_NUMBER")],
                'upstream_not_tls;status=503;flags="UF";detail="WRONG_VERSION_NUMBER"',
                id="order-kept",
            ),
            pytest.param("*x:y/z", [("*k.a-b_c", 1)], "*x:y/z;*k.a-b_c=1", id="rfc-charset"),
        ],
    )
    def test_serialization(
        self, token: str, params: list[tuple[str, str | int | bool]], expected: str
    ) -> None:
        """Ints are bare, strings quoted, True is a bare key and False is `?0`."""
        assert sf_item(token, params) == expected

    @pytest.mark.parametrize(
        "token",
        ["", "1abc", "-x", "_x", "no route", "a\r\n", "a\n", "é", 'a"b', "a,b", "a;b", "a=b"],
        ids=[
            "empty",
            "digit-first",
            "dash-first",
            "underscore-first",
            "space",
            "crlf",
            "trailing-lf",
            "non-ascii",
            "dquote",
            "comma",
            "semicolon",
            "equals",
        ],
    )
    def test_bad_token_rejected(self, token: str) -> None:
        """A string that is not an RFC 8941 token raises ValueError."""
        with pytest.raises(ValueError, match="token"):
            sf_item(token)

    @pytest.mark.parametrize(
        "key",
        ["", "Status", "1a", "_a", "-a", "a b", "a=b", "a;b", "é", "a\n"],
        ids=[
            "empty",
            "upper-case",
            "digit-first",
            "underscore-first",
            "dash-first",
            "space",
            "equals",
            "semicolon",
            "non-ascii",
            "trailing-lf",
        ],
    )
    def test_bad_key_rejected(self, key: str) -> None:
        """A parameter key that is not an RFC 8941 key raises ValueError."""
        with pytest.raises(ValueError, match="key"):
            sf_item("t", [(key, 1)])

    @pytest.mark.parametrize("value", [10**15, -(10**15), 2**63], ids=["1e15", "-1e15", "2^63"])
    def test_integer_out_of_range_rejected(self, value: int) -> None:
        """An integer beyond RFC 8941's 15 digits cannot be serialized and raises ValueError."""
        with pytest.raises(ValueError):
            sf_item("t", [("n", value)])

    def test_largest_integer_accepted(self) -> None:
        """RFC 8941's largest integer, 999,999,999,999,999, is serialized as is."""
        assert sf_item("t", [("n", 999_999_999_999_999)]) == "t;n=999999999999999"

    @given(
        st.lists(
            st.tuples(
                st.from_regex(r"[a-z*][a-z0-9_\-.*]*", fullmatch=True).filter(
                    lambda k: len(k) < 20
                ),
                st.one_of(
                    st.integers(min_value=-(10**15) + 1, max_value=10**15 - 1),
                    st.booleans(),
                    TEXT,
                ),
            ),
            max_size=5,
            unique_by=lambda kv: kv[0],  # RFC 8941: a repeated key overwrites the earlier one
        )
    )
    def test_parses_back(self, params: list[tuple[str, str | int | bool]]) -> None:
        """Whatever the parameter values, the item parses back to the same keys and values."""
        bare, parsed = parse_item(sf_item("reason", params))
        assert bare == "reason"
        assert [k for k, _ in parsed] == [k for k, _ in params]
        for (_, sent), (_, got) in zip(params, parsed, strict=True):
            if isinstance(sent, bool):
                assert got is sent
            elif isinstance(sent, int):
                assert got == sent
            else:
                assert isinstance(got, str)
                assert not isinstance(got, Token)
                decoded = percent_decode(got.removesuffix("..."))
                assert raw(sent).startswith(decoded)


WRONG_VERSION = (
    "TLS_error:|268435703:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER:TLS_error_end"
)
METADATA = (
    'filter_metadata {\n  key: "istio"\n  value {\n    fields {\n      key: "config"\n'
    '      value {\n        string_value: "/apis/networking.istio.io/v1alpha3/namespaces/'
    'default/destination-rule/reviews"\n      }\n    }\n  }\n}'
)


class TestDiagnosisHeaders:
    """diagnosis_headers: the x-extproc-diagnosis Item and the x-extproc-hint line."""

    def test_names_and_values(self) -> None:
        """The first header is the diagnosis Item, the second the hint as printable text."""
        diagnosis = Diagnosis(
            "upstream_not_tls",
            HINTS["upstream_not_tls"],
            (("status", 503), ("flags", "UF"), ("detail", "WRONG_VERSION_NUMBER")),
        )
        # The header names are the contract in docs/reasons.md, spelled out here.
        assert diagnosis_headers(diagnosis) == (
            (
                "x-extproc-diagnosis",
                'upstream_not_tls;status=503;flags="UF";detail="WRONG_VERSION_NUMBER"',
            ),
            ("x-extproc-hint", HINTS["upstream_not_tls"]),
        )

    def test_classified_evidence_parses_back(self) -> None:
        """A real diagnosis parses back to its reason and its evidence, after percent-decoding."""
        ev = Evidence(
            status=503,
            flags=F.UF | F.URX,
            code_details="upstream_reset_before_response_started{remote_connection_failure|"
            + WRONG_VERSION.replace(" ", "_")
            + "}",
            transport_failure_reason=WRONG_VERSION,
            cluster="outbound|9080||reviews.default.svc.cluster.local",
            host='rev"iews\\:9080 é%\r\n',
            cluster_metadata=METADATA,
            has_attributes=True,
        )
        diagnosis = classify(ev)
        assert diagnosis is not None
        headers = dict(diagnosis_headers(diagnosis))
        bare, params = parse_item(headers[DIAGNOSIS_HEADER])
        assert isinstance(bare, Token)
        assert bare == diagnosis.reason == "upstream_not_tls"
        decoded = [
            (k, percent_decode(v).decode("utf-8", "surrogateescape") if isinstance(v, str) else v)
            for k, v in params
        ]
        assert decoded == list(diagnosis.evidence)
        assert dict(decoded)["dr"] == "default/reviews"
        assert dict(decoded)["detail"] == "WRONG_VERSION_NUMBER"

    @pytest.mark.parametrize(
        "reason",
        sorted({sig.reason for sig in CATALOGUE}),
    )
    def test_every_reason_is_a_token(self, reason: str) -> None:
        """Every reason code in the catalogue serializes as a bare RFC 8941 token."""
        bare, params = parse_item(sf_item(reason))
        assert isinstance(bare, Token)
        assert bare == reason
        assert params == []

    def test_every_hint_renders_unchanged(self) -> None:
        """The catalogue's hints are plain ASCII, so the hint header carries them verbatim."""
        hints = set(HINTS.values()) | {s.hint for s in CATALOGUE if s.hint}
        for hint in hints:
            assert printable(hint) == hint

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            pytest.param('say "hi" \\o/', 'say "hi" \\o/', id="quotes-and-backslash-kept"),
            pytest.param("a\r\nb", "a%0d%0ab", id="crlf-encoded"),
            pytest.param("50%", "50%25", id="percent"),
            pytest.param("é", "%c3%a9", id="utf8"),
        ],
    )
    def test_printable(self, text: str, expected: str) -> None:
        """printable keeps visible ASCII as is and percent-encodes everything else."""
        assert printable(text) == expected

    def test_lone_surrogate_in_evidence_renders(self) -> None:
        """A Host holding a lone surrogate (a JSON access log's `\\ud800`) still renders headers."""
        diagnosis = classify(Evidence(status=503, flags=F.UF, host="\ud800"))
        assert diagnosis is not None
        value = dict(diagnosis_headers(diagnosis))[DIAGNOSIS_HEADER]
        assert visible(value)

    @settings(max_examples=300, deadline=None)
    @given(EVIDENCE)
    def test_any_evidence_renders_safely(self, ev: Evidence) -> None:
        """Any failure (any 5xx among them) is diagnosed, and its headers parse with http-sfv
        back to its reason and evidence keys, visible ASCII and bounded."""
        diagnosis = classify(ev)
        if diagnosis is None:
            assert not is_envoy_failure(ev)
            assert (ev.status or 0) < 500
            return
        headers = dict(diagnosis_headers(diagnosis))
        value, hint = headers[DIAGNOSIS_HEADER], headers[HINT_HEADER]
        assert visible(value)
        assert visible(hint)
        assert len(value) <= DIAGNOSIS_BOUND
        assert len(hint) <= HINT_BOUND
        bare, params = parse_item(value)
        assert bare == diagnosis.reason
        assert [k for k, _ in params] == [k for k, _ in diagnosis.evidence]


class TestActionsHeader:
    """actions_header: the x-extproc-actions List."""

    @pytest.mark.parametrize(
        ("applied", "expected"),
        [
            pytest.param([], "", id="empty"),
            pytest.param(
                [Applied("strip-echoed-envoy-headers", ("x-envoy-attempt-count",), report=True)],
                'strip-echoed-envoy-headers;headers="x-envoy-attempt-count";report',
                id="report-only",
            ),
            pytest.param(
                [Applied("strip-forwarding-headers", ("x-real-ip", "forwarded"))],
                'strip-forwarding-headers;headers="x-real-ip forwarded"',
                id="two-names",
            ),
            pytest.param(
                [
                    Applied("strip-hop-by-hop-headers", ("keep-alive",)),
                    Applied("rewrite-host", (":authority",), report=True),
                    Applied("no-names"),
                ],
                'strip-hop-by-hop-headers;headers="keep-alive", '
                'rewrite-host;headers=":authority";report, no-names',
                id="several",
            ),
        ],
    )
    def test_output(self, applied: list[Applied], expected: str) -> None:
        """Each rule is a token, with its header names and `;report` when nothing changed."""
        assert actions_header(applied) == expected

    def test_parses_as_list(self) -> None:
        """The header parses as an RFC 8941 List with the tokens and parameters we wrote."""
        applied = [
            Applied("strip-echoed-envoy-headers", ("x-envoy-attempt-count",), report=True),
            Applied("strip-underscore-headers", ("x_user",)),
        ]
        assert parse_list(actions_header(applied)) == [
            (
                "strip-echoed-envoy-headers",
                [("headers", "x-envoy-attempt-count"), ("report", True)],
            ),
            ("strip-underscore-headers", [("headers", "x_user")]),
        ]

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.builds(
                Applied,
                token=st.sampled_from(["strip-echoed-envoy-headers", "rewrite-host", "x"]),
                names=st.lists(TEXT, max_size=4).map(tuple),
                report=st.booleans(),
            ),
            max_size=4,
        )
    )
    def test_any_header_names_render_safely(self, applied: list[Applied]) -> None:
        """Whatever the header names, the List holds only bytes 0x20-0x7E, parses, and is bounded."""
        value = actions_header(applied)
        assert visible(value)
        bound = sum(len(a.token) + len(';headers=""') + MAX_VALUE + len(";report") for a in applied)
        assert len(value) <= bound + 2 * len(applied)
        if not applied:  # RFC 8941 §4.1.1: an empty List is not sent (the server sends no header)
            assert value == ""
            return
        members = parse_list(value)
        assert [m[0] for m in members] == [a.token for a in applied]
        for (_, params), entry in zip(members, applied, strict=True):
            assert (("report", True) in params) == entry.report
