"""The process: it starts the doors on one event loop and stops them.

The doors are the gRPC door (`extproc.server`), the HTTP lane (`extproc.http_lane`) and
the live page (`extproc.page`); each knows its own protocol and the core, none knows the
others. Here they get one policy (reloaded on SIGHUP or change), one set of metrics, the
clusters' TLS cache and the page's table, then serve until SIGTERM or SIGINT and drain.
`extproc.workers` runs this in each worker process; `extproc.cli` only builds the config.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any

import structlog

try:
    import uvloop
except ImportError:  # not on every platform; the server runs on asyncio's loop then
    uvloop = None  # type: ignore[assignment]

from extproc.admission import StreamLimits
from extproc.config import Policy, ServeConfig, load_policy
from extproc.envoy_admin import ClusterTlsCache
from extproc.failures import Failures
from extproc.http_lane import HttpLane, HttpProcessor, Limits
from extproc.mesh_view import MeshView
from extproc.metrics import FLUSH_SECONDS, Metrics
from extproc.page import Page
from extproc.reload import PolicyReloader
from extproc.server import ExternalProcessor, ExtProcServer
from extproc.tls import ReloadingSslContext, TlsError

log = structlog.get_logger("extproc")


def run_server(config: ServeConfig) -> int:
    """One server process until it is told to stop; 1 when it cannot start."""
    try:
        run(config)
    except (OSError, TlsError) as exc:
        print(f"extproc serve: {exc}", file=sys.stderr)
        return 1
    return 0


def run(config: ServeConfig) -> None:
    """Serve on uvloop where it is installed (faster gRPC streams), else asyncio's loop."""
    if uvloop is None:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))


async def serve(config: ServeConfig) -> None:
    """Serve until SIGTERM or SIGINT, reloading the policy on SIGHUP or change; then drain.

    The gRPC listener and the HTTP lane (either or both) share the loop, the policy, the
    metrics and the clusters' TLS cache.
    """
    policy = load_policy(config.policy_path) if config.policy_path else Policy()
    metrics = Metrics(config.metrics_cluster_label)
    processors: list[ExternalProcessor | HttpProcessor] = []
    lanes: list[contextlib.AbstractAsyncContextManager[Any]] = []
    if config.listen is not None:
        stream_limits = StreamLimits(config.max_streams, config.stream_idle_timeout,
                                     config.max_message_bytes)  # fmt: skip
        servicer = ExternalProcessor(policy, metrics, stream_limits)
        processors.append(servicer)
        lanes.append(ExtProcServer(
            policy, config.listen, config.grace, servicer=servicer, tls=config.tls,
            limits=stream_limits, metrics=metrics, health_listen=config.health_listen,
        ))  # fmt: skip
    if config.http_listen is not None:
        processor = HttpProcessor(policy, metrics)
        processors.append(processor)
        context = ReloadingSslContext(config.tls).context if config.tls else None
        lane_limits = Limits(max_connections=config.http_max_connections)
        lanes.append(HttpLane(processor, config.http_listen, config.grace, ssl_context=context,
                              limits=lane_limits))  # fmt: skip
    if config.ui_listen is not None:
        lanes.append(_page(config, processors, metrics))
    if config.metrics_listen:
        metrics.serve(config.metrics_listen)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(_flushing(metrics))  # exits last: after the drain
        for lane in lanes:
            await stack.enter_async_context(lane)
        await stack.enter_async_context(_reloading(config, processors, metrics))
        await stack.enter_async_context(_cluster_tls(config, processors))
        ports = {type(lane).__name__: getattr(lane, "port", 0) for lane in lanes}
        log.info("serving", listen=config.listen, port=ports.get("ExtProcServer"),
                 http_listen=config.http_listen, http_port=ports.get("HttpLane"),
                 policy=policy.source, mode=str(policy.mode), tls=config.tls is not None,
                 metrics=config.metrics_listen, ui_port=ports.get("Page"))  # fmt: skip
        await stopping.wait()
        log.info("draining", grace_seconds=config.grace)
    log.info("stopped")


def _page(config: ServeConfig, processors: Sequence[Any], metrics: Metrics) -> Page:
    """The live page, and its table given to each lane: they record what they diagnose."""
    failures = Failures(recovered_after=config.ui_recovered_after, trace_url=config.ui_trace_url,
                        docs_url=config.ui_docs_url,
                        on_evict=metrics.page_rows_evicted.inc)  # fmt: skip
    for processor in processors:
        processor.failures = failures
    mesh = MeshView(config.ui_prometheus) if config.ui_prometheus else None
    return Page(failures, config.ui_listen or "", token=config.ui_token, metrics=metrics,
                mesh=mesh)  # fmt: skip


@contextlib.asynccontextmanager
async def _cluster_tls(config: ServeConfig, processors: Sequence[Any]) -> AsyncIterator[None]:
    """Read the clusters' TLS settings from Envoy's admin endpoint while the server runs."""
    if config.envoy_admin is None:
        yield
        return
    async with ClusterTlsCache(config.envoy_admin) as cache:
        for processor in processors:
            processor.cluster_tls = cache
        yield


@contextlib.asynccontextmanager
async def _flushing(metrics: Metrics) -> AsyncIterator[None]:
    """Flush the hot path's plain counts every FLUSH_SECONDS, and once more at the end (after
    the doors drained): under --workers the parent reads only what was flushed."""

    async def tick() -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            metrics.flush()

    try:
        async with _in_background(tick()):
            yield
    finally:
        metrics.flush()


@contextlib.asynccontextmanager
async def _reloading(
    config: ServeConfig, processors: Sequence[Any], metrics: Metrics
) -> AsyncIterator[None]:
    """Reload the policy file on SIGHUP and on change, while the server runs."""
    if config.policy_path is None:
        yield
        return

    def apply(policy: Policy) -> None:
        for processor in processors:
            processor.policy = policy

    reloader = PolicyReloader(config.policy_path, apply, metrics)
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.trigger)
    async with _in_background(reloader.run(config.reload_interval)):
        yield


@contextlib.asynccontextmanager
async def _in_background(work: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run `work` as a task while the block runs; cancel it and wait for it after."""
    task = asyncio.create_task(work)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
