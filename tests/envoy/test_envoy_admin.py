"""extproc.envoy_admin against a real Envoy's admin endpoint: the lab's client sidecar."""

from __future__ import annotations

import asyncio

import pytest

from extproc.diagnosis import AUTO_SNI
from extproc.envoy_admin import PLAINTEXT, ClusterTls, ClusterTlsCache, fetch_cluster_tls
from extproc.lab import Lab

pytestmark = pytest.mark.envoy


class TestFetchClusterTls:
    def test_reads_each_clusters_tls_settings(self, recording_lab: Lab) -> None:
        """SNI, ALPN and protocol come back per cluster (masked dump); plaintext ones as PLAINTEXT."""
        clusters = fetch_cluster_tls(recording_lab.admin_url, timeout=5)
        assert clusters["outbound|8080||search.default.svc.cluster.local"] == ClusterTls(
            sni="outbound_.8080_._.search.default.svc.cluster.local", alpn=("istio-http/1.1",)
        )
        assert clusters["outbound|443||pay.example.net"] == ClusterTls()
        assert clusters["outbound|443|sni|pay.example.net"].sent_sni == "pay.example.net"
        assert clusters["outbound|8080|v2|reviews.default.svc.cluster.local"] == PLAINTEXT
        assert clusters["extproc"] == PLAINTEXT
        assert AUTO_SNI not in {c.sent_sni for c in clusters.values() if c.tls}


class TestClusterTlsCache:
    def test_knows_the_clusters_once_started(self, recording_lab: Lab) -> None:
        """After start-up a lookup answers from memory, and an unknown cluster is simply unknown."""

        async def look() -> tuple[ClusterTls | None, ClusterTls | None]:
            async with ClusterTlsCache(recording_lab.admin_url) as cache:
                return (
                    cache.lookup("outbound|443||pay.example.net"),
                    cache.lookup("outbound|8080||nope.default.svc.cluster.local"),
                )

        known, unknown = asyncio.run(look())
        assert known == ClusterTls()
        assert unknown is None
