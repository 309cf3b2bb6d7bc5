"""`extproc serve --workers N`: N server processes behind one address.

Python runs one request at a time per process, so more cores need more processes. On
TCP every worker binds the same address with SO_REUSEPORT (gRPC sets it by default) and
the kernel spreads Envoy's connections over them. A Unix socket cannot be shared that
way, so worker i listens on `PATH.i` and Envoy lists each path as an endpoint.

The parent only supervises: it forwards SIGTERM, SIGINT and SIGHUP, restarts a worker
that dies on its own, and serves the workers' metrics as one set (prometheus-client's
multiprocess mode, which keeps each worker's values in files under a private directory).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import threading
from dataclasses import replace
from multiprocessing.process import BaseProcess
from types import FrameType

import structlog
from prometheus_client import CollectorRegistry, multiprocess, start_http_server

from extproc.config import ServeConfig
from extproc.logs import configure_logging
from extproc.process import run_server

log = structlog.get_logger("extproc")

_CHECK_SECONDS = 0.5


def worker_listen(listen: str, index: int, workers: int) -> str:
    """The address worker `index` binds: the same TCP address, or its own Unix socket."""
    if listen.startswith("unix:") and workers > 1:
        return f"{listen}.{index}"
    return listen


def _worker_main(config: ServeConfig, log_level: str) -> None:
    configure_logging(log_level)
    os._exit(run_server(config))


class Supervisor:
    """Starts the workers, keeps them running, and stops them on a signal."""

    def __init__(self, config: ServeConfig, log_level: str) -> None:
        self.config = config
        self.workers = config.workers
        self.log_level = log_level
        self._context = multiprocessing.get_context("spawn")
        self._procs: dict[int, BaseProcess] = {}
        self._stopping = threading.Event()

    def run(self) -> int:
        with tempfile.TemporaryDirectory(prefix="extproc-metrics-") as metrics_dir:
            # Read by prometheus-client when the spawned workers import it.
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            if self.config.metrics_listen:
                _serve_merged_metrics(self.config.metrics_listen, metrics_dir)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, self._forward)
            for index in range(self.workers):
                self._start(index)
            log.info("workers_started", workers=self.workers, listen=self.config.listen)
            while not self._stopping.wait(_CHECK_SECONDS):
                self._restart_dead(metrics_dir)
            return self._join()

    def _start(self, index: int) -> None:
        config = replace(
            self.config,
            listen=self.config.listen and worker_listen(self.config.listen, index, self.workers),
            http_listen=self.config.http_listen
            and worker_listen(self.config.http_listen, index, self.workers),
            metrics_listen=None,
            workers=1,
        )
        proc = self._context.Process(
            target=_worker_main, args=(config, self.log_level), name=f"extproc-worker-{index}"
        )
        proc.start()
        self._procs[index] = proc

    def _restart_dead(self, metrics_dir: str) -> None:
        for index, proc in list(self._procs.items()):
            if proc.is_alive() or self._stopping.is_set():
                continue
            log.error("worker_died", worker=index, exitcode=proc.exitcode)
            _mark_dead(proc.pid, metrics_dir)
            self._start(index)

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        if signum != signal.SIGHUP:
            self._stopping.set()
        for proc in self._procs.values():
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signum)

    def _join(self) -> int:
        codes = []
        for proc in self._procs.values():
            proc.join(self.config.grace + 5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            codes.append(proc.exitcode or 0)
        log.info("stopped", workers=self.workers)
        return max(codes, default=0)


def _serve_merged_metrics(listen: str, metrics_dir: str) -> None:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)  # noqa: S104


def _mark_dead(pid: int | None, metrics_dir: str) -> None:
    if pid is not None:
        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
