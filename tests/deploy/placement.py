"""Rendered fragments placed the way their control plane places them, as one Envoy bootstrap.

Istio: one listener per EnvoyFilter context with the `traffic_direction` Istio gives it
(istio/istio pilot/pkg/networking/core at 86c9f01f: sidecar outbound OUTBOUND,
listener.go:592; gateway OUTBOUND too, listener.go:1183; inbound INBOUND,
listener_inbound.go:156), the patches applied in order (INSERT_FIRST, INSERT_BEFORE the
router). Cilium: the CEC's resources with the names Cilium gives them and the parts it
fills in (cilium/cilium pkg/ciliumenvoyconfig/cec_resource_parser.go `ParseResources` and
pkg/policy/api `ResourceQualifiedName`, at 02fbb426): listener and route names prefixed
with NAMESPACE/CEC-NAME/ always, cluster names only when they have no `/`, the `rds`
reference rewritten, the listener's address and the EDS source filled in.
"""

from __future__ import annotations

import copy
from typing import Any

ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
ISTIO_DIRECTIONS = {
    "SIDECAR_OUTBOUND": "OUTBOUND",
    "SIDECAR_INBOUND": "INBOUND",
    "GATEWAY": "OUTBOUND",
}
UPSTREAM = "upstream"
_LOOPBACK_0 = {"socket_address": {"address": "127.0.0.1", "port_value": 0}}


def upstream_cluster(name: str, port: int) -> dict[str, Any]:
    address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }


def listener(
    name: str, http_filters: list[dict[str, Any]], upstream: bool, **extra: Any
) -> dict[str, Any]:
    """A listener on 127.0.0.1:0; with `upstream`, every request routes to the `upstream` cluster."""
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": UPSTREAM}}] if upstream else []
    virtual_hosts = [{"name": name, "domains": ["*"], "routes": routes}]
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {"name": name, "virtual_hosts": virtual_hosts},
        "http_filters": http_filters,
    }
    hcm = {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
    return {
        "name": name,
        "address": _LOOPBACK_0,
        "filter_chains": [{"filters": [hcm]}],
        **extra,
    }


def apply_envoy_filter(
    envoy_filter: dict[str, Any], upstream_port: int | None = None
) -> dict[str, Any]:
    """A bootstrap with one listener per context (named after it, lower case), patched as Istio does."""
    listeners = {
        context: listener(
            context.lower(),
            [copy.deepcopy(ROUTER)],
            upstream_port is not None,
            traffic_direction=direction,
        )
        for context, direction in ISTIO_DIRECTIONS.items()
    }
    clusters = [] if upstream_port is None else [upstream_cluster(UPSTREAM, upstream_port)]
    for patch in envoy_filter["spec"]["configPatches"]:
        value = copy.deepcopy(patch["patch"]["value"])
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


def qualified(namespace: str, cec: str, name: str, *, force: bool = False) -> str:
    """The name Cilium gives a CEC's resource (`ResourceQualifiedName`)."""
    slash = name.find("/")
    if not name or (
        slash >= 0 and (not force or (slash == len(namespace) and name.startswith(namespace)))
    ):
        return name
    return f"{namespace}/{cec}/{name}"


def cilium_bootstrap(config: dict[str, Any], upstream_port: int | None = None) -> dict[str, Any]:
    """The CEC's resources as static resources, named and completed the way Cilium does.

    With `upstream_port`, the Service's EDS cluster gets that endpoint (Cilium would send it
    by EDS); otherwise it keeps its EDS source, pointing at an ADS cluster that never answers.
    """
    namespace = config["metadata"].get("namespace", "")
    cec = config["metadata"]["name"]
    by_type: dict[str, list[dict[str, Any]]] = {}
    for resource in copy.deepcopy(config["spec"]["resources"]):
        kind = resource.pop("@type").rsplit(".", 1)[1]
        by_type.setdefault(kind, []).append(resource)
    (route,) = by_type["RouteConfiguration"]
    (cilium_listener,) = by_type["Listener"]
    route["name"] = qualified(namespace, cec, route["name"], force=True)
    cilium_listener["name"] = qualified(namespace, cec, cilium_listener["name"], force=True)
    manager = cilium_listener["filter_chains"][0]["filters"][0]["typed_config"]
    rds = manager.pop("rds")
    assert qualified(namespace, cec, rds["route_config_name"], force=True) == route["name"]
    manager["route_config"] = route
    cilium_listener["address"] = _LOOPBACK_0
    clusters = []
    for cluster in by_type["Cluster"]:
        cluster["name"] = qualified(namespace, cec, cluster["name"])
        if cluster.get("type") != "EDS":
            clusters.append(cluster)
        elif upstream_port is not None:
            clusters.append(upstream_cluster(cluster["name"], upstream_port))
        else:
            cluster["eds_cluster_config"] = {
                "eds_config": {"ads": {}, "resource_api_version": "V3"}
            }
            clusters.append(cluster)
    return {
        "node": {"id": "cilium-envoy", "cluster": "cilium-envoy"},
        "static_resources": {"listeners": [cilium_listener], "clusters": [*clusters, _ads()]},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc-cilium"}}],
            }
        },
    }


def _ads() -> dict[str, Any]:
    return {
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
