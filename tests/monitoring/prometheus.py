"""A real Prometheus (Debian's `prometheus` package) on loopback, and its HTTP API.

It binds a free port, keeps its data in a temporary directory, and is ready when
`/-/ready` answers 200. Queries go through the documented HTTP API (`/api/v1/...`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import yaml

from extproc.lab.envoy import free_port

T = TypeVar("T")
INSTALL_HINT = (
    "install Debian's `prometheus` package (`make test` does: apt-get install prometheus)"
)


def binary(name: str) -> str:
    """The path of `prometheus` or `promtool`; a clear failure when the package is missing."""
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"no {name} on PATH: {INSTALL_HINT}")
    return found


class PrometheusError(RuntimeError):
    """Prometheus did not start, or its API answered an error."""


class Prometheus:
    """A Prometheus process scraping `jobs` (name -> (HOST:PORT, metrics path, labels))."""

    def __init__(
        self,
        workdir: Path,
        jobs: dict[str, tuple[str, str, dict[str, str]]],
        rule_groups: list[dict[str, Any]],
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (workdir / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups}))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(workdir / "rules.yaml")],
            "scrape_configs": [
                {
                    "job_name": job,
                    "metrics_path": path,
                    "static_configs": [{"targets": [target], "labels": labels}],
                }
                for job, (target, path, labels) in jobs.items()
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        cmd = [
            binary("prometheus"),
            f"--config.file={self.workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        try:
            self.wait_for(self._ready, "/-/ready", timeout=30)
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _ready(self) -> bool | None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise PrometheusError(f"prometheus exited {self._proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                return reply.status == 200 or None
        except (urllib.error.URLError, ConnectionError):
            return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def api(self, path: str, **params: str | list[str]) -> Any:
        """GET /api/v1/PATH; the `data` of a success, else PrometheusError with the error."""
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector."""
        return list(self.api("query", query=expr)["result"])

    def query_range(self, expr: str, seconds: int = 60) -> list[dict[str, Any]]:
        """A range query over the last `seconds`, one-second steps, as Grafana runs a panel."""
        end = time.time()
        return list(
            self.api("query_range", query=expr, start=str(end - seconds), end=str(end), step="1")[
                "result"
            ]
        )

    def alerts(self) -> list[dict[str, Any]]:
        """The active (pending or firing) alerts."""
        return list(self.api("alerts")["alerts"])

    def wait_for(self, check: Callable[[], T | None], what: str, timeout: float = 60) -> T:
        """Poll `check` until it returns something other than None or False."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = check()
            if result is not None and result is not False:
                return result
            time.sleep(0.5)
        raise AssertionError(f"no {what} within {timeout:g}s; prometheus log:\n{self.log()}")
