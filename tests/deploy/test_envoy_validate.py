"""Every Envoy fragment of every manifest, loaded by a real Envoy 1.40 with `--mode validate`.

The fragments are placed the way their control plane places them: the EnvoyFilter's
patches applied to one listener per Istio context, the Cilium resources as static
resources with the parts Cilium fills in (listener address, route source, EDS source).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from extproc.lab import validate
from extproc.render import RenderMode, RenderOptions, render

pytestmark = pytest.mark.envoy

MODES = list(RenderMode)
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
# Istio's listener directions by EnvoyFilter context (a gateway leaves it unset).
DIRECTIONS = {"SIDECAR_OUTBOUND": "OUTBOUND", "SIDECAR_INBOUND": "INBOUND", "GATEWAY": None}


def rendered(target: str, mode: RenderMode, suffix: str = "") -> dict[str, Any]:
    text = render(target, RenderOptions(mode=mode))[f"{target}/{mode}{suffix}.yaml"]
    return yaml.safe_load(text)


def listener(name: str, http_filters: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {"name": name, "virtual_hosts": []},
        "http_filters": http_filters,
    }
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": manager,
                    }
                ]
            }
        ],
        **extra,
    }


def apply_envoy_filter(envoy_filter: dict[str, Any]) -> dict[str, Any]:
    """A bootstrap with one listener per context, patched as Istio applies the patches."""
    listeners = {
        context: listener(context.lower(), [copy.deepcopy(ROUTER)])
        | ({"traffic_direction": d} if d else {})
        for context, d in DIRECTIONS.items()
    }
    clusters = []
    for patch in envoy_filter["spec"]["configPatches"]:
        value = patch["patch"]["value"]
        if patch["applyTo"] == "CLUSTER":
            assert patch["patch"]["operation"] == "ADD"
            clusters.append(value)
            continue
        assert patch["applyTo"] == "HTTP_FILTER"
        chain = listeners[patch["match"]["context"]]["filter_chains"][0]["filters"][0]
        filters = chain["typed_config"]["http_filters"]
        if patch["patch"]["operation"] == "INSERT_FIRST":
            filters.insert(0, value)
            continue
        assert patch["patch"]["operation"] == "INSERT_BEFORE"
        assert (
            patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"]
            == ROUTER["name"]
        )
        filters.insert(len(filters) - 1, value)
    return {"static_resources": {"listeners": list(listeners.values()), "clusters": clusters}}


def cilium_bootstrap(config: dict[str, Any]) -> dict[str, Any]:
    """The CiliumEnvoyConfig's resources as static resources, completed the way Cilium completes them."""
    by_type: dict[str, list[dict[str, Any]]] = {}
    for resource in config["spec"]["resources"]:
        kind = resource.pop("@type").rsplit(".", 1)[1]
        by_type.setdefault(kind, []).append(resource)
    (route,) = by_type["RouteConfiguration"]
    (cilium_listener,) = by_type["Listener"]
    manager = cilium_listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager.pop("rds")["route_config_name"] == route["name"]
    manager["route_config"] = route
    cilium_listener["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": 0}}
    for cluster in by_type["Cluster"]:
        if cluster.get("type") == "EDS":
            cluster["eds_cluster_config"] = {
                "eds_config": {"ads": {}, "resource_api_version": "V3"}
            }
    xds = {
        "name": "xds-grpc-cilium",
        "type": "STATIC",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {"cluster_name": "xds-grpc-cilium", "endpoints": []},
    }
    return {
        "node": {"id": "cilium-envoy", "cluster": "cilium-envoy"},
        "static_resources": {
            "listeners": [cilium_listener],
            "clusters": [*by_type["Cluster"], xds],
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc-cilium"}}],
            }
        },
    }


class TestEnvoyAcceptsEveryFragment:
    @pytest.mark.parametrize("mode", MODES)
    def test_istio_envoy_filter(self, mode):
        """The EnvoyFilter's cluster and HTTP filters, patched into sidecar and gateway listeners, load."""
        validate(apply_envoy_filter(rendered("istio", mode)))

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("suffix", ["", "-clusterwide"], ids=["namespaced", "clusterwide"])
    def test_cilium_resources(self, mode, suffix):
        """The Cilium listener, route and clusters load as static resources."""
        validate(cilium_bootstrap(rendered("cilium", mode, suffix)))

    @pytest.mark.parametrize("mode", MODES)
    def test_envoy_bootstrap(self, mode):
        """The standalone bootstrap loads as it is."""
        validate(rendered("envoy", mode))

    def test_extproc_tls_cluster(self, tmp_path):
        """With --extproc-tls-ca the server's cluster speaks TLS, and Envoy accepts the context."""
        ca = tmp_path / "ca.pem"
        from extproc.lab import CertificateAuthority

        ca.write_bytes(CertificateAuthority.create("extproc").cert_pem)
        options = RenderOptions(extproc_tls_ca=str(ca))
        bootstrap = yaml.safe_load(render("envoy", options)["envoy/gated.yaml"])
        (server,) = [
            c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "extproc-doctor"
        ]
        assert server["transport_socket"]["name"] == "envoy.transport_sockets.tls"
        validate(bootstrap)
