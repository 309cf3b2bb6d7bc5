"""Start every configuration at once, check each does what it claims, then measure in rounds.

Strategy: all Envoys and servers stay up for the whole run, idle while another row is
measured, so the rounds can alternate: each round measures every configuration once
(its throughput run, then its one-connection run), starting one row later than the
round before, so slow drift on a shared machine (thermal, other tenants) spreads over
every row instead of landing on one. Before any load, one request through each Envoy
checks the row is honest: the expected status, a diagnosis exactly where the server is
supposed to make one, and the number of ext_proc streams Envoy opened for it.

The server's cost comes from its own accounting: CPU time (utime + stime of the server
process and any children, from /proc) read before and after each run, divided by the
streams Envoy opened to it in that run (Envoy's own counter, so the naive servicer and
every server layout are counted the same way); its peak RSS is VmHWM at the end.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench import grpc_load
from bench.configs import LISTENER, Config, Direct, Route, Server, bootstrap, upstream_bootstrap
from bench.loadgen import LoadResult, available_tools, run_h2load, run_python, run_wrk
from extproc.filter_config import GRPC, HTTP
from extproc.lab.envoy import EnvoyProcess, free_port, free_ports
from extproc.lab.health import NotServing, wait_serving
from extproc.render.options import NAME

REPO = Path(__file__).resolve().parents[1]
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_STREAMS_STAT = f"cluster.{NAME}.upstream_rq_total"
# A checkout of the code before a change: the `always-before` row runs its server.
BEFORE_REPO = "BENCH_BEFORE_REPO"

LoadFunction = Callable[[str, int, float], LoadResult]


class BenchError(RuntimeError):
    """A configuration could not start, or does not behave as its row claims."""


@dataclass(frozen=True, slots=True)
class Settings:
    """How long and how hard to measure."""

    rounds: int = 3
    duration: float = 5.0  # seconds of each throughput run
    latency_duration: float = 3.0  # seconds of each one-connection run
    connections: int = 64
    warmup: float = 1.0  # seconds of load before the first round, not recorded; 0: none
    tool: str = "auto"  # auto | python


@dataclass(frozen=True, slots=True)
class Sample:
    """One run of one configuration."""

    config: str
    round: int
    connections: int
    load: LoadResult
    cpu_seconds: float  # the server's CPU time during the run (0 without a server)
    streams: int  # ext_proc streams opened during the run
    # With several server processes: the busiest one's share of the run's server CPU.
    busiest_share: float | None = None

    # ProcessingRequest messages per stream (two in an always-on gRPC stream, else one).
    messages_per_stream: int = 1

    @property
    def cpu_us_per_stream(self) -> float | None:
        return self.cpu_seconds * 1e6 / self.streams if self.streams else None

    @property
    def cpu_us_per_message(self) -> float | None:
        per_stream = self.cpu_us_per_stream
        return None if per_stream is None else per_stream / self.messages_per_stream


@dataclass(slots=True)
class Outcome:
    """Every sample, the servers' peak RSS, and how the load was generated."""

    samples: list[Sample] = field(default_factory=list)
    peak_rss_kib: dict[str, int] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


class ServerProcess:
    """An ext_proc server as its own process; `wait_serving` until gRPC health says SERVING.

    Entering only spawns it, so several servers import and start in parallel.
    """

    def __init__(
        self,
        server: Server,
        workdir: Path,
        *,
        workers: int = 1,
        unix: bool = False,
        transport: str = GRPC,
        page: bool = False,
    ) -> None:
        self.kind = server
        stem = workdir / f"{server}-{id(self):x}"
        self.log_path = stem.with_suffix(".log")
        self.address = f"127.0.0.1:{free_port()}"
        self.listen = f"unix:{stem}.sock" if unix else self.address
        # With workers, extproc serve binds unix:PATH.0 .. PATH.N-1, one socket each.
        self.unix_paths = [
            f"{stem}.sock" if workers == 1 else f"{stem}.sock.{i}" for i in range(workers)
        ] if unix else []  # fmt: skip
        self.target = f"unix:{self.unix_paths[0]}" if unix else self.address
        self.http = transport == HTTP
        module = {
            Server.OURS: ["extproc", "serve"],
            Server.BEFORE: ["extproc", "serve"],
            Server.NAIVE: ["bench.naive_servicer"],
            Server.NAIVE_HTTP: ["bench.naive_http"],
        }[server]
        args = ["--workers", str(workers)] if workers > 1 else []
        # The checkout whose code this server runs (-m imports from the working directory).
        self.repo = Path(os.environ[BEFORE_REPO]) if server is Server.BEFORE else REPO
        if server in (Server.OURS, Server.BEFORE):
            # The rendered Envoy is the edge, where annotations are off by default; the
            # bench measures (and checks) the annotated path, as at a sidecar.
            policy = stem.with_suffix(".policy.yaml")
            policy.write_text("response_annotations: on\n")
            args += ["--config", str(policy)]
        if page:
            args += ["--ui-listen", f"127.0.0.1:{free_port()}"]
        if self.http and server is Server.OURS:
            listen = ["--listen", "none", "--http-listen", self.listen]
        else:
            listen = ["--listen", self.listen]
        self.command = [sys.executable, "-m", *module, *listen, *args]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        env = {**os.environ, "PYTHONPATH": str(self.repo), "PYTHONUNBUFFERED": "1"}
        # A file, not a pipe: each diagnosis is a log line, and a full pipe stalls a server.
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command, stderr=log, stdout=log, env=env, cwd=self.repo
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f"{self.kind} server is not running")
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the server and its live descendants so far."""
        return sum(self.cpu_by_process().values())

    def cpu_by_process(self) -> dict[int, float]:
        """CPU seconds so far of each process of the server (the workers and their parent)."""
        return {pid: _cpu_ticks(pid) / _CLOCK_TICKS for pid in _process_tree(self.pid)}

    def peak_rss_kib(self) -> int:
        """VmHWM of the server, summed over its processes (an upper bound with workers)."""
        return sum(_status_kib(pid, "VmHWM") for pid in _process_tree(self.pid))

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_serving(self, timeout: float = 30.0) -> None:
        """Every Unix socket, or the TCP address, answers SERVING (TCP workers share it);
        an HTTP lane answers GET /ready."""
        if self.http:
            self._wait_http(timeout)
            return
        targets = [f"unix:{path}" for path in self.unix_paths] or [self.address]
        for target in targets:
            self._wait_target(target, timeout)

    def _wait_http(self, timeout: float) -> None:
        host, _, port = self.address.rpartition(":")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BenchError(f"{self.kind} server exited: {self.log_tail()}")
            conn = http.client.HTTPConnection(host, int(port), timeout=1)
            try:
                conn.request("GET", "/ready")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.1)
            finally:
                conn.close()
        raise BenchError(
            f"{self.kind} HTTP server not ready within {timeout:g}s: {self.log_tail()}"
        )

    def _wait_target(self, target: str, timeout: float) -> None:
        assert self.proc is not None
        try:
            wait_serving(target, self.proc, self.log_tail, timeout)
        except NotServing as exc:
            raise BenchError(str(exc)) from None


class Deployment:
    """One configuration running: its Envoy and, unless Envoy runs alone, its server."""

    def __init__(self, config: Config, envoy: EnvoyProcess, server: ServerProcess | None) -> None:
        self.config = config
        self.envoy = envoy
        self.server = server
        self.port = envoy.listener_ports()[LISTENER]
        self.url = f"http://127.0.0.1:{self.port}/"

    def streams(self) -> int:
        """ext_proc streams Envoy has opened to the server so far."""
        if self.server is None:
            return 0
        _, body = self.envoy.admin_get(f"/stats?format=json&filter=^{_STREAMS_STAT}$")
        for stat in json.loads(body).get("stats", []):
            if stat.get("name") == _STREAMS_STAT:
                return int(stat["value"])
        return 0

    def probe(self) -> None:
        """One request: the status, the annotation and the streams must match the row."""
        before = self.streams()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
        finally:
            conn.close()
        diagnosis = response.getheader("x-extproc-diagnosis")
        opened = self.streams() - before
        problems = []
        if response.status != self.config.expected_status:
            problems.append(f"status {response.status}, expected {self.config.expected_status}")
        if (diagnosis is not None) != self.config.annotated:
            problems.append(f"x-extproc-diagnosis {diagnosis!r}")
        if opened != self.config.streams_per_request:
            problems.append(
                f"{opened} ext_proc streams, expected {self.config.streams_per_request}"
            )
        if problems:
            raise BenchError(f"{self.config.name} does not behave as its row says: {problems}")


@contextmanager
def deployed(config: Config, server: ServerProcess | None) -> Iterator[Deployment]:
    """Start `config`'s Envoy in front of `server` (None: Envoy alone); stop it afterwards."""
    (refused,) = free_ports(1)  # nothing listens there: Envoy's connect is refused
    with ExitStack() as stack:
        upstream_port = None
        if config.route is Route.PROXIED:
            upstream = stack.enter_context(EnvoyProcess(upstream_bootstrap()))
            upstream_port = upstream.listener_ports()["upstream"]
        envoy_config = bootstrap(
            config,
            extproc=server.address if server else None,
            refused_port=refused,
            unix_paths=server.unix_paths if server else (),
            upstream_port=upstream_port,
        )
        envoy = stack.enter_context(EnvoyProcess(envoy_config))
        yield Deployment(config, envoy, server)


def server_help() -> str:
    """`extproc serve --help`: which optional rows (workers, Unix socket) the server supports."""
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "serve", "--help"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return result.stdout


def choose_tools(tool: str) -> tuple[dict[str, str], LoadFunction, LoadFunction]:
    """(names, throughput run, one-connection run): wrk and h2load, else the Python generator."""
    have = available_tools()
    if tool == "python" or not have["wrk"]:
        throughput, throughput_name = run_python, "python (wrk not installed)"
    else:
        throughput, throughput_name = run_wrk, "wrk"
    if tool != "python" and have["h2load"]:
        latency, latency_name = run_h2load, "h2load"
    else:
        latency, latency_name = run_python, "python (h2load not installed)"
    if tool == "python":
        throughput_name = latency_name = "python (--tool python)"
    return {"throughput": throughput_name, "latency": latency_name}, throughput, latency


def measure(
    deployment: Deployment, round_: int, connections: int, duration: float, load: LoadFunction
) -> Sample:
    server = deployment.server
    cpu_before = server.cpu_by_process() if server else {}
    streams_before = deployment.streams()
    result = load(deployment.url, connections, duration)
    cpu_after = server.cpu_by_process() if server else {}
    streams = deployment.streams() - streams_before
    spent = [after - cpu_before.get(pid, 0.0) for pid, after in cpu_after.items()]
    cpu = sum(spent)
    busiest = max(spent) / cpu if len(spent) > 1 and cpu > 0 else None
    return Sample(deployment.config.name, round_, connections, result, cpu, streams, busiest,
                  deployment.config.messages_per_stream)  # fmt: skip


def measure_direct(
    direct: Direct, server: ServerProcess, round_: int, concurrency: int, duration: float
) -> Sample:
    """bench/grpc_load.py against `server`, from this process: streams are its requests."""
    cpu_before = server.cpu_seconds()
    try:
        done = asyncio.run(grpc_load.run(server.target, concurrency, duration))
    except (grpc.RpcError, grpc_load.GrpcLoadError) as exc:
        raise BenchError(f"grpc_load against {direct.name} failed: {exc}") from None
    cpu = server.cpu_seconds() - cpu_before
    result = LoadResult(
        tool="bench.grpc_load",
        connections=concurrency,
        seconds=done.seconds,
        requests=done.streams,
        p50_ms=done.p50_ms,
        p99_ms=done.p99_ms,
        errors=done.errors,
    )
    return Sample(direct.name, round_, concurrency, result, cpu, done.streams, None, 2)


def rotated(items: Sequence[Any], by: int) -> list[Any]:
    """`items` starting at position `by` (wrapping): each round starts one row later."""
    if not items:
        return []
    by %= len(items)
    return [*items[by:], *items[:by]]


def run(
    configs: Sequence[Config],
    directs: Sequence[Direct],
    settings: Settings,
    progress: Callable[[str], None] = lambda _: None,
) -> Outcome:
    """Start everything, probe it, warm it up, then measure `settings.rounds` rounds."""
    outcome = Outcome()
    outcome.tools, throughput, latency = choose_tools(settings.tool)
    available = _supported(configs, outcome)
    with tempfile.TemporaryDirectory(prefix="extproc-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        behind_envoy = {
            c.name: stack.enter_context(
                ServerProcess(
                    c.server,
                    workdir,
                    workers=c.workers,
                    unix=c.unix_socket,
                    transport=c.transport,
                    page=c.page,
                )
            )
            for c in available
            if c.server is not None
        }
        servers = {d.name: stack.enter_context(ServerProcess(d.server, workdir)) for d in directs}
        for server in [*behind_envoy.values(), *servers.values()]:
            server.wait_serving()
        deployments = [
            stack.enter_context(deployed(c, behind_envoy.get(c.name))) for c in available
        ]
        progress(f"started {len(deployments)} Envoy configurations, {len(servers)} direct servers")
        for deployment in deployments:
            deployment.probe()
            if settings.warmup > 0:
                throughput(deployment.url, settings.connections, settings.warmup)
        for round_ in range(settings.rounds):
            progress(f"round {round_ + 1} of {settings.rounds}")
            for d in rotated(deployments, round_):
                outcome.samples.append(
                    measure(d, round_, settings.connections, settings.duration, throughput)
                )
                outcome.samples.append(measure(d, round_, 1, settings.latency_duration, latency))
            for direct in rotated(directs, round_):
                server = servers[direct.name]
                for concurrency, seconds in (
                    (settings.connections, settings.duration),
                    (1, settings.latency_duration),
                ):
                    outcome.samples.append(
                        measure_direct(direct, server, round_, concurrency, seconds)
                    )
        for d in deployments:
            if d.server is not None:
                outcome.peak_rss_kib[d.config.name] = d.server.peak_rss_kib()
        for name, server in servers.items():
            outcome.peak_rss_kib[name] = server.peak_rss_kib()
    return outcome


def _supported(configs: Sequence[Config], outcome: Outcome) -> list[Config]:
    """The configurations this server can run; the others are recorded as skipped."""
    for config in configs:
        if config.server is Server.BEFORE and not os.environ.get(BEFORE_REPO):
            outcome.skipped[config.name] = f"{BEFORE_REPO} names no checkout to compare with"
    needed = [c for c in configs if c.needs and c.name not in outcome.skipped]
    help_text = server_help() if needed else ""
    for config in needed:
        if missing := [flag for flag in config.needs if flag not in help_text]:
            outcome.skipped[config.name] = f"`extproc serve` has no {', '.join(missing)}"
    return [c for c in configs if c.name not in outcome.skipped]


def _process_tree(root: int) -> list[int]:
    """`root` and its live descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _cpu_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks (fields 14 and 15 of /proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _status_kib(pid: int, key: str) -> int:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return 0
