"""The clusters' TLS settings, read from Envoy's admin `/config_dump` and cached.

A reset in the middle of the TLS handshake looks the same on the wire whether the
upstream found no filter chain for the SNI or for the ALPN, and no ext_proc attribute
says what the cluster sent. Envoy's admin endpoint does: the cluster's `sni`, its
`auto_sni`, its `alpn_protocols` and whether it speaks HTTP/2. This module reads them.

Strategy: the request path never waits for the admin endpoint. `ClusterTlsCache.lookup`
is a dict read; a cluster it has not seen schedules a refresh in the background (at most
one at a time, and not more often than `min_refresh_gap`), so the first failure on a new
cluster gets the less precise reason and the next ones the precise one. A refresh also
runs every `refresh_interval`, and once, awaited, when the cache starts. The parsing
(`cluster_tls_settings`) is pure and tested on real dumps.

A large mesh's cluster dump is tens of megabytes, and `json.loads` holds the GIL for the
whole parse: in a thread it still stalls the event loop (and Envoy's message timeout
runs meanwhile). So a refresh asks only for the cluster fields it reads (`DUMP_MASK`),
and fetches and parses in a separate process; the loop only unpickles the small result.
`bench/admin_stall.py` measures the stall both ways.

A cluster is known as TLS (`ClusterTls`), known as plaintext (`PLAINTEXT`), or unknown
(`lookup` answers None): a closed connection means different things on each.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import multiprocessing
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Self

import structlog

from extproc.closes import ClosedConnections
from extproc.diagnosis import AUTO_SNI, Evidence

log = structlog.get_logger("extproc.envoy_admin")

# The cluster fields this module reads; Envoy applies the mask to each resource element.
DUMP_MASK = ",".join(
    f"cluster.{field}"
    for field in (
        "name",
        "transport_socket",
        "transport_socket_matches",
        "typed_extension_protocol_options",
        "http2_protocol_options",
    )
)
# The two config_dump resources that hold clusters: bootstrap ones, and xDS ones (Istio).
DUMP_PATHS = tuple(
    f"/config_dump?resource={resource}&mask={DUMP_MASK}"
    for resource in ("static_clusters", "dynamic_active_clusters")
)
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# A large mesh's cluster dump runs to tens of megabytes; more than this is not Envoy.
MAX_DUMP_BYTES = 256 * 1024 * 1024


class AdminUrlError(ValueError):
    """An --envoy-admin value that is not an http://HOST:PORT URL."""


@dataclass(frozen=True, slots=True)
class ClusterTls:
    """One cluster's TLS origination settings, as its config says."""

    sni: str = ""
    auto_sni: bool = False
    alpn: tuple[str, ...] = ()
    http2: bool = False
    # False for a cluster that originates no TLS (see PLAINTEXT); the rest is then unused.
    tls: bool = True

    @property
    def sent_sni(self) -> str:
        """The SNI the cluster sends: AUTO_SNI (from the Host, winning over `sni`), its name, or ''."""
        return AUTO_SNI if self.auto_sni else self.sni

    @property
    def offered_alpn(self) -> tuple[str, ...]:
        """The ALPN protocols offered in the ClientHello.

        Without `alpn_protocols`, Envoy offers `h2` on an HTTP/2 cluster and nothing on
        an HTTP/1.1 one. Istio configures the placeholder `istio`, and its `istio.alpn`
        filter replaces the list per request by the cluster's protocol.
        """
        if "istio" in self.alpn:
            return ("istio-h2",) if self.http2 else ("istio-http/1.1",)
        if self.alpn:
            return self.alpn
        return ("h2",) if self.http2 else ()


PLAINTEXT = ClusterTls(tls=False)


def admin_base_url(url: str) -> str:
    """`url` checked and without a trailing slash; raises AdminUrlError naming the problem."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.port is None:
        raise AdminUrlError(
            f"--envoy-admin {url!r}: expected Envoy's admin address as http://HOST:PORT"
        )
    return url.rstrip("/")


def clusters_in_dump(dump: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The Cluster objects in a config dump, with or without `?resource=`."""
    found: list[Mapping[str, Any]] = []
    for config in dump.get("configs", []):
        if "cluster" in config:
            found.append(config["cluster"])
        for key in ("static_clusters", "dynamic_active_clusters"):
            found.extend(entry["cluster"] for entry in config.get(key, []) if "cluster" in entry)
    return found


def cluster_tls_settings(clusters: Iterable[Mapping[str, Any]]) -> dict[str, ClusterTls]:
    """Each cluster's TLS settings by name; PLAINTEXT for a cluster that originates no TLS.

    A cluster with a TLS socket among its `transport_socket_matches` counts as TLS: that
    is Istio's auto mTLS, which speaks TLS to every endpoint with a sidecar.
    """
    return {c["name"]: _cluster_tls(c) for c in clusters if "name" in c}


def _cluster_tls(cluster: Mapping[str, Any]) -> ClusterTls:
    sockets = [cluster.get("transport_socket")]
    sockets += [m.get("transport_socket") for m in cluster.get("transport_socket_matches", [])]
    context = next(filter(None, map(_upstream_tls_context, sockets)), None)
    if context is None:
        return PLAINTEXT
    options = cluster.get("typed_extension_protocol_options", {}).get(_HTTP_OPTIONS, {})
    return ClusterTls(
        sni=str(context.get("sni", "")),
        auto_sni=bool(options.get("upstream_http_protocol_options", {}).get("auto_sni", False)),
        alpn=tuple(context.get("common_tls_context", {}).get("alpn_protocols", ())),
        http2=_speaks_h2(cluster, options),
    )


def _upstream_tls_context(socket: object) -> Mapping[str, Any] | None:
    """The UpstreamTlsContext in a transport socket, looking inside wrapping sockets."""
    while isinstance(socket, Mapping):
        typed = socket.get("typed_config", {})
        if str(typed.get("@type", "")).endswith(".UpstreamTlsContext"):
            context: Mapping[str, Any] = typed
            return context
        socket = typed.get("transport_socket")
    return None


def _speaks_h2(cluster: Mapping[str, Any], options: Mapping[str, Any]) -> bool:
    """HTTP/2 configured explicitly, or negotiated (auto_config offers h2 by ALPN)."""
    explicit = options.get("explicit_http_config", {})
    return (
        "http2_protocol_options" in explicit
        or "auto_config" in options
        or "http2_protocol_options" in cluster
    )


def with_cluster_tls(ev: Evidence, tls: ClusterTls | None) -> Evidence:
    """`ev` with the cluster's TLS settings as context; unchanged when they are unknown."""
    if tls is None:
        return ev
    if not tls.tls:
        return replace(ev, cluster_tls=False)
    return replace(ev, cluster_tls=True, cluster_sni=tls.sent_sni, cluster_alpn=tls.offered_alpn)


def fetch_cluster_tls(base_url: str, timeout: float) -> dict[str, ClusterTls]:
    """GET the masked cluster dumps from the admin endpoint (blocking) and parse them."""
    clusters: list[Mapping[str, Any]] = []
    for path in DUMP_PATHS:
        with urllib.request.urlopen(base_url + path, timeout=timeout) as answer:  # noqa: S310 (http only, checked by admin_base_url)
            clusters += clusters_in_dump(json.loads(answer.read(MAX_DUMP_BYTES)))
    return cluster_tls_settings(clusters)


class ClusterTlsCache:
    """Cluster TLS settings from one Envoy's admin endpoint; an async context manager.

    Use it from the server's event loop: `lookup` and the refreshes share that loop.
    """

    def __init__(
        self,
        admin_url: str,
        *,
        refresh_interval: float = 30.0,
        min_refresh_gap: float = 5.0,
        timeout: float = 2.0,
        max_clusters: int = 50_000,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        """`executor` runs the fetch and parse; by default a one-process pool of its own."""
        self.base_url = admin_base_url(admin_url)
        self._refresh_interval = refresh_interval
        self._min_refresh_gap = min_refresh_gap
        self._timeout = timeout
        self._max_clusters = max_clusters
        self._clusters: dict[str, ClusterTls] = {}
        self._executor = executor
        self._own_executor: concurrent.futures.Executor | None = None
        self._refreshing: asyncio.Task[bool] | None = None
        self._last_refresh = float("-inf")
        self._periodic: asyncio.Task[None] | None = None
        # Closes per cluster: with the transport, they decide the mTLS verdict.
        self.closes = ClosedConnections()

    def lookup(self, cluster: str) -> ClusterTls | None:
        """The cluster's TLS settings if known; never waits. A miss schedules a refresh."""
        if cluster in self._clusters:
            return self._clusters[cluster]
        if cluster:
            self._schedule_refresh()
        return None

    def enrich(self, ev: Evidence) -> Evidence:
        """`ev` with its cluster's TLS settings, when the cache knows them, and whether
        its cluster has closed connections on every request lately (`extproc.closes`)."""
        return self.closes.observe(with_cluster_tls(ev, self.lookup(ev.cluster)))

    @property
    def watching(self) -> bool:
        """Whether a clean answer's cluster is worth reading (some cluster has closes)."""
        return self.closes.watching

    def answered(self, cluster: str) -> None:
        """The cluster answered a request cleanly."""
        self.closes.answered(cluster)

    async def refresh(self) -> bool:
        """Re-read the clusters; False (and a warning) when the admin endpoint failed."""
        loop = asyncio.get_running_loop()
        self._last_refresh = loop.time()
        if self._executor is None:
            self._executor = self._own_executor = concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn")
            )
        try:
            clusters = await loop.run_in_executor(
                self._executor, fetch_cluster_tls, self.base_url, self._timeout
            )
        except (OSError, ValueError, concurrent.futures.BrokenExecutor) as exc:
            log.warning("envoy_admin_unavailable", url=self.base_url, error=str(exc))
            return False
        if len(clusters) > self._max_clusters:
            log.warning(
                "envoy_admin_too_many_clusters", count=len(clusters), kept=self._max_clusters
            )
            clusters = dict(list(clusters.items())[: self._max_clusters])
        self._clusters = clusters
        return True

    def _schedule_refresh(self) -> None:
        loop = asyncio.get_running_loop()
        in_flight = self._refreshing is not None and not self._refreshing.done()
        if in_flight or loop.time() - self._last_refresh < self._min_refresh_gap:
            return
        self._refreshing = loop.create_task(self.refresh())

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_interval)
            await self.refresh()

    async def __aenter__(self) -> Self:
        await self.refresh()
        self._periodic = asyncio.create_task(self._refresh_periodically())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in (self._periodic, self._refreshing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._periodic = self._refreshing = None
        if self._own_executor is not None:
            self._own_executor.shutdown(wait=False, cancel_futures=True)
            self._executor = self._own_executor = None
