"""The ext_proc server on its own event loop in a thread, for synchronous callers.

The lab is blocking (a subprocess, http.client); Envoy calls the server while a request
from the same program is waiting for Envoy, so the server cannot share that thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, Self, TypeVar

from extproc.server import ExtProcServer

T = TypeVar("T")


class BackgroundServer:
    """Runs an `ExtProcServer` from a daemon thread; `port` is valid inside the `with`."""

    def __init__(self, server: ExtProcServer, *, timeout: float = 10.0) -> None:
        self.server = server
        self._timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="extproc", daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    def __enter__(self) -> Self:
        self._thread.start()
        try:
            self._call(self.server.start())
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._call(self.server.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=self._timeout)
            self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the server's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=self._timeout)
