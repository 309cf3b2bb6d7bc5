"""Policy hot reload: on SIGHUP and when the file changes, validated in full first.

The file is polled (one `stat` per interval) rather than watched with inotify: it works
the same for a plain file, an editor's rename-over and a Kubernetes ConfigMap's symlink
swap, and costs nothing measurable. A broken file never replaces a working policy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import structlog

from extproc.config import Policy, PolicyError, load_policy
from extproc.metrics import Metrics

log = structlog.get_logger("extproc")


class PolicyReloader:
    """Loads `path` again when asked or when it changes, and hands a valid policy to `apply`."""

    def __init__(self, path: Path, apply: Callable[[Policy], None], metrics: Metrics) -> None:
        self.path = path
        self._apply = apply
        self._metrics = metrics
        self._stamp = self._read_stamp()
        self._wake = asyncio.Event()

    def _read_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()  # follows symlinks: a ConfigMap swap changes the inode
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def trigger(self) -> None:
        """Reload now (the SIGHUP handler)."""
        self._wake.set()

    def reload(self) -> bool:
        """Load and apply the file; on any error keep the current policy. True if applied."""
        self._stamp = self._read_stamp()
        try:
            policy = load_policy(self.path)
        except PolicyError as exc:
            self._metrics.reloads["error"].inc()
            log.error("policy_reload_failed", problem=str(exc), kept="the previous policy")
            return False
        self._apply(policy)
        self._metrics.reloads["ok"].inc()
        log.info("policy_reloaded", policy=str(self.path), mode=str(policy.mode))
        return True

    async def run(self, interval: float) -> None:
        """Until cancelled: reload on trigger, or when the file's stamp changes."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            except TimeoutError:
                if self._read_stamp() == self._stamp:
                    continue
            self._wake.clear()
            self.reload()
