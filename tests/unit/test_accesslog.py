"""Tests for extproc.accesslog: what users paste becomes Evidence, and whole logs a summary."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from re import _parser as sre_parse  # the parser `re` itself uses (sre_parse is deprecated)

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc import flags as F
from extproc.accesslog import read_text
from extproc.accesslog.formats import TEXT_FORMATS, tokens
from extproc.accesslog.scan import PATTERNS
from extproc.accesslog.summary import MAX_LINE, lines_of, summarise
from extproc.cli import build_parser
from extproc.diagnosis import classify

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "lines"


def records(name: str) -> list[dict[str, object]]:
    """The records of one fixture file under tests/corpus/lines/."""
    loaded = yaml.safe_load((CORPUS / name).read_text(encoding="utf-8"))
    assert isinstance(loaded, list)
    return loaded


def main(argv: list[str]) -> int:
    """Run an `extproc` command without `cli.main`'s logging setup (it outlives capsys)."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


def text_of(record: dict[str, object]) -> str:
    return str(record.get("line") or record["text"])


def reason(text: str) -> str | None:
    diagnosis = classify(read_text(text).evidence)
    return diagnosis.reason if diagnosis else None


THREADS = records("threads.yaml")
RECORDED = records("recorded.yaml")


class TestRealThreadLines:
    """Lines users posted in public threads: each is read, in the right form, to the right reason."""

    @pytest.mark.parametrize("record", THREADS, ids=[str(r["id"]) for r in THREADS])
    def test_line(self, record: dict[str, object]) -> None:
        """The line is read as the form noted and classified to the expected reason."""
        reading = read_text(text_of(record))
        assert reading.is_log
        assert reading.form == record["form"]
        got = reason(text_of(record))
        if record.get("pending") and got != record["expected"]:
            print(f"{record['id']}: {got} today, {record['expected']} after {record['pending']}")
            return
        assert got == record["expected"]

    def test_share_right(self) -> None:
        """Print the share of real-thread lines diagnosed right today (pending ones included)."""
        right = sum(reason(text_of(r)) == r["expected"] for r in THREADS)
        print(f"real-thread lines right: {right}/{len(THREADS)}")
        pending = sum(bool(r.get("pending")) for r in THREADS)
        assert right >= len(THREADS) - pending


class TestRecordedLines:
    """Lines and bodies recorded from Envoy 1.40 (tests/envoy/access_log_recorder.py)."""

    @pytest.mark.parametrize("record", RECORDED, ids=[f"{r['form']}-{r['case']}" for r in RECORDED])
    def test_line(self, record: dict[str, object]) -> None:
        """Each recorded line reads in its exact format and gets the reason of its case."""
        reading = read_text(text_of(record))
        assert reading.form == record["form"]
        assert reason(text_of(record)) == record["expected"]

    def test_every_format_was_recorded(self) -> None:
        """The recording covers Envoy's default, Istio's text and Envoy Gateway's JSON format."""
        assert {r["form"] for r in RECORDED} >= {"envoy", "istio", "envoy-gateway-json"}


class TestStrayQuotes:
    """Issue 10 item 8: Envoy does not escape a `"` in a quoted field; the line still reads."""

    def test_user_agent_with_quotes_keeps_every_field(self) -> None:
        """The recorded User-Agent `probe/1.0 "quoted" ua"` costs no evidence field."""
        line = next(r for r in RECORDED if r["form"] == "istio" and r["case"] == "not-tls")
        reading = read_text(text_of(line))
        assert '"quoted"' in text_of(line)
        assert reading.evidence.cluster == "outbound|8080||not-tls.default.svc.cluster.local"
        assert reading.evidence.host == "shop.default.svc.cluster.local"
        assert "WRONG_VERSION_NUMBER" in reading.evidence.transport_failure_reason

    def test_quote_in_the_path(self) -> None:
        """A `"` in the request path does not move the status and flags."""
        line = next(r for r in RECORDED if r["form"] == "istio" and r["case"] == "closed")
        broken = text_of(line).replace("GET /closed", 'GET /closed"x" y')
        reading = read_text(broken)
        assert (reading.form, reading.evidence.status, reading.evidence.flags) == (
            "istio",
            503,
            F.UC,
        )

    def test_tokens_close_at_a_quote_before_a_blank(self) -> None:
        """A quoted field closes at the first quote followed by a blank, not at any quote."""
        assert tokens('a "b"c" "d" e') == [("a", False), ('b"c', True), ("d", True), ("e", False)]

    def test_unclosed_quote_is_a_bare_token(self) -> None:
        """A quote that never closes leaves a bare token, and reading goes on."""
        assert tokens('"open x') == [('"open', False), ("x", False)]


class TestTolerantReader:
    """Lines in no known format: evidence wherever it stands."""

    def test_unquoted_space_separated_format(self) -> None:
        """Issue 14's unquoted custom format: status after the protocol, flags after it."""
        line = "2019-03-06T11:07:34.910Z GET /websso HTTP/2 503 UC 0 57 0 - - 10.197.41.4:58440"
        reading = read_text(line)
        assert (reading.evidence.status, reading.evidence.flags, reading.time) == (
            503,
            F.UC,
            "2019-03-06T11:07:34.910Z",
        )

    def test_unknown_flag_is_left_out_not_fatal(self) -> None:
        """A flag name this version does not know is reported and the known ones kept."""
        reading = read_text('[t] "GET / HTTP/1.1" 503 UF,XYZ "-" "-"')
        assert (reading.evidence.flags, reading.unknown_flags) == (F.UF, ("XYZ",))

    def test_missing_fields_are_named(self) -> None:
        """Envoy's default format lacks details and cluster: the reading names the operators."""
        line = next(r for r in RECORDED if r["form"] == "envoy" and r["case"] == "refused")
        missing = read_text(text_of(line)).missing
        assert missing == (
            "%RESPONSE_CODE_DETAILS%",
            "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
            "%UPSTREAM_CLUSTER%",
        )

    def test_istio_format_misses_nothing(self) -> None:
        """Istio's default text format logs everything the diagnosis needs."""
        line = next(r for r in RECORDED if r["form"] == "istio")
        assert read_text(text_of(line)).missing == ()

    @pytest.mark.parametrize(
        "text",
        ["", "hello world", "2026-11-20T10:00:00.000Z info ads XDS: Pushing Services:12"],
    )
    def test_prose_has_no_evidence(self, text: str) -> None:
        """Text with no status, flags or details is not a log line."""
        assert not read_text(text).is_log


class TestLinearTime:
    """No pattern can take more than a constant per character of input.

    Every repetition has an upper bound, and where repetitions nest (an optional group
    around a bounded run) the product of their bounds stays small: a match attempt at
    one position then costs at most that constant, and a search is linear in the text.
    """

    COST_PER_POSITION = 10_000

    @staticmethod
    def chains(parsed: sre_parse.SubPattern, outer: int = 1) -> list[int]:
        """The product of the repeat bounds along every nesting chain of a parsed pattern."""
        found: list[int] = []
        for op, arg in parsed:
            if op in (sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT):
                high = arg[1]
                bound = outer * (high if high != sre_parse.MAXREPEAT else 10**18)
                found.append(bound)
                found += TestLinearTime.chains(arg[2], bound)
            elif op in (sre_parse.SUBPATTERN, sre_parse.ASSERT, sre_parse.ASSERT_NOT):
                found += TestLinearTime.chains(arg[-1], outer)
            elif op is sre_parse.BRANCH:
                for branch in arg[1]:
                    found += TestLinearTime.chains(branch, outer)
        return found

    @pytest.mark.parametrize("pattern", PATTERNS, ids=[p.pattern[:30] for p in PATTERNS])
    def test_pattern_costs_a_constant_per_position(self, pattern: re.Pattern[str]) -> None:
        """Every repetition is bounded, and nested bounds multiply to a small constant."""
        chains = self.chains(sre_parse.parse(pattern.pattern, pattern.flags))
        assert max(chains, default=1) <= self.COST_PER_POSITION


class TestNeverFails:
    """No input makes the reader raise or `diagnose -` exit with an error."""

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=4000))
    def test_random_bytes(self, data: bytes) -> None:
        """Random bytes, invalid UTF-8 included, are summarised, every line counted."""
        summary = summarise(lines_of(io.BytesIO(data)))
        expected = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
        assert summary.lines == expected

    @settings(max_examples=100, deadline=None)
    @given(st.sampled_from(THREADS + RECORDED), st.integers(min_value=0, max_value=2000))
    def test_truncated_lines(self, record: dict[str, object], cut: int) -> None:
        """Any prefix of a real line reads without an error."""
        reading = read_text(text_of(record)[:cut])
        assert reading.form

    def test_very_long_line_is_cut(self) -> None:
        """A line longer than MAX_LINE is read cut, counted, and the next line still read."""
        line = text_of(RECORDED[3]).encode()
        data = b"x" * (3 * MAX_LINE) + b"\n" + line + b"\n"
        out = list(lines_of(io.BytesIO(data)))
        assert [(len(raw), cut) for raw, cut in out] == [(MAX_LINE, True), (len(line), False)]

    def test_cli_exit_status_on_garbage(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`diagnose` on text with no evidence says so and exits 0."""
        assert main(["diagnose", "\udcff garbage"]) == 0
        assert "no failure evidence found" in capsys.readouterr().out


class TestSummary:
    """A whole log: failures grouped by reason and cluster, most frequent first."""

    def log(self) -> bytes:
        by = {(r["form"], r["case"]): text_of(r) for r in RECORDED}
        lines = [by["istio", "refused"]] * 3 + [by["istio", "ok"], by["istio", "closed"]]
        lines += ["2026-11-20T10:00:00Z info ads XDS: Pushing", by["istio", "refused"]]
        return ("\n".join(lines) + "\n").encode()

    def test_groups_and_counts(self) -> None:
        """Four refused, one closed, one success, one non-log line."""
        summary = summarise(lines_of(io.BytesIO(self.log())))
        ranked = [(g.reason, g.count) for g in summary.ranked()]
        assert ranked == [("upstream_refused", 4), ("upstream_connection_closed", 1)]
        assert (summary.lines, summary.successes, summary.not_log) == (7, 1, 1)

    def test_first_and_last_seen(self) -> None:
        """A group keeps the time of its first and its last line."""
        summary = summarise(lines_of(io.BytesIO(self.log())))
        group = summary.ranked()[0]
        assert group.first_seen and group.last_seen >= group.first_seen

    def test_json_output(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`diagnose - --json` prints the same summary as data."""
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(self.log())))
        assert main(["diagnose", "-", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["groups"][0]["reason"] == "upstream_refused"
        assert data["groups"][0]["count"] == 4

    def test_one_line_on_stdin_is_one_diagnosis(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A single piped line gets the single-line report, not a summary."""
        line = next(text_of(r) for r in RECORDED if r["case"] == "timeout")
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(line.encode())))
        assert main(["diagnose", "-"]) == 0
        assert "reason:   upstream_timeout" in capsys.readouterr().out

    def test_curl_output_on_stdin(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`curl -v` output is read whole: status line, headers and body."""
        curl = (
            "*   Trying 10.0.0.1:80...\n> GET / HTTP/1.1\n> Host: shop\n>\n"
            "< HTTP/1.1 503 Service Unavailable\n< server: envoy\n<\n"
            "upstream connect error or disconnect/reset before headers. "
            "reset reason: connection termination\n"
        )
        monkeypatch.setattr(
            "sys.stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(curl.encode())))
        )
        assert main(["diagnose", "-"]) == 0
        out = capsys.readouterr().out
        assert "reason:   upstream_connection_closed" in out
        assert "host=shop" in out


def test_formats_are_distinct() -> None:
    """Each recorded text line fits exactly one row of the format table."""
    from extproc.accesslog.formats import _align

    for record in RECORDED:
        if record["form"] in ("envoy", "istio"):
            toks = tokens(text_of(record))
            fits = [f.name for f in TEXT_FORMATS if _align(f, toks) is not None]
            assert fits == [record["form"]]


# The lab client sidecar's JSON access-log line for a gRPC call that ended UNAVAILABLE
# on every attempt (Envoy 1.40, `grpc_unavailable` in tests/envoy/test_signatures.py).
GRPC_RETRIED_LINE = {
    "method": "POST",
    "path": "/lab.App/Call",
    "authority": "grpc.demo",
    "response_code": 200,
    "response_flags": "URX",
    "response_code_details": "via_upstream",
    "upstream_transport_failure_reason": None,
    "route_name": "grpc",
    "upstream_cluster": "grpc",
    "upstream_host": "127.0.0.1:38827",
    "upstream_service_time": "1",
    "grpc_status": 14,
}


class TestGrpcStatusField:
    def test_logged_grpc_status_makes_the_retried_200_an_app_error(self) -> None:
        """With %GRPC_STATUS_NUMBER% logged, an HTTP 200 with URX is the app's gRPC 14."""
        reading = read_text(json.dumps(GRPC_RETRIED_LINE))
        assert reading.evidence.grpc_status == 14
        assert "grpc" in reading.used
        diagnosis = classify(reading.evidence)
        assert diagnosis is not None
        assert diagnosis.reason == "upstream_app_error"
        assert ("grpc", 14) in diagnosis.evidence

    def test_without_grpc_status_the_200_is_left_alone(self) -> None:
        """Istio's format logs no gRPC status: a 200 with URX may be a hedged success, so no reason."""
        line = {k: v for k, v in GRPC_RETRIED_LINE.items() if k != "grpc_status"}
        assert classify(read_text(json.dumps(line)).evidence) is None


class TestDoctorsOwnDiagnosis:
    """Issue 19 item 7: a line that carries the doctor's diagnosis is read with it."""

    CLOSED = (
        '"response_code": 503, "response_flags": "UC", "response_code_details": '
        '"upstream_reset_before_response_started{connection_termination}", '
        '"upstream_cluster": "outbound|8080||ratings.default.svc.cluster.local", "authority": "r"'
    )

    def test_json_metadata(self) -> None:
        """`%DYNAMIC_METADATA(extproc_doctor)%` in a JSON line: its reason and hint win."""
        line = "{" + self.CLOSED + ', "extproc_doctor": {"reason": "upstream_requires_mtls", '
        line += '"hint": "The live hint.", "tls": "off"}}'
        diagnosis = classify(read_text(line).evidence)
        assert diagnosis is not None
        assert (diagnosis.reason, diagnosis.hint) == ("upstream_requires_mtls", "The live hint.")

    def test_without_it_the_line_alone_decides(self) -> None:
        """The same line without the doctor's field: what the line alone supports."""
        diagnosis = classify(read_text("{" + self.CLOSED + "}").evidence)
        assert diagnosis is not None and diagnosis.reason == "upstream_connection_closed"

    def test_header_in_pasted_text(self) -> None:
        """An x-extproc-diagnosis header in `curl -v` output names the reason."""
        text = '< HTTP/1.1 503 Service Unavailable\n< x-extproc-diagnosis: alpn_mismatch;flags="UF"'
        diagnosis = classify(read_text(text).evidence)
        assert diagnosis is not None and diagnosis.reason == "alpn_mismatch"

    def test_unknown_reason_is_ignored(self) -> None:
        """A reason the catalogue does not have is no diagnosis of its own."""
        line = "{" + self.CLOSED + ', "extproc_doctor": {"reason": "made_up", "hint": "x"}}'
        diagnosis = classify(read_text(line).evidence)
        assert diagnosis is not None and diagnosis.reason == "upstream_connection_closed"
