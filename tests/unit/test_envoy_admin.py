"""Tests for extproc.envoy_admin: cluster TLS settings from config dumps, and the cache."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from pathlib import Path

import pytest

from extproc import envoy_admin
from extproc.diagnosis import AUTO_SNI, Evidence
from extproc.envoy_admin import (
    DUMP_PATHS,
    PLAINTEXT,
    AdminUrlError,
    ClusterTls,
    ClusterTlsCache,
    admin_base_url,
    cluster_tls_settings,
    clusters_in_dump,
    with_cluster_tls,
)

# Captured from the lab's client sidecar (Envoy 1.40), file paths and ports replaced.
LAB_DUMP = json.loads(
    (Path(__file__).parent / "data" / "config_dump_static_clusters.json").read_text()
)
TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# The cache's default runs the fetch in a process of its own; these tests replace the
# fetch function, which only a thread of this process sees.
THREADS = concurrent.futures.ThreadPoolExecutor(1)


def istio_cluster(*, http2: bool) -> dict[str, object]:
    """The shape of an Istio sidecar's outbound cluster: TLS under transport_socket_matches."""
    tls = {
        "name": "tls",
        "typed_config": {
            "@type": TLS_TYPE,
            "common_tls_context": {"alpn_protocols": ["istio-peer-exchange", "istio"]},
            "sni": "outbound_.9080_._.reviews.default.svc.cluster.local",
        },
    }
    options: dict[str, object] = {"use_downstream_protocol_config": {}}
    if http2:
        options = {"explicit_http_config": {"http2_protocol_options": {}}}
    return {
        "name": "outbound|9080||reviews.default.svc.cluster.local",
        "transport_socket_matches": [
            {"name": "tlsMode-istio", "match": {"tlsMode": "istio"}, "transport_socket": tls},
            {"name": "tlsMode-disabled", "transport_socket": {"name": "raw_buffer"}},
        ],
        "typed_extension_protocol_options": {HTTP_OPTIONS: options},
    }


class TestClusterTlsSettings:
    def test_lab_dump(self):
        """The real dump gives SNI and ALPN per TLS cluster and PLAINTEXT for plaintext ones."""
        settings = cluster_tls_settings(clusters_in_dump(LAB_DUMP))
        assert settings == {
            "PassthroughCluster": PLAINTEXT,
            "extproc": PLAINTEXT,
            "outbound|443|sni|pay.example.net": ClusterTls(sni="pay.example.net"),
            "outbound|443||pay.example.net": ClusterTls(),
            "outbound|8080|v2|reviews.default.svc.cluster.local": PLAINTEXT,
            "outbound|8080||search.default.svc.cluster.local": ClusterTls(
                sni="outbound_.8080_._.search.default.svc.cluster.local",
                alpn=("istio-http/1.1",),
            ),
        }

    def test_whole_dump_without_resource_parameter(self):
        """A dump of everything holds clusters under static_clusters and dynamic_active_clusters."""
        dump = {
            "configs": [
                {"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump"},
                {
                    "@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
                    "static_clusters": [{"cluster": {"name": "a"}}],
                    "dynamic_active_clusters": [{"cluster": istio_cluster(http2=False)}],
                },
            ]
        }
        names = [c["name"] for c in clusters_in_dump(dump)]
        assert names == ["a", "outbound|9080||reviews.default.svc.cluster.local"]

    @pytest.mark.parametrize(
        ("http2", "offered"), [(False, ("istio-http/1.1",)), (True, ("istio-h2",))]
    )
    def test_istio_alpn_placeholder(self, http2, offered):
        """Istio's `istio` ALPN placeholder becomes the token for the cluster's HTTP version."""
        [tls] = cluster_tls_settings([istio_cluster(http2=http2)]).values()
        assert tls is not None
        assert tls.offered_alpn == offered

    def test_auto_sni(self):
        """auto_sni in the HTTP protocol options wins over a fixed sni."""
        cluster = {
            "name": "c",
            "transport_socket": {"typed_config": {"@type": TLS_TYPE, "sni": "fixed"}},
            "typed_extension_protocol_options": {
                HTTP_OPTIONS: {"upstream_http_protocol_options": {"auto_sni": True}}
            },
        }
        assert cluster_tls_settings([cluster])["c"] == ClusterTls(sni="fixed", auto_sni=True)
        assert ClusterTls(sni="fixed", auto_sni=True).sent_sni == AUTO_SNI

    def test_wrapped_transport_socket(self):
        """A TLS context inside a wrapping socket (internal_upstream, tcp_stats) is found."""
        inner = {"typed_config": {"@type": TLS_TYPE, "sni": "x"}}
        cluster = {"name": "c", "transport_socket": {"typed_config": {"transport_socket": inner}}}
        assert cluster_tls_settings([cluster])["c"] == ClusterTls(sni="x")

    @pytest.mark.parametrize(
        ("tls", "offered"),
        [
            (ClusterTls(), ()),
            (ClusterTls(http2=True), ("h2",)),
            (ClusterTls(alpn=("http/1.1",), http2=True), ("http/1.1",)),
        ],
    )
    def test_offered_alpn_without_istio(self, tls, offered):
        """Configured ALPN is offered as is; without it an h2 cluster offers h2, HTTP/1.1 nothing."""
        assert tls.offered_alpn == offered


class TestWithClusterTls:
    def test_adds_context(self):
        """The evidence gets the SNI sent and the ALPN offered."""
        ev = with_cluster_tls(Evidence(cluster="c"), ClusterTls(alpn=("istio-http/1.1",)))
        assert (ev.cluster_sni, ev.cluster_alpn) == ("", ("istio-http/1.1",))

    def test_plaintext_is_known_as_such(self):
        """A plaintext cluster marks the evidence cluster_tls=False, with no SNI or ALPN."""
        ev = with_cluster_tls(Evidence(cluster="c"), PLAINTEXT)
        assert (ev.cluster_tls, ev.cluster_sni, ev.cluster_alpn) == (False, None, None)

    def test_tls_is_known_as_such(self):
        """A TLS cluster marks the evidence cluster_tls=True."""
        assert with_cluster_tls(Evidence(cluster="c"), ClusterTls()).cluster_tls is True

    def test_unknown_leaves_evidence_alone(self):
        """No settings, no context: the fields stay None."""
        ev = Evidence(cluster="c")
        assert with_cluster_tls(ev, None) is ev


class TestDumpPaths:
    def test_only_the_cluster_fields_read_are_asked_for(self):
        """Both cluster resources are fetched with a field mask, not whole."""
        assert [p.split("&")[0] for p in DUMP_PATHS] == [
            "/config_dump?resource=static_clusters",
            "/config_dump?resource=dynamic_active_clusters",
        ]
        assert all(
            "mask=cluster.name," in p and "cluster.transport_socket" in p for p in DUMP_PATHS
        )


class TestAdminBaseUrl:
    def test_trailing_slash_dropped(self):
        """A valid URL comes back without its trailing slash."""
        assert admin_base_url("http://127.0.0.1:15000/") == "http://127.0.0.1:15000"

    @pytest.mark.parametrize("url", ["127.0.0.1:15000", "https://envoy:15000", "http://envoy"])
    def test_rejects_what_is_not_http_host_port(self, url):
        """Anything but http://HOST:PORT fails with the flag and the expected form."""
        with pytest.raises(AdminUrlError, match=r"--envoy-admin .*http://HOST:PORT"):
            admin_base_url(url)


@pytest.mark.asyncio
class TestCache:
    async def test_miss_schedules_one_refresh_without_waiting(self, monkeypatch):
        """A miss answers None at once; the background refresh then makes it a hit."""
        calls = []

        def fetch(url, timeout):
            calls.append(url)
            return {"c": ClusterTls()} if len(calls) > 1 else {}

        monkeypatch.setattr(envoy_admin, "fetch_cluster_tls", fetch)
        async with ClusterTlsCache(
            "http://127.0.0.1:1", min_refresh_gap=0, executor=THREADS
        ) as cache:
            assert cache.lookup("c") is None
            assert cache.lookup("c") is None  # one refresh in flight, not two
            for _ in range(10_000):  # the refresh runs in a thread: poll, yielding the loop
                if len(calls) == 2 and cache.lookup("c") is not None:
                    break
                await asyncio.sleep(0.001)
            assert cache.lookup("c") == ClusterTls()
        assert len(calls) == 2

    async def test_admin_unreachable_is_not_an_error(self, monkeypatch):
        """A failing admin endpoint leaves the cache empty; lookups still answer."""

        def fetch(url, timeout):
            raise ConnectionRefusedError(111, "Connection refused")

        monkeypatch.setattr(envoy_admin, "fetch_cluster_tls", fetch)
        async with ClusterTlsCache("http://127.0.0.1:1", executor=THREADS) as cache:
            assert await cache.refresh() is False
            assert cache.lookup("c") is None

    async def test_refresh_gap_limits_refreshes(self, monkeypatch):
        """Misses within the minimum gap after a refresh do not refresh again."""
        calls = []
        monkeypatch.setattr(envoy_admin, "fetch_cluster_tls", lambda url, t: calls.append(1) or {})
        async with ClusterTlsCache(
            "http://127.0.0.1:1", min_refresh_gap=3600, executor=THREADS
        ) as cache:
            for _ in range(5):
                assert cache.lookup("unknown") is None
        assert calls == [1]
