"""HTTP load against Envoy: wrk, h2load, or a small Python generator when neither is installed.

Strategy: wrk drives the throughput run (many connections, two threads), the way the
design notes' numbers were measured, and reports its latency percentiles. h2load drives
the one-connection run: its per-request log holds every response's status and duration,
so the percentiles are exact and every status is checked. Each tool's text output is
parsed by a pure function, tested on real output. When a binary is missing, the Python
generator takes its place and every result says which generator produced it.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


class LoadError(RuntimeError):
    """A load generator failed or printed something the parser does not understand."""


@dataclass(frozen=True, slots=True)
class LoadResult:
    """One load run: how many requests completed, how fast, and their latency."""

    tool: str
    connections: int
    seconds: float
    requests: int
    p50_ms: float
    p99_ms: float
    # Responses by status class ("2xx", "5xx", ...); wrk only tells 2xx/3xx from the rest.
    statuses: dict[str, int] = field(default_factory=dict)
    errors: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def available_tools() -> dict[str, bool]:
    """Which external load generators are on PATH."""
    return {name: shutil.which(name) is not None for name in ("wrk", "h2load")}


def tool_versions() -> dict[str, str]:
    """The first line each installed tool prints about its version, for the report."""
    commands = {"wrk": ["wrk", "--version"], "h2load": ["h2load", "--version"]}
    versions = {}
    for name, command in commands.items():
        if shutil.which(name) is None:
            continue
        out = subprocess.run(command, capture_output=True, text=True, check=False, timeout=10)
        versions[name] = (out.stdout or out.stderr).strip().splitlines()[0]
    return versions


def run_wrk(url: str, connections: int, duration: float, threads: int = 2) -> LoadResult:
    """wrk with --latency; at most `connections` threads, as wrk requires."""
    threads = max(1, min(threads, connections))
    command = [
        "wrk", "--latency", f"-t{threads}", f"-c{connections}", f"-d{_seconds(duration)}s", url,
    ]  # fmt: skip
    out = _run(command, duration)
    return parse_wrk(out, connections)


def run_h2load(url: str, connections: int, duration: float) -> LoadResult:
    """h2load over HTTP/1.1 for `duration` seconds, percentiles from its per-request log."""
    with tempfile.TemporaryDirectory(prefix="h2load-") as tmp:
        log = Path(tmp) / "requests.tsv"
        command = [
            "h2load", "--h1", f"-c{connections}", "-t1", f"-D{max(1, round(duration * 1000))}ms",
            f"--log-file={log}", url,
        ]  # fmt: skip
        out = _run(command, duration)
        seconds = parse_h2load_seconds(out)
        return parse_h2load_log(log.read_text(), connections, seconds)


def _seconds(duration: float) -> int:
    """wrk takes whole seconds."""
    return max(1, round(duration))


def _run(command: list[str], duration: float) -> str:
    result = subprocess.run(
        command, capture_output=True, text=True, check=False, timeout=duration * 3 + 30
    )
    if result.returncode != 0:
        raise LoadError(f"{command[0]} exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


_WRK_REQUESTS = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)")
_WRK_PERCENTILE = re.compile(r"^\s*(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE)
_WRK_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_WRK_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)


def parse_wrk(text: str, connections: int) -> LoadResult:
    """wrk --latency output → a LoadResult (wrk's own elapsed time, not the requested one)."""
    done = _WRK_REQUESTS.search(text)
    percentiles = {int(p): float(v) * _UNITS[u] for p, v, u in _WRK_PERCENTILE.findall(text)}
    if done is None or set(percentiles) != {50, 99}:
        raise LoadError(f"unexpected wrk output:\n{text}")
    requests = int(done.group(1))
    non_2xx = int(m.group(1)) if (m := _WRK_NON_2XX.search(text)) else 0
    errors = sum(int(n) for n in m.groups()) if (m := _WRK_SOCKET_ERRORS.search(text)) else 0
    statuses = {"2xx/3xx": requests - non_2xx, "other": non_2xx}
    return LoadResult(
        tool="wrk",
        connections=connections,
        seconds=float(done.group(2)) * _UNITS[done.group(3)] / 1e3,
        requests=requests,
        p50_ms=percentiles[50],
        p99_ms=percentiles[99],
        statuses={k: v for k, v in statuses.items() if v},
        errors=errors,
    )


_H2LOAD_FINISHED = re.compile(r"finished in ([\d.]+)(us|ms|s|m),")


def parse_h2load_seconds(text: str) -> float:
    """The measured duration h2load reports ("finished in 3.00s, ...")."""
    done = _H2LOAD_FINISHED.search(text)
    if done is None:
        raise LoadError(f"unexpected h2load output:\n{text}")
    return float(done.group(1)) * _UNITS[done.group(2)] / 1e3


def parse_h2load_log(text: str, connections: int, seconds: float) -> LoadResult:
    """h2load's per-request log (start µs, status, duration µs per line) → a LoadResult."""
    durations: list[float] = []
    statuses: Counter[str] = Counter()
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        status, micros = int(fields[1]), float(fields[2])
        statuses[f"{status // 100}xx" if status > 0 else "error"] += 1
        if status > 0:
            durations.append(micros / 1e3)
    if not durations:
        raise LoadError("h2load completed no request")
    p50, p99 = percentiles(durations)
    return LoadResult(
        tool="h2load",
        connections=connections,
        seconds=seconds,
        requests=len(durations),
        p50_ms=p50,
        p99_ms=p99,
        statuses=dict(statuses),
        errors=statuses.get("error", 0),
    )


def percentiles(values: list[float]) -> tuple[float, float]:
    """(p50, p99) by linear interpolation; one value is its own p50 and p99."""
    if len(values) == 1:
        return values[0], values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[98]


def run_python(url: str, connections: int, duration: float) -> LoadResult:
    """The fallback: keep-alive HTTP/1.1 GETs from asyncio, one task per connection."""
    return asyncio.run(_python_load(url, connections, duration))


async def _python_load(url: str, connections: int, duration: float) -> LoadResult:
    host, port, path = _split_url(url)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    tally = _Tally()
    started = time.perf_counter()
    deadline = started + duration
    await asyncio.gather(
        *(_python_connection(host, port, request, deadline, tally) for _ in range(connections))
    )
    seconds = time.perf_counter() - started
    if not tally.latencies:
        raise LoadError(f"the Python load generator completed no request to {url}")
    p50, p99 = percentiles(tally.latencies)
    return LoadResult(
        tool="python",
        connections=connections,
        seconds=seconds,
        requests=len(tally.latencies),
        p50_ms=p50,
        p99_ms=p99,
        statuses=dict(tally.statuses),
        errors=tally.errors,
    )


@dataclass(slots=True)
class _Tally:
    """What the connections of one Python run saw, together."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    errors: int = 0


async def _python_connection(
    host: str, port: int, request: bytes, deadline: float, tally: _Tally
) -> None:
    """Requests one after another on one connection until the deadline."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while (sent := time.perf_counter()) < deadline:
            writer.write(request)
            try:
                status = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                tally.errors += 1
                return
            tally.latencies.append((time.perf_counter() - sent) * 1e3)
            tally.statuses[f"{status // 100}xx"] += 1
    finally:
        writer.close()


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one response with a Content-Length body (Envoy always sends one here)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


def _split_url(url: str) -> tuple[str, int, str]:
    match = re.fullmatch(r"http://([^/:]+):(\d+)(/.*)?", url)
    if match is None:
        raise LoadError(f"expected http://HOST:PORT/PATH, got {url!r}")
    return match.group(1), int(match.group(2)), match.group(3) or "/"
