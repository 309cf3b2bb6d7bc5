"""Rendered fragments placed the way their control plane places them, as one Envoy bootstrap.

Istio: the listeners istiod builds for a sidecar and an ingress gateway, patched with
Istio's rules (istio_pilot.py), with the `traffic_direction` Istio gives them
(istio/istio pilot/pkg/networking/core at 86c9f01f: sidecar outbound OUTBOUND,
listener.go:592; gateway OUTBOUND too, listener.go:1183; inbound INBOUND,
listener_inbound.go:156). Cilium: the CEC's resources with the names Cilium gives them and the parts it
fills in (cilium/cilium pkg/ciliumenvoyconfig/cec_resource_parser.go `ParseResources` and
pkg/policy/api `ResourceQualifiedName`, at 02fbb426): listener and route names prefixed
with NAMESPACE/CEC-NAME/ always, cluster names only when they have no `/`, the `rds`
reference rewritten, the listener's address and the EDS source filled in.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .cilium_agent import Service, feed_from_files, load_assignments
from .istio_pilot import ZIPKIN_CLUSTER, Proxy, apply

UPSTREAM = "upstream"
_LOOPBACK_0 = {"socket_address": {"address": "127.0.0.1", "port_value": 0}}
# The proxies the Istio placement runs: a sidecar and the default install's ingress gateway.
SIDECAR = Proxy("web", router=False, namespace="default", labels={"app": "web"})
INGRESS = Proxy(
    "ingress", router=True, namespace="istio-system", labels={"istio": "ingressgateway"}
)
# Their listeners by the names the tests use.
ISTIO_LISTENERS = {
    (SIDECAR.name, "0.0.0.0_8080"): "sidecar_outbound",
    (SIDECAR.name, "virtualInbound"): "sidecar_inbound",
    (INGRESS.name, "0.0.0.0_8080"): "gateway",
}


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


def apply_envoy_filter(
    envoy_filters: list[dict[str, Any]],
    upstream_port: int | None = None,
    root_namespace: str = "istio-system",
    zipkin_port: int | None = None,
) -> dict[str, Any]:
    """One bootstrap with the sidecar's and the ingress gateway's HTTP listeners, patched by istiod.

    The EnvoyFilters are applied by the Istio stand-in (istio_pilot.py) to each proxy's
    listeners; the listeners are renamed (ISTIO_LISTENERS) and moved to 127.0.0.1:0 so one
    Envoy runs them all; with `upstream_port` every route goes to the `upstream` cluster.
    With `zipkin_port` the mesh traces to a Zipkin collector there, as istiod configures it.
    """
    listeners, clusters = [], {}
    if upstream_port is not None:
        clusters[UPSTREAM] = upstream_cluster(UPSTREAM, upstream_port)
    if zipkin_port is not None:
        clusters[ZIPKIN_CLUSTER] = upstream_cluster(ZIPKIN_CLUSTER, zipkin_port)
    for proxy in (SIDECAR, INGRESS):
        patched, inserted = apply(
            envoy_filters, proxy, root_namespace, traced=zipkin_port is not None
        )
        clusters.update({c["name"]: c for c in inserted})
        for lis in patched:
            name = ISTIO_LISTENERS.get((proxy.name, lis["name"]))
            if name is not None:
                listeners.append(_runnable(lis, name, upstream_port is not None))
    return {"static_resources": {"listeners": listeners, "clusters": list(clusters.values())}}


def _runnable(lis: dict[str, Any], name: str, upstream: bool) -> dict[str, Any]:
    """`lis` on 127.0.0.1:0 under `name`; with `upstream`, every request routes there."""
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": UPSTREAM}}] if upstream else []
    manager = lis["filter_chains"][0]["filters"][0]["typed_config"]
    manager["route_config"] = {
        "name": name,
        "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}],
    }
    manager["stat_prefix"] = name
    return {**lis, "name": name, "address": _LOOPBACK_0}


def qualified(namespace: str, cec: str, name: str, *, force: bool = False) -> str:
    """The name Cilium gives a CEC's resource (`ResourceQualifiedName`)."""
    slash = name.find("/")
    if not name or (
        slash >= 0 and (not force or (slash == len(namespace) and name.startswith(namespace)))
    ):
        return name
    return f"{namespace}/{cec}/{name}"


def cilium_bootstrap(
    config: dict[str, Any],
    services: Mapping[str, Service] | None = None,
    where: Path | None = None,
) -> dict[str, Any]:
    """The CEC's resources as static resources, named and completed the way Cilium does.

    With `services` (and a directory `where` for the EDS files), each EDS cluster gets
    the endpoints cilium-agent would publish for them (tests/deploy/cilium_agent.py);
    a cluster whose assignment nothing publishes, or every EDS cluster without
    `services`, keeps an ADS source that never answers, as on a node where the agent
    publishes nothing under that name.
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
    clusters = by_type["Cluster"]
    for cluster in clusters:
        cluster["name"] = qualified(namespace, cec, cluster["name"])
        if cluster.get("type") == "EDS":
            eds = cluster.setdefault("eds_cluster_config", {})
            eds["eds_config"] = {"ads": {}, "resource_api_version": "V3"}
    if services is not None:
        assert where is not None
        feed_from_files(clusters, load_assignments(config, services), where)
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
