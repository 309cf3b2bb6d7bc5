"""The `cilium` target: a CiliumEnvoyConfig, and its clusterwide variant.

Cilium redirects the traffic of `spec.services` to the listener below and fills in what
it owns: the listener's address, the config source of `rds` and of EDS clusters, and
the endpoints of `spec.backendServices`. The resources here are the rest: a listener
with the doctor's filter before the router, its route to the backend service's EDS
cluster (Cilium names it NAMESPACE/NAME:PORT), that cluster, and the ext_proc server's
cluster.

What cilium-envoy compiles (cilium/proxy envoy_build_config/extensions_build_config.bzl,
read at main 7dfaf943, which pins Envoy 1.38.3, and on branches v1.30 to v1.37):
- `envoy.filters.http.ext_proc` (:183 on main) only from the commit "config: enable
  ext_proc during build" (2026-01-12: 03e4104d on v1.35 at Envoy 1.35.9, 1d699bb5 on main
  at Envoy 1.36.5, so v1.36 and v1.37 have it); older cilium-envoy rejects the filter.
- not `envoy.filters.http.composite` (:175, commented out on main and every branch), nor
  `header_mutation` (:226), lua (:210) or the CEL matcher (:98): gated mode has no
  mechanism there, so it is refused and `always` is Cilium's mode. The route's
  `response_headers_to_remove` and `request_headers_to_remove` (core Envoy) do what the
  guard filter does elsewhere: upstream-sent annotations, the reveal token and the fixed
  names the policy strips never pass, also when the server is down.
- no tracer (:325-334 on main, every `envoy.tracers.*` commented out; none on v1.30 to
  v1.37 either): the CEC's HCM has no `tracing`, and a collector (`--tracing-*`) is refused.

Names (cilium/cilium pkg/ciliumenvoyconfig/cec_resource_parser.go at 02fbb426,
`ParseResources` and `qualifyHttpFilters`; pkg/policy/api `ResourceQualifiedName`):
Cilium prefixes listener and route names with `NAMESPACE/CEC-NAME/` (and rewrites the
`rds` reference), prefixes a cluster name only when it has no `/`, and rewrites no cluster
reference inside an HTTP filter. So the server's cluster gets the qualified name Cilium
would give it, `NAMESPACE/CEC-NAME/extproc-doctor` (NAMESPACE empty for the clusterwide
kind), and the ext_proc filter names exactly that: one cluster per CEC, so deleting one
Service's CEC cannot take away the cluster another's filter uses. The parser sets no
`traffic_direction`; the filter says where it sits: the edge, unless
`--cilium-direction outbound` declares that only pods of the cluster are the clients.

Endpoints (cilium/cilium; pkg/ciliumenvoyconfig/k8s_reflector.go:145-165 at 011404e0, the
ports a CEC names; controller.go at 01c123c6: `computeLoadAssignments` :398-536,
`getProxyRedirect` :79-99; pkg/loadbalancer/service.go:164-169 at 008d8c1b,
`ProxyRedirect.Redirects`): cilium-agent publishes a Service's backends as the
ClusterLoadAssignment `NS/NAME:PORT` only for the ports a CEC lists (`services[].ports`,
`backendServices[].number`); with none listed it publishes `NS/NAME:*` and `NS/NAME`
holding the backends of every port, and it redirects every port of each `services[]`
entry into the listener. So the CEC lists the one port, both for the redirect and for the
endpoints. The server is reached the same way: cilium-envoy runs with `hostNetwork: true`
and, by default, no cluster DNS policy (install/kubernetes/cilium/templates/cilium-envoy/
daemonset.yaml:205-208 at 02515d1e: `dnsPolicy` only when `envoy.dnsPolicy` is set; the
chart's values reference gives it no default), so the Service's DNS name may not resolve
there. The server's cluster is EDS instead, fed from the doctor's Service as a
`backendServices` entry (`eds_cluster_config.service_name` names the shared assignment,
the cluster keeps its per-CEC name, as Cilium's testdata/shared_cluster.txtar at 035b1474
does). Only with `--extproc-address` does it keep a fixed address.
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
    without_annotations,
)
from extproc.render.gate import request_gate
from extproc.render.options import NAME, RenderError, RenderMode, RenderOptions

LISTENER = f"{NAME}-listener"
ROUTE = f"{NAME}-route"
_TYPE = "type.googleapis.com/envoy.config"

NO_TRACER = (
    "--tracing-zipkin/--tracing-otlp: cilium-envoy compiles no tracer (cilium/proxy "
    "envoy_build_config/extensions_build_config.bzl: every envoy.tracers.* commented out on "
    "main and on every release branch), so its listener cannot trace; the cilium target "
    "renders no tracing"
)
GATED_REFUSED = (
    "cilium-envoy does not compile envoy.filters.http.composite, which gated mode needs "
    "(cilium/proxy envoy_build_config/extensions_build_config.bzl: commented out on main and "
    "on every release branch), and the Service's traffic would break on a rejected listener: "
    "use --mode always (the default for cilium)"
)


def config_name(options: RenderOptions, *, clusterwide: bool) -> str:
    """The CEC's name: one per Service (clusterwide: unique across namespaces too)."""
    namespace, name, _ = options.cilium_backend()
    return f"{NAME}-{namespace}-{name}" if clusterwide else f"{NAME}-{name}"


def extproc_cluster_name(options: RenderOptions, *, clusterwide: bool) -> str:
    """The server's cluster, qualified as Cilium qualifies this CEC's resources."""
    namespace, _, _ = options.cilium_backend()
    prefix = "" if clusterwide else namespace
    return f"{prefix}/{config_name(options, clusterwide=clusterwide)}/{NAME}"


def backend_cluster_name(options: RenderOptions) -> str:
    """The Service's port as Cilium names its load assignment: NAMESPACE/NAME:PORT."""
    namespace, name, port = options.cilium_backend()
    return f"{namespace}/{name}:{port}"


def server_assignment_name(options: RenderOptions) -> str:
    """The doctor's Service port as Cilium names its load assignment."""
    _, port = options.extproc_target(in_cluster=True)
    return f"{options.namespace}/{NAME}:{port}"


def direction(options: RenderOptions) -> Direction:
    """Where the filter sits: the edge unless `--cilium-direction outbound` says that only
    pods of the cluster call the Service. A CEC has no place of its own (Cilium sets no
    `traffic_direction`), and a Service reachable from outside would otherwise show its
    topology to the Internet and pass on forwarding headers that clients made up."""
    return options.cilium_direction


def render_envoy_config(options: RenderOptions, *, clusterwide: bool) -> dict[str, Any]:
    """The CiliumEnvoyConfig (in the backend service's namespace) or CiliumClusterwideEnvoyConfig."""
    if options.mode is RenderMode.GATED:
        raise RenderError(GATED_REFUSED)
    namespace, name, port = options.cilium_backend()
    metadata: dict[str, Any] = {
        "name": config_name(options, clusterwide=clusterwide),
        "labels": {"app.kubernetes.io/name": NAME},
    }
    if not clusterwide:
        metadata["namespace"] = namespace
    service = {"name": name, "namespace": namespace}
    # Only this port is redirected, and only its backends are published under the name
    # the route uses; every other port of the Service keeps Cilium's own load balancing.
    backends = [{**service, "number": [str(port)]}]
    if options.extproc_address is None:
        _, server_port = options.extproc_target(in_cluster=True)
        backends.append(
            {"name": NAME, "namespace": options.namespace, "number": [str(server_port)]}
        )
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumClusterwideEnvoyConfig" if clusterwide else "CiliumEnvoyConfig",
        "metadata": metadata,
        "spec": {
            "services": [{**service, "ports": [port]}],
            "backendServices": backends,
            "resources": resources(options, clusterwide=clusterwide),
        },
    }


def resources(options: RenderOptions, *, clusterwide: bool) -> list[dict[str, Any]]:
    """The Envoy resources, each with its `@type` as Cilium expects."""
    backend = {"name": backend_cluster_name(options), "type": "EDS", "connect_timeout": "5s"}
    return [
        {
            "@type": f"{_TYPE}.listener.v3.Listener",
            **typed(
                Listener, _listener(options, extproc_cluster_name(options, clusterwide=clusterwide))
            ),
        },
        {
            "@type": f"{_TYPE}.route.v3.RouteConfiguration",
            **typed(RouteConfiguration, _route(options)),
        },
        {"@type": f"{_TYPE}.cluster.v3.Cluster", **typed(Cluster, backend)},
        {"@type": f"{_TYPE}.cluster.v3.Cluster", **_server_cluster(options, clusterwide)},
    ]


def _server_cluster(options: RenderOptions, clusterwide: bool) -> dict[str, Any]:
    """The server's cluster: EDS from the doctor's Service, or the fixed --extproc-address."""
    host, port = options.extproc_target(in_cluster=True)
    name = extproc_cluster_name(options, clusterwide=clusterwide)
    server = extproc_cluster(name, host, port, options)
    if options.extproc_address is not None:
        return server
    for fixed in ("load_assignment", "dns_lookup_family", "respect_dns_ttl"):
        server.pop(fixed, None)
    eds = {"service_name": server_assignment_name(options)}
    return typed(Cluster, {**server, "type": "EDS", "eds_cluster_config": eds})


def _listener(options: RenderOptions, server_cluster: str) -> dict[str, Any]:
    where = direction(options)
    gate = request_gate(options.policy, where)
    doctor = doctor_filters(options.mode, server_cluster, gate, where, options.transport)
    manager = http_connection_manager(LISTENER, doctor, rds={"route_config_name": ROUTE})
    return {"name": LISTENER, "filter_chains": [{"filters": [manager]}]}


def _route(options: RenderOptions) -> dict[str, Any]:
    route = {"match": {"prefix": "/"}, "route": {"cluster": backend_cluster_name(options)}}
    return without_annotations(
        {"name": ROUTE, "virtual_hosts": [{"name": ROUTE, "domains": ["*"], "routes": [route]}]},
        options.policy,
        direction(options),
    )
