"""The `cilium` target: a CiliumEnvoyConfig, and its clusterwide variant.

Cilium redirects the traffic of `spec.services` to the listener below and fills in what
it owns: the listener's address, the config source of `rds` and of EDS clusters, and
the endpoints of `spec.backendServices`. The resources here are the rest: a listener
with the doctor's filter before the router, its route to the backend service's EDS
cluster (Cilium names it NAMESPACE/NAME:PORT), that cluster, and the ext_proc server's
cluster. The server's cluster name contains a `/`, so Cilium leaves it unqualified and
the name the filter refers to stays the cluster's name.
"""

from __future__ import annotations

from typing import Any

from extproc.config import Direction
from extproc.render.envoy_config import (
    Cluster,
    Listener,
    RouteConfiguration,
    doctor_filters,
    extproc_cluster,
    http_connection_manager,
    typed,
)
from extproc.render.gate import request_gate
from extproc.render.options import NAME, RenderOptions

LISTENER = f"{NAME}-listener"
ROUTE = f"{NAME}-route"
_TYPE = "type.googleapis.com/envoy.config"


def extproc_cluster_name(options: RenderOptions) -> str:
    return f"{options.namespace}/{NAME}"


def backend_cluster_name(options: RenderOptions) -> str:
    namespace, name, port = options.cilium_backend()
    return f"{namespace}/{name}:{port}"


def render_envoy_config(options: RenderOptions, *, clusterwide: bool) -> dict[str, Any]:
    """The CiliumEnvoyConfig (in the backend service's namespace) or CiliumClusterwideEnvoyConfig."""
    namespace, name, _ = options.cilium_backend()
    metadata: dict[str, Any] = {"name": NAME, "labels": {"app.kubernetes.io/name": NAME}}
    if not clusterwide:
        metadata["namespace"] = namespace
    service = {"name": name, "namespace": namespace}
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumClusterwideEnvoyConfig" if clusterwide else "CiliumEnvoyConfig",
        "metadata": metadata,
        "spec": {
            "services": [service],
            "backendServices": [service],
            "resources": resources(options),
        },
    }


def resources(options: RenderOptions) -> list[dict[str, Any]]:
    """The Envoy resources, each with its `@type` as Cilium expects."""
    host, port = options.extproc_target(in_cluster=True)
    server = extproc_cluster(extproc_cluster_name(options), host, port, options.extproc_tls_ca)
    backend = {"name": backend_cluster_name(options), "type": "EDS", "connect_timeout": "5s"}
    return [
        {"@type": f"{_TYPE}.listener.v3.Listener", **typed(Listener, _listener(options))},
        {
            "@type": f"{_TYPE}.route.v3.RouteConfiguration",
            **typed(RouteConfiguration, _route(options)),
        },
        {"@type": f"{_TYPE}.cluster.v3.Cluster", **typed(Cluster, backend)},
        {"@type": f"{_TYPE}.cluster.v3.Cluster", **server},
    ]


def _listener(options: RenderOptions) -> dict[str, Any]:
    gate = request_gate(options.policy, Direction.EDGE)
    doctor = doctor_filters(options.mode, extproc_cluster_name(options), gate)
    manager = http_connection_manager(LISTENER, doctor, rds={"route_config_name": ROUTE})
    return {"name": LISTENER, "filter_chains": [{"filters": [manager]}]}


def _route(options: RenderOptions) -> dict[str, Any]:
    route = {"match": {"prefix": "/"}, "route": {"cluster": backend_cluster_name(options)}}
    return {
        "name": ROUTE,
        "virtual_hosts": [{"name": ROUTE, "domains": ["*"], "routes": [route]}],
    }
