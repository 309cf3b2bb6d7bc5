"""`extproc diagnose` on what users really paste: gRPC client errors in every client's
words, deeply nested JSON, long lines, several lines at once, a pipe without `-`.

Whatever the input, diagnose never raises: a line it cannot read counts as unread (by
error type) and the summary goes on; it exits 0, or 1 when a single text could not be
read at all, or 2 for a usage error.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc import accesslog
from extproc.accesslog import Unread, diagnose_text, read_text
from extproc.accesslog.summary import MAX_LINE, lines_of, summarise
from extproc.cli import build_parser
from extproc.diagnosis import classify

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "lines"


def corpus_lines() -> list[str]:
    """Every real line under tests/corpus/lines/ (recorded from Envoy, posted in threads)."""
    lines = []
    for name in ("recorded.yaml", "threads.yaml"):
        for record in yaml.safe_load((CORPUS / name).read_text(encoding="utf-8")):
            lines.append(str(record.get("line") or record["text"]))
    return lines


REAL_LINES = corpus_lines()


def main(argv: list[str]) -> int:
    """Run an `extproc` command without `cli.main`'s logging setup (it outlives capsys)."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


def stdin_of(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(data))))


# Envoy's local-reply bodies (recorded from Envoy 1.40), as a client error carries them.
RESET = "upstream connect error or disconnect/reset before headers. reset reason: connection termination"
NO_HEALTHY = "no healthy upstream"

# Each client's own format, read in its source: grpc-go internal/status/status.go
# `Status.String` (grpc/grpc-go 4793ad0); grpc-js packages/grpc-js/src/call.ts line 83
# (grpc/grpc-node 2670b37); grpc-java api/src/main/java/io/grpc/Status.java
# `formatThrowableMessage` (grpc/grpc-java 5fda0c7), which StatusRuntimeException uses.
PASTED = [
    pytest.param(f"rpc error: code = Unavailable desc = {RESET}", 14, "upstream_connection_closed", id="go"),
    pytest.param(f"Error: 14 UNAVAILABLE: {NO_HEALTHY}", 14, "no_healthy_upstream", id="grpc-js"),
    pytest.param(
        f"io.grpc.StatusRuntimeException: UNAVAILABLE: {RESET}", 14, "upstream_connection_closed",
        id="java",
    ),
    pytest.param(
        f"Exception in thread \"main\" io.grpc.StatusRuntimeException: UNAVAILABLE: {NO_HEALTHY}",
        14, "no_healthy_upstream", id="java-thread",
    ),
    # A status name with no Envoy words after it is no evidence (issue 19: innocent text).
    pytest.param("DEADLINE_EXCEEDED: deadline exceeded after 0.99s", None, None, id="java-deadline"),
    pytest.param(
        f'status = StatusCode.UNAVAILABLE details = "{NO_HEALTHY}"', 14, "no_healthy_upstream",
        id="python",
    ),
    pytest.param(f"Unavailable: {RESET}", 14, "upstream_connection_closed", id="go-name-short"),
]  # fmt: skip


class TestPastedGrpcErrors:
    @pytest.mark.parametrize(("text", "code", "reason"), PASTED)
    def test_read_with_its_status(self, text: str, code: int | None, reason: str | None) -> None:
        """Each client's error form gives its gRPC status and the reason of the body it carries."""
        reading = read_text(text)
        assert reading.evidence.grpc_status == code
        diagnosis = classify(reading.evidence)
        assert (diagnosis.reason if diagnosis else None) == reason

    def test_prose_with_a_colon_is_no_grpc_error(self) -> None:
        """`ERROR: ...` or `OK: ...` in prose names no gRPC status."""
        assert read_text("ERROR: OK: the job finished").evidence.grpc_status is None

    def test_java_line_in_a_log_does_not_stop_the_summary(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A Java StatusRuntimeException line among access-log lines is one more line counted."""
        log = [
            REAL_LINES[0],
            f"io.grpc.StatusRuntimeException: UNAVAILABLE: {RESET}",
            REAL_LINES[1],
        ]
        stdin_of(monkeypatch, "\n".join(log).encode())
        assert main(["diagnose", "-", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["lines"] == 3


class TestUnreadable:
    def test_deeply_nested_json_line_is_read(self) -> None:
        """A JSON line nested 20000 deep (Python's parser recurses) is searched, not fatal."""
        result = diagnose_text('{"a":' * 6000 + "1" + "}" * 6000)
        assert not isinstance(result, Unread)
        assert not read_text("[" * 20000 + "]" * 20000).is_log

    def test_a_line_that_breaks_the_reader_is_counted_unread(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Whatever a line makes the reader raise, it is counted unread by error type, in
        `--json` too, and the summary goes on with the next lines."""
        real = accesslog.read_text

        def fragile(text: str) -> accesslog.Reading:
            if "poison" in text:
                raise RecursionError("maximum recursion depth exceeded")
            return real(text)

        monkeypatch.setattr(accesslog, "read_text", fragile)
        stdin_of(monkeypatch, "\n".join([REAL_LINES[2], "poison", REAL_LINES[2]]).encode())
        assert main(["diagnose", "-", "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["unread_lines"] == {"RecursionError": 1}
        assert summary["lines"] == 3 and summary["failures"] + summary["successes"] == 2
        assert main(["diagnose", "\n".join([REAL_LINES[2], "poison"])]) == 0
        assert "1 unreadable (RecursionError 1)" in capsys.readouterr().out

    def test_a_single_unreadable_text_exits_1(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """One text that cannot be read says so, with the error type, and exits 1."""

        def broken(text: str) -> accesslog.Reading:
            raise MemoryError

        monkeypatch.setattr(accesslog, "read_text", broken)
        assert main(["diagnose", "--json", "anything"]) == 1
        assert json.loads(capsys.readouterr().out) == {"reason": None, "unread": "MemoryError"}


class TestStdinWithoutDash:
    def test_piped_log_is_read_without_dash(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`kubectl logs … | extproc diagnose`: stdin not a terminal is read like `-`."""
        stdin_of(monkeypatch, ("\n".join(REAL_LINES[:6]) + "\n").encode())
        assert main(["diagnose", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["lines"] == 6

    def test_terminal_without_text_prints_usage(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """No TEXT on a terminal: the usage on stderr and exit 2, not a silent 'no failure'."""

        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        monkeypatch.setattr("sys.stdin", Terminal())
        assert main(["diagnose"]) == 2
        captured = capsys.readouterr()
        assert "usage:" in captured.err and captured.out == ""

    def test_real_pipe(self) -> None:
        """Through a real pipe into the installed command, a recorded failure is summarised."""
        log = "\n".join(REAL_LINES[:4]) + "\n"
        done = subprocess.run(
            [sys.executable, "-m", "extproc", "diagnose", "--json"],
            input=log.encode(), capture_output=True, check=False, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["lines"] == 4


class TestSeveralLinesInText:
    def test_evidence_is_never_pieced_together_from_lines(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A TEXT of several lines is a log: a TLS reason on line 2 never explains line 1's 503."""
        text = (
            "status=503 flags=UF\n"
            "transport failure reason: TLS_error:|268435703:SSL routines:OPENSSL_internal:"
            "WRONG_VERSION_NUMBER:TLS_error_end"
        )
        assert main(["diagnose", "--json", text]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["lines"] == 2
        assert "upstream_not_tls" not in json.dumps(out)

    def test_text_of_a_log_gets_the_summary(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`extproc diagnose "$(cat log)"` summarises the log, one line at a time."""
        assert main(["diagnose", "--json", "\n".join(REAL_LINES[:5])]) == 0
        assert json.loads(capsys.readouterr().out)["lines"] == 5


# Structured generators: what users paste, not only random bytes.
CODES = st.sampled_from([("Unavailable", "UNAVAILABLE", 14), ("DeadlineExceeded",
                         "DEADLINE_EXCEEDED", 4), ("Internal", "INTERNAL", 13)])  # fmt: skip
BODIES = st.one_of(
    st.sampled_from([RESET, NO_HEALTHY, "upstream request timeout"]), st.text(max_size=80)
)


@st.composite
def grpc_errors(draw: st.DrawFn) -> str:
    """A gRPC client error in Go, grpc-js, Java or Python form, with an Envoy body or any text."""
    go, upper, number = draw(CODES)
    body = draw(BODIES)
    form = draw(st.sampled_from([
        f"rpc error: code = {go} desc = {body}", f"{number} {upper}: {body}",
        f"io.grpc.StatusRuntimeException: {upper}: {body}", f"status = StatusCode.{upper} details = \"{body}\"",
        f"{go}: {body}", f"{upper}: {body}",
    ]))  # fmt: skip
    return form


@st.composite
def nested_json(draw: st.DrawFn) -> str:
    depth = draw(st.integers(min_value=1, max_value=8000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('{"response_code":', "}")]))
    return (
        opener * depth
        + draw(st.sampled_from(["503", "1", '"x"']))
        + closer * draw(st.integers(min_value=0, max_value=depth))
    )


@st.composite
def long_lines(draw: st.DrawFn) -> str:
    unit = draw(
        st.sampled_from(["TLS_error:a:b:c ", "outbound|1|a|", "status=", "a", REAL_LINES[3]])
    )
    return unit * (draw(st.integers(min_value=1, max_value=3 * MAX_LINE)) // len(unit) + 1)


LINES = st.one_of(
    st.sampled_from(REAL_LINES),
    st.tuples(st.sampled_from(REAL_LINES), st.integers(0, 400)).map(lambda t: t[0][: t[1]]),
    grpc_errors(),
    nested_json(),
    long_lines(),
    st.text(max_size=200).map(lambda s: s.replace("\n", " ")),
)


def physical_lines(data: bytes) -> int:
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


class TestNeverFails:
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(LINES, max_size=12), st.sampled_from(["\n", "\r\n"]))
    def test_mixed_log_is_summarised_every_line_counted(self, lines: list[str], eol: str) -> None:
        """A log of real lines, cut lines, gRPC errors, nested JSON and long lines is read
        whole: every line lands in exactly one count, and none raises."""
        data = eol.join(lines).encode("utf-8", "surrogatepass")
        summary = summarise(lines_of(io.BytesIO(data)))
        assert summary.lines == physical_lines(data)
        counted = (
            summary.failures + summary.successes + summary.not_log + sum(summary.unread.values())
        )
        nonblank = sum(
            1 for raw, _ in lines_of(io.BytesIO(data)) if raw.decode("utf-8", "replace").strip()
        )
        assert counted == nonblank

    @settings(
        max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    # `-` is not pasted text: it means "read stdin" (TestStdinWithoutDash reads stdin).
    @given(text=LINES.filter(lambda text: text != "-"))
    def test_any_text_exits_as_documented(
        self, text: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`extproc diagnose TEXT` on any pasted text prints a report and exits 0 (1 only
        when unread)."""
        status = main(["diagnose", "--json", "--", text])
        report = json.loads(capsys.readouterr().out)
        assert status == (1 if "unread" in report else 0)
