"""Real processes for the reliability tests: `extproc serve`, an Envoy in front of it, and load.

The server runs as its own process so that tests can kill, restart and signal it. The
Envoy has one listener with the ext_proc filter exactly as `extproc.filter_config` defines
it, a `/ok` route answered by Envoy itself and a `/fail` route to a port where nothing
listens, so load needs no Python upstream.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import pytest

from extproc.filter_config import ext_proc_cluster, ext_proc_filter, ext_proc_pipe_cluster
from extproc.lab.envoy import EnvoyProcess, free_port
from extproc.lab.health import NotServing, wait_serving

LOOPBACK = "127.0.0.1"


class ServerProcess:
    """`extproc serve` on a fixed port, started, killed and restarted at will."""

    def __init__(self, port: int, log_path: Path, *args: str) -> None:
        self.port = port
        self.listen = f"{LOOPBACK}:{port}"
        self.args = args
        # A file, not a pipe: each diagnosis is a log line, and a full pipe stalls the server.
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        cmd = [sys.executable, "-m", "extproc", "serve", "--listen", self.listen, *self.args]
        with self.log_path.open("ab") as log:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.proc = subprocess.Popen(cmd, stderr=log, env=env)
        self.wait_serving()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout: float = 15.0) -> None:
        """Until health says SERVING; fails at once, with the server's log, if it exits."""
        assert self.proc is not None
        target = self.listen if self.listen.startswith("unix:") else f"{LOOPBACK}:{self.port}"
        if "--workers" in self.args and target.startswith("unix:"):
            target += ".0"
        try:
            wait_serving(target, self.proc, self.log, timeout)
        except NotServing:
            self.proc.kill()
            raise

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self, sig: int | None = None, timeout: float = 20.0) -> int:
        """Send `sig` (default: kill) and reap; returns the exit code."""
        assert self.proc is not None
        proc, self.proc = self.proc, None
        if sig is None:
            proc.kill()
        else:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        if self.proc is not None:
            self.stop()


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(free_port(), tmp_path / "extproc.log")
    try:
        yield server
    finally:
        server.close()


def bootstrap(
    extproc_port: int, *, failure_mode_allow: bool = True, pipes: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A listener with the ext_proc filter, `/ok` answered by Envoy, `/fail` to a dead port."""
    routes = [
        {
            "match": {"prefix": "/ok"},
            "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
        },
        {"match": {"prefix": "/fail"}, "route": {"cluster": "refused"}, "name": "refused"},
    ]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
        "http_filters": [
            ext_proc_filter("extproc", failure_mode_allow=failure_mode_allow, direction="outbound"),
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }  # fmt: skip
    listener = {
        "name": "ingress",
        "address": {"socket_address": {"address": LOOPBACK, "port_value": 0}},
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }
    refused = {
        "name": "refused",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "refused", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": LOOPBACK, "port_value": free_port()}}}}]}]},
    }  # fmt: skip
    extproc = (
        ext_proc_pipe_cluster("extproc", pipes)
        if pipes
        else ext_proc_cluster("extproc", LOOPBACK, extproc_port)
    )
    clusters = [refused, extproc]
    return {"static_resources": {"listeners": [listener], "clusters": clusters}}


@pytest.fixture
def envoy_for(tmp_path) -> Iterator[Any]:
    """A factory: an Envoy in front of the server port, torn down after the test."""
    started: list[EnvoyProcess] = []

    def start(extproc_port: int, **kw: Any) -> int:
        workdir = tmp_path / f"envoy{len(started)}"
        workdir.mkdir()
        envoy = EnvoyProcess(bootstrap(extproc_port, **kw), workdir=workdir)
        envoy.__enter__()
        started.append(envoy)
        return envoy.listener_ports()["ingress"]

    try:
        yield start
    finally:
        for envoy in started:
            envoy.__exit__(None, None, None)


class Load:
    """Keep-alive HTTP/1.1 clients in threads, hitting paths in turn until stopped.

    It records every status and every error, so a test can say "nothing failed".
    """

    def __init__(self, port: int, paths: tuple[str, ...] = ("/ok",), clients: int = 2) -> None:
        self.port = port
        self.paths = paths
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.errors: list[str] = []
        self.annotated = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.statuses.values())

    def unexpected(self) -> dict[str, int]:
        """Requests whose status was not 200 for /ok or 503 for /fail, and client errors."""
        expected = {"/ok": 200, "/fail": 503}
        with self._lock:
            bad = {f"{p} -> {s}": n for (p, s), n in self.statuses.items() if expected[p] != s}
        if self.errors:
            bad["errors"] = len(self.errors)
        return bad

    def _run(self) -> None:
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
        i = 0
        while not self._stop.is_set():
            path = self.paths[i % len(self.paths)]
            i += 1
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.errors.append(f"{path}: {type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
                continue
            with self._lock:
                self.statuses[(path, response.status)] += 1
                self.annotated += response.getheader("x-extproc-diagnosis") is not None
        conn.close()


def wait_until(check, timeout: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def metrics_text(port: int) -> str:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    conn.request("GET", "/metrics")
    return conn.getresponse().read().decode()


def log_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]
