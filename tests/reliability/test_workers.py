"""`--workers` and Unix sockets with real processes behind a real Envoy."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from extproc.lab.envoy import free_port
from extproc.metrics import FLUSH_SECONDS

from .conftest import Load, ServerProcess, log_events, metrics_text, wait_until

pytestmark = pytest.mark.envoy


def worker_pids(server: ServerProcess) -> set[int]:
    """The supervisor's live workers (not multiprocessing's resource tracker)."""
    assert server.proc is not None
    pid = server.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    workers = set()
    for child in children:
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.add(int(child))
        except FileNotFoundError:  # exited meanwhile
            continue
    return workers


def streams_total(port: int) -> float:
    """extproc_streams_total as the parent serves it, summed over the workers' files."""
    line = next(
        line for line in metrics_text(port).splitlines() if line.startswith("extproc_streams_total")
    )
    return float(line.split()[1])


def test_two_workers_share_the_port_and_a_dead_one_comes_back(
    server_process: ServerProcess, envoy_for
) -> None:
    """Two workers serve one address; a killed worker is replaced, no request fails, metrics add up."""
    metrics_port = free_port()
    server_process.args = ("--workers", "2", "--metrics-listen", f"127.0.0.1:{metrics_port}")
    port = envoy_for(server_process.start().port)
    assert wait_until(lambda: len(worker_pids(server_process)) == 2)
    with Load(port, ("/ok", "/fail")) as load:
        assert wait_until(lambda: load.annotated > 20)
        victim = min(worker_pids(server_process))
        os.kill(victim, signal.SIGKILL)
        assert wait_until(
            lambda: (
                victim not in worker_pids(server_process) and len(worker_pids(server_process)) == 2
            )
        )
        after = load.annotated
        assert wait_until(lambda: load.annotated > after + 20, timeout=20)
    assert load.unexpected() == {}
    # Each worker flushes its per-message counts every FLUSH_SECONDS (docs/monitoring.md).
    assert wait_until(lambda: streams_total(metrics_port) > 0, timeout=FLUSH_SECONDS * 5)
    assert server_process.stop(signal.SIGTERM) == 0
    events = [e["event"] for e in log_events(server_process.log())]
    assert "worker_died" in events


def test_unix_socket_workers_behind_a_pipe_cluster(
    server_process: ServerProcess, envoy_for, tmp_path
) -> None:
    """With --listen unix:PATH and two workers, Envoy reaches PATH.0 and PATH.1 through pipe endpoints."""
    path = tmp_path / "extproc.sock"
    server_process.listen = f"unix:{path}"
    server_process.args = ("--workers", "2")
    server_process.start()
    assert wait_until((tmp_path / "extproc.sock.1").exists)
    port = envoy_for(0, pipes=(f"{path}.0", f"{path}.1"))
    with Load(port, ("/ok", "/fail")) as load:
        assert wait_until(lambda: load.annotated > 20)
    assert load.unexpected() == {}
    assert server_process.stop(signal.SIGTERM) == 0
