"""The ext_proc server on its own event loop in a thread, for synchronous callers.

The lab is blocking (a subprocess, http.client); Envoy calls the server while a request
from the same program is waiting for Envoy, so the server cannot share that thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from contextlib import AsyncExitStack, contextmanager
from typing import Any, Self, TypeVar

from extproc.config import Policy
from extproc.envoy_admin import ClusterTlsCache
from extproc.http_lane import HttpLane, HttpProcessor
from extproc.page import Page
from extproc.server import ExternalProcessor, ExtProcServer

T = TypeVar("T")


class BackgroundServer:
    """Runs an `ExtProcServer` or an `HttpLane` from a daemon thread; `port` is valid inside the `with`.

    With `envoy_admin` (an Envoy admin base URL), the server reads the clusters' TLS
    settings from it, as `extproc serve --envoy-admin` does; with `page`, the live page
    runs on the same loop, as `extproc serve --ui-listen` does.
    """

    def __init__(
        self,
        server: ExtProcServer | HttpLane,
        *,
        envoy_admin: str | None = None,
        page: Page | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.server = server
        self.page = page
        self._envoy_admin = envoy_admin
        self._timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="extproc", daemon=True)
        self._stack = AsyncExitStack()

    @property
    def port(self) -> int:
        return self.server.port

    def __enter__(self) -> Self:
        self._thread.start()
        try:
            self._call(self._start())
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._call(self._stack.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=self._timeout)
            self._loop.close()

    @contextmanager
    def policy(self, policy: Policy) -> Iterator[None]:
        """Serve `policy` inside the block, as a reload would; the previous one after it."""
        servicer = self._processor()
        previous = servicer.policy
        servicer.policy = policy
        try:
            yield
        finally:
            servicer.policy = previous

    async def _start(self) -> None:
        if self._envoy_admin is not None:
            cache = await self._stack.enter_async_context(ClusterTlsCache(self._envoy_admin))
            self._processor().cluster_tls = cache
        await self._stack.enter_async_context(self.server)
        if self.page is not None:  # the live page, recording what this server diagnoses
            self._processor().failures = self.page.failures
            await self._stack.enter_async_context(self.page)

    def _processor(self) -> ExternalProcessor | HttpProcessor:
        if isinstance(self.server, HttpLane):
            return self.server.processor
        servicer = self.server.servicer
        if not isinstance(servicer, ExternalProcessor):
            raise TypeError(f"a {type(servicer).__name__} has no policy or cluster context")
        return servicer

    def call_soon(self, fn: Any, *args: Any) -> None:
        """Run `fn(*args)` on the server's loop (the page's table lives there)."""
        self._loop.call_soon_threadsafe(fn, *args)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the server's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=self._timeout)
