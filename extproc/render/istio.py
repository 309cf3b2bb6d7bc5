"""The `istio` target: two EnvoyFilters, one for sidecars and one for ingress gateways.

Each adds the ext_proc server's cluster and inserts the doctor's filter into the HTTP
connection manager: sidecar outbound and sidecar inbound listeners in the first, gateway
listeners in the second. In gated mode each context gets the request matchers of its own
direction: an inbound request legitimately carries Istio's `x-envoy-peer-metadata`, an
outbound one must not.

Where: on outbound and gateway listeners the filter goes FIRST in the chain. Istio's own
metadata-exchange filter adds `x-envoy-peer-metadata(-id)` to requests leaving a proxy;
placed before the router like other filters, ours would see (and, by the echoed-headers
rule, strip) Istio's genuine headers instead of only the ones the app echoed. Placed
first, it sees the request as the app or the client sent it. On inbound listeners it goes
just before the router, after Istio's authentication and authorization filters.

Direction: each context's filters tell the server where they sit (gRPC metadata
`x-extproc-direction`), because the listener's `traffic_direction` cannot: Istio sets
OUTBOUND on sidecar outbound listeners (istio/istio pilot/pkg/networking/core/listener.go:592)
and on gateway listeners too (listener.go:1183, `buildGatewayListener`), INBOUND on the
inbound ones (listener_inbound.go:156); read at istio/istio 86c9f01f (2026-08).

Scope (istio/istio at 86c9f01f; istio/api networking/v1alpha3/envoy_filter.proto at
b8f8791d): an EnvoyFilter in the root namespace (`meshConfig.rootNamespace`, not always
`istio-system`) applies to every proxy, one in another namespace to that namespace's
workloads only (pilot/pkg/model/push_context.go:2332-2340); `workloadSelector` narrows it
to workloads whose labels include the selector's (policyattachment.go:109-111).
`--istio-namespace`, `--istio-selector` and `--istio-gateway-selector` set these, so a
rollout can start with one namespace or one gateway.

Order: istiod applies the matched EnvoyFilters sorted by `priority`, then root namespace
first, then creation time (push_context.go:2342-2359), each patch in turn; INSERT_FIRST
prepends (envoyfilter/listener_patch.go:462-463), so the filter applied LAST is first in
the chain. Ours carry a high priority (ISTIO_PRIORITY): a user's INSERT_FIRST at the
default priority 0, even in the workload's namespace, is applied before ours and so lands
behind the doctor. A user who needs to be ahead of the doctor sets a higher priority.

Gateways: the GATEWAY context matches every proxy of type router: ingress gateways,
egress gateways and Gateway API gateways alike (listener_builder.go:192-195). The doctor
applies the edge rules there (it strips forwarding headers and annotates for clients
outside the mesh), right for an ingress gateway, wrong for an egress gateway whose clients
are mesh sidecars. So gateway patches live in their own EnvoyFilter with a
`workloadSelector`, by default `istio: ingressgateway` (the default install's ingress);
`--istio-gateway-selector` names another (a Gateway API gateway:
`gateway.networking.k8s.io/gateway-name=NAME`). Egress gateways get no doctor: the
sidecar that sent the request already has it on its outbound side. The cluster patches
name their context (SIDECAR_OUTBOUND, GATEWAY), so no proxy gets the cluster twice
(cluster ADD with context ANY goes to both, envoyfilter/cluster_patch.go:139-146).

Inbound and ambient: with HBONE, a sidecar's inbound listeners also include
`connect_terminate` (the CONNECT tunnel's own HCM) and `main_internal`
(listener_builder.go:106-110, listener_inbound.go:136-199). A patch matching only the HCM
would put ext_proc on the tunnel itself, so the inbound patches name their listeners:
`virtualInbound` and `main_internal`. ztunnel has no HTTP filters; waypoints ignore
EnvoyFilters without `targetRefs` (policyattachment.go:139-147): the doctor does not run
there (docs/deploy/istio.md, "Ambient mode").

Proxy version: every patch matches only proxies whose Istio version is in
ISTIO_PROXY_VERSION (`match.proxy.proxyVersion`, a regex on the proxy's ISTIO_VERSION,
envoyfilter.go:223-255): older proxies, and proxies that report no version, are left
alone rather than handed a filter their build lacks.

Traces: a NETWORK_FILTER MERGE on each HCM the doctor's filters are in adds the diagnosis
as `tracing.custom_tags` (filter_config.TRACE_TAGS). istiod builds each HCM whole, its
`tracing` from the Telemetry API or meshConfig included (pilot/pkg/networking/core/
listener_builder.go:467, `configureTracing`; tracing.go:762 sets Istio's own tags), and
patches afterwards (listener.go:121-128); a MERGE merges the patch into the HCM by proto
merge (envoyfilter/listener_patch.go:401-431, `util.MergeAnyWithAny`,
pilot/pkg/networking/util/util.go:483-505, `merge.Merge`, pkg/proto/merge/merge.go:109-115
and :140-141), which APPENDS a repeated field: Istio's tags stay, ours follow. Istio's
own `customTags` take only literals, environment variables and request headers, never
dynamic metadata. Where the mesh traces nothing (meshConfig.enableTracing false and no
Telemetry tracing, or `disableSpanReporting`) the HCM has no `tracing`, and the MERGE
creates one without a provider: `--no-trace-tags` leaves the HCM as the mesh built it.

Trust: the annotation guard (`envoy.filters.http.header_mutation`) follows the doctor's
filters, so it is the first to see a response and removes what an upstream sent under
`x-extproc-*`, also on responses the server never sees. Istio's proxy compiles it
(istio/proxy bazel/extension_config/extensions_build_config.bzl:140 at 86a72d03; first on
branch release-1.19, commit 802c60ba), as it compiles ext_proc (:130) and composite (:123)
(both since 436b34b6, 2021-10-27).
"""

from __future__ import annotations

from typing import Any

from extproc.config import Direction
from extproc.filter_config import trace_custom_tags
from extproc.render.envoy_config import (
    HttpConnectionManager,
    annotation_guard,
    doctor_filters,
    extproc_cluster,
    typed,
)
from extproc.render.gate import request_gate
from extproc.render.options import NAME, IstioScope, RenderOptions

# Inbound listeners that carry application requests. Not `connect_terminate`, the HBONE
# tunnel's own HCM (istio/istio pilot/pkg/networking/core/waypoint.go:27-30).
INBOUND_LISTENERS = ("virtualInbound", "main_internal")
HCM = "envoy.filters.network.http_connection_manager"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"

# (patch context, direction, first in the chain?)
CONTEXTS: tuple[tuple[str, Direction, bool], ...] = (
    ("SIDECAR_OUTBOUND", Direction.OUTBOUND, True),
    ("SIDECAR_INBOUND", Direction.INBOUND, False),
    ("GATEWAY", Direction.EDGE, True),
)
SIDECAR_CONTEXTS = ("SIDECAR_OUTBOUND", "SIDECAR_INBOUND")
GATEWAY_NAME = f"{NAME}-gateway"


def rendered(context: str, scope: IstioScope) -> bool:
    """Whether `context`'s patches are in the render (`--istio-only`)."""
    return scope.sidecars if context in SIDECAR_CONTEXTS else scope.gateways


def render_envoy_filters(options: RenderOptions) -> list[dict[str, Any]]:
    """The EnvoyFilters: sidecars' (SIDECAR_* contexts) and ingress gateways' (GATEWAY)."""
    scope = options.istio
    filters = []
    if scope.sidecars:
        filters.append(_envoy_filter(options, NAME, SIDECAR_CONTEXTS, scope.workload_selector))
    if scope.gateways:
        filters.append(_envoy_filter(options, GATEWAY_NAME, ("GATEWAY",), scope.gateway_selector))
    return filters


def _envoy_filter(
    options: RenderOptions,
    name: str,
    contexts: tuple[str, ...],
    selector: tuple[tuple[str, str], ...],
) -> dict[str, Any]:
    scope = options.istio
    host, port = options.extproc_target(in_cluster=True)
    cluster_patch = {
        "applyTo": "CLUSTER",
        # The first context: SIDECAR_OUTBOUND or GATEWAY, each proxy adds it once.
        "match": _match(options, contexts[0]),
        "patch": {
            "operation": "ADD",
            "value": extproc_cluster(NAME, host, port, options),
        },
    }
    spec: dict[str, Any] = {}
    if selector:
        spec["workloadSelector"] = {"labels": dict(selector)}
    spec["priority"] = scope.priority
    spec["configPatches"] = [
        cluster_patch,
        *(
            patch
            for context in CONTEXTS
            if context[0] in contexts
            for patch in _filter_patches(options, *context)
        ),
        *(
            patch
            for context, _, first in CONTEXTS
            if context in contexts and options.trace_tags
            for patch in _trace_patches(options, context, first)
        ),
    ]
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {
            "name": name,
            "namespace": scope.target_namespace,
            "labels": {"app.kubernetes.io/name": NAME},
        },
        "spec": spec,
    }


def _match(options: RenderOptions, context: str, **listener: Any) -> dict[str, Any]:
    match: dict[str, Any] = {
        "context": context,
        "proxy": {"proxyVersion": options.istio.proxy_version},
    }
    if listener:
        match["listener"] = listener
    return match


def _trace_patches(options: RenderOptions, context: str, first: bool) -> list[dict[str, Any]]:
    """The diagnosis as span tags: a MERGE appending to the `tracing.custom_tags` of each
    HCM the doctor's filters are in (all of the context's, or the inbound listeners')."""
    manager = typed(HttpConnectionManager, {"tracing": {"custom_tags": trace_custom_tags()}})
    value = {"name": HCM, "typed_config": {"@type": HCM_TYPE, **manager}}
    chain = {"filter": {"name": HCM}}
    listeners = [{}] if first else [{"name": name} for name in INBOUND_LISTENERS]
    return [
        {
            "applyTo": "NETWORK_FILTER",
            "match": _match(options, context, **listener, filterChain=chain),
            "patch": {"operation": "MERGE", "value": value},
        }
        for listener in listeners
    ]


def _filter_patches(
    options: RenderOptions, context: str, direction: Direction, first: bool
) -> list[dict[str, Any]]:
    """One patch per filter, keeping the filters' order: INSERT_FIRST or INSERT_BEFORE the router."""
    gate = request_gate(options.policy, direction)
    filters = [
        *doctor_filters(options.mode, NAME, gate, direction, options.transport),
        annotation_guard(options.policy, direction),
    ]
    if first:
        # Each INSERT_FIRST lands before the previous one: insert in reverse.
        chain = {"filter": {"name": HCM}}
        return [
            {
                "applyTo": "HTTP_FILTER",
                "match": _match(options, context, filterChain=chain),
                "patch": {"operation": "INSERT_FIRST", "value": value},
            }
            for value in filters[::-1]
        ]
    router: dict[str, Any] = {"name": HCM, "subFilter": {"name": "envoy.filters.http.router"}}
    chain = {"filter": router}
    return [
        {
            "applyTo": "HTTP_FILTER",
            "match": _match(options, context, name=listener, filterChain=chain),
            "patch": {"operation": "INSERT_BEFORE", "value": value},
        }
        for listener in INBOUND_LISTENERS
        for value in filters
    ]
