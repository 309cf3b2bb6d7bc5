"""How long a cluster-TLS refresh stalls the server's event loop, old way against new.

Serves a synthetic Istio-like cluster dump of N clusters over loopback HTTP and measures,
with a 1 ms ticker on the event loop, the longest gap while `ClusterTlsCache` refreshes:

- whole: the whole `dynamic_active_clusters` dump, `json.loads` in a thread (before issue 10);
- masked: only the fields `DUMP_MASK` names (what Envoy returns for `mask=`), fetched and
  parsed in the cache's own process (issue 10).

Run: `.venv/bin/python -m bench.admin_stall [--clusters 5000]`. Numbers, not assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from extproc import envoy_admin

_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def istio_cluster(i: int) -> dict[str, Any]:
    """One outbound cluster shaped like an Istio sidecar's, with the fields a mask drops."""
    name = f"outbound|8080||svc{i}.ns{i % 50}.svc.cluster.local"
    tls = {"name": "tls", "typed_config": {"@type": _TLS, "sni": f"outbound_.8080_._.svc{i}",
           "common_tls_context": {"alpn_protocols": ["istio-peer-exchange", "istio"],
                                  "tls_certificate_sds_secret_configs": [{"name": "default"}]}}}  # fmt: skip
    return {
        "name": name,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": {"ads": {}, "initial_fetch_timeout": "0s"}, "service_name": name},
        "connect_timeout": "10s",
        "circuit_breakers": {"thresholds": [{"max_connections": 4294967295, "max_pending_requests": 4294967295,
                                             "max_requests": 4294967295, "max_retries": 4294967295}]},
        "metadata": {"filter_metadata": {"istio": {"services": [{"host": name, "name": f"svc{i}",
                                                                 "namespace": f"ns{i % 50}"}]}}},
        "common_lb_config": {"locality_weighted_lb_config": {}},
        "filters": [{"name": "istio.metadata_exchange", "typed_config": {"@type": "x", "protocol": "istio-peer-exchange"}}],
        "transport_socket_matches": [{"name": "tlsMode-istio", "match": {"tlsMode": "istio"}, "transport_socket": tls},
                                     {"name": "tlsMode-disabled", "transport_socket": {"name": "raw_buffer"}}],
        "typed_extension_protocol_options": {envoy_admin._HTTP_OPTIONS: {"use_downstream_protocol_config": {}}},
    }  # fmt: skip


def dump(clusters: list[dict[str, Any]], masked: bool) -> bytes:
    keep = {f.removeprefix("cluster.") for f in envoy_admin.DUMP_MASK.split(",")}
    entries = [
        {"cluster": {k: v for k, v in c.items() if k in keep} if masked else c} for c in clusters
    ]
    body = {"configs": [{"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
                         "dynamic_active_clusters": entries}]}  # fmt: skip
    return json.dumps(body).encode()


def serve(whole: bytes, masked: bytes) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = masked if "mask=" in self.path else whole
            if "static_clusters" in self.path:
                body = b'{"configs": []}'
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


async def longest_gap(refresh: Any) -> tuple[float, float]:
    """The longest event-loop gap (s) while `refresh()` runs, and how long it ran."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last - 0.001)
            last = now

    ticker = asyncio.create_task(tick())
    started = time.perf_counter()
    await refresh()
    took = time.perf_counter() - started
    done.set()
    await ticker
    return max(gaps, default=0.0), took


async def measure(url: str) -> dict[str, tuple[float, float]]:
    def fetch_whole(base_url: str, timeout: float) -> dict[str, envoy_admin.ClusterTls]:
        with urllib.request.urlopen(
            base_url + "/config_dump?resource=dynamic_active_clusters", timeout=timeout
        ) as a:
            return envoy_admin.cluster_tls_settings(
                envoy_admin.clusters_in_dump(json.loads(a.read()))
            )

    results = {}
    async with envoy_admin.ClusterTlsCache(url, timeout=30) as cache:  # process, masked
        results["masked, in a process"] = await longest_gap(cache.refresh)
    loop = asyncio.get_running_loop()
    results["whole, json.loads in a thread"] = await longest_gap(
        lambda: loop.run_in_executor(None, fetch_whole, url, 30)
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=5000)
    args = parser.parse_args()
    clusters = [istio_cluster(i) for i in range(args.clusters)]
    whole, masked = dump(clusters, masked=False), dump(clusters, masked=True)
    server = serve(whole, masked)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    print(
        f"{args.clusters} clusters: whole dump {len(whole) / 1e6:.1f} MB, masked {len(masked) / 1e6:.1f} MB"
    )
    for name, (gap, took) in asyncio.run(measure(url)).items():
        print(f"  {name:32} longest loop stall {gap * 1e3:7.1f} ms   refresh {took * 1e3:7.1f} ms")
    server.shutdown()


if __name__ == "__main__":
    main()
