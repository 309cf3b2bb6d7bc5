"""Policy hot reload: on SIGHUP and when a file changes, validated in full first.

The files are the policy and the reveal token it names (`reveal_token_file`): a rotated
Secret must not wait for a SIGHUP. They are polled (one `stat` each per interval) rather
than watched with inotify: it works the same for a plain file, an editor's rename-over and
a Kubernetes ConfigMap's or Secret's symlink swap, and costs nothing measurable. A broken
file never replaces a working policy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import structlog

from extproc.config import Policy, PolicyError, load_policy, token_path
from extproc.metrics import Metrics

log = structlog.get_logger("extproc")

Stamp = tuple[int, int, int] | None


def _stamp(path: Path) -> Stamp:
    try:
        st = path.stat()  # follows symlinks: a ConfigMap or Secret swap changes the inode
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ino, st.st_size)


def _watched(path: Path, policy: Policy | None) -> tuple[Path, ...]:
    """The policy file, and the token file `policy` names."""
    if policy is None or not policy.reveal_token_file:
        return (path,)
    return (path, token_path(policy.reveal_token_file, str(path)))


class PolicyReloader:
    """Loads `path` again when asked or when it (or its token file) changes, and hands a
    valid policy to `apply`."""

    def __init__(self, path: Path, apply: Callable[[Policy], None], metrics: Metrics) -> None:
        self.path = path
        self._apply = apply
        self._metrics = metrics
        try:
            current: Policy | None = load_policy(path, read_secrets=False)
        except PolicyError:
            current = None
        self._files = _watched(path, current)
        self._stamps = self._read_stamps()
        self._wake = asyncio.Event()

    def _read_stamps(self) -> tuple[Stamp, ...]:
        return tuple(_stamp(file) for file in self._files)

    def trigger(self) -> None:
        """Reload now (the SIGHUP handler)."""
        self._wake.set()

    def reload(self) -> bool:
        """Load and apply the file; on any error keep the current policy. True if applied."""
        self._stamps = self._read_stamps()
        try:
            policy = load_policy(self.path)
        except PolicyError as exc:
            self._metrics.reloads["error"].inc()
            log.error("policy_reload_failed", problem=str(exc), kept="the previous policy")
            return False
        self._apply(policy)
        self._files = _watched(self.path, policy)
        self._stamps = self._read_stamps()
        self._metrics.reloads["ok"].inc()
        log.info("policy_reloaded", policy=str(self.path), mode=str(policy.mode))
        return True

    async def run(self, interval: float) -> None:
        """Until cancelled: reload on trigger, or when a watched file's stamp changes."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            except TimeoutError:
                if self._read_stamps() == self._stamps:
                    continue
            self._wake.clear()
            self.reload()
