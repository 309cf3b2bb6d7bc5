"""A stand-in for istiod's part in an EnvoyFilter: which proxies it reaches, and how it patches.

Listeners are shaped as istiod builds them for a sidecar (outbound per-port listener,
`virtualInbound`, and with HBONE `connect_terminate` and `main_internal`), an ingress
gateway and an egress gateway; the EnvoyFilters are selected, ordered and applied with
Istio's rules. Everything cited is istio/istio at 86c9f01fd735 (2026-08):

- I1 selection, pilot/pkg/model/push_context.go:2323-2340: the root namespace's filters,
  then the proxy's namespace's (skipped when it is the root); policyattachment.go:109-111:
  a `workloadSelector` selects workloads whose labels include its labels; :127-148: a
  waypoint, or a Gateway API gateway with the feature off, ignores selector policies.
- I2 order, push_context.go:2342-2359: priority ascending, then root namespace first, then
  creation time, then name; :2369-2378: patches kept in that order if `proxyMatch`.
- I3 proxy version, pilot/pkg/model/envoyfilter.go:186-200 and 223-255: `proxyVersion` is
  a regex on the proxy's ISTIO_VERSION (a well-known `^1\\.NN.*` becomes a prefix test);
  a proxy with no version matches no regex.
- I4 contexts, pilot/pkg/networking/core/listener_builder.go:186-203: a router gets GATEWAY
  on its listeners; a sidecar SIDECAR_OUTBOUND on outbound ones, SIDECAR_INBOUND on
  `virtualInbound` and every inbound listener (with HBONE: `connect_terminate` and
  `main_internal`, :106-110 and listener_inbound.go:136-199).
- I5 matching, envoyfilter/listener_patch.go:612-639 (`listenerMatch`: name, portNumber,
  skipped for virtual listeners), :641-698 (`filterChainMatch`: a virtual listener's
  portNumber against the chain's destination port, chain name, SNI, destinationPort),
  :733-739 (network filter name), :751-759 (subFilter name), :761-765 (context or ANY).
  Checked against istiod's own TestApplyListenerPatches (data/istio_patch_cases.yaml).
- I6 operations, listener_patch.go:438-524: ADD appends; INSERT_FIRST prepends;
  INSERT_BEFORE/AFTER at the first matching filter (envoyfilter/util.go:63-116), or
  first/last without a subFilter; REPLACE and REMOVE need a subFilter; MERGE (:527-575)
  merges into the matching filter.
- I7 clusters, envoyfilter/cluster_patch.go:131-150: ADD for the patch's context; ANY only
  for SIDECAR_OUTBOUND and GATEWAY. Sidecars insert at SIDECAR_OUTBOUND and
  SIDECAR_INBOUND, gateways at GATEWAY (core/cluster.go:330-379).
- I8 MERGE on a network filter, listener_patch.go:388-431 (`patchNetworkFilter`): the
  matching filter's typed_config merged with the patch's by `util.MergeAnyWithAny`
  (pilot/pkg/networking/util/util.go:483-505), which is `merge.Merge`
  (pkg/proto/merge/merge.go:72, :109-115, :140-141): proto merge, so a repeated field of
  the patch is APPENDED to the filter's (`mergeList`), a message merged field by field, a
  scalar replaced, a map entry replaced. Only the MERGE operation (:401):
  MERGE_AND_REPLACE_LIST's list replacement governs top-level merges only
  (envoyfilter/util.go:24-44). It runs before the HCM's HTTP_FILTER patches (:433-435),
  on listeners built whole first: istiod builds each HCM, its `tracing` included
  (listener_builder.go:467, `configureTracing`), then patches (listener.go:121-128,
  `patchListeners`). HTTP_FILTER MERGE (:542-563) merges the same way.
- I9 tracing, pilot/pkg/networking/core/tracing.go: with a Zipkin provider (Telemetry API or
  meshConfig), the HCM's `tracing` has the provider (:526-544, Zipkin settings :256-322,
  the legacy collector fields for proxies before 1.29), sampling (:700-710) and
  `custom_tags` set once (:762): Istio's service tags as literals (:629-697) and the
  authorization dry-run tags read from dynamic metadata (:547-584), sorted by name.

HTTP filters are named as istiod names them (pilot/pkg/xds/filters/filters.go, the HCM's
list in listener_builder.go:469-519, connect_terminate's in listener_waypoint.go:274-309).
Istio's own filters do not exist in upstream Envoy, so each stands in as an empty
`header_mutation` under Istio's name: Envoy runs the chain, and positions stay Istio's.
Not modelled: everything else in a listener (TLS, listener filters, per-port chains),
network-filter operations other than MERGE, route and cluster MERGE patches, `targetRefs`,
and waypoints.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

HCM = "envoy.filters.network.http_connection_manager"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "envoy.filters.http.router"
_STAND_IN = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"
_ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"

# The HTTP filters istiod puts in each kind of HCM, in order (listener_builder.go:469-519:
# metadata exchange, authn, authz, grpc stats, alpn (not inbound), fault, cors, telemetry).
OUTBOUND_FILTERS = (
    "istio.metadata_exchange",
    "envoy.filters.http.grpc_stats",
    "istio.alpn",
    "envoy.filters.http.fault",
    "envoy.filters.http.cors",
    "istio.stats",
    ROUTER,
)
INBOUND_FILTERS = (
    "istio.metadata_exchange",
    "istio_authn",
    "envoy.filters.http.rbac",
    "envoy.filters.http.grpc_stats",
    "envoy.filters.http.fault",
    "envoy.filters.http.cors",
    "istio.stats",
    ROUTER,
)
# With HBONE the inbound chains of main_internal have no metadata exchange (appendMxFilter).
HBONE_INBOUND_FILTERS = INBOUND_FILTERS[1:]
CONNECT_TERMINATE_FILTERS = ("waypoint_downstream_peer_metadata", "connect_authority", ROUTER)


@dataclass(frozen=True)
class Proxy:
    """A proxy as istiod sees it: its kind, namespace, labels and reported Istio version."""

    name: str
    router: bool  # a gateway (model.Router), else a sidecar
    namespace: str
    labels: dict[str, str] = field(default_factory=dict)
    version: str = "1.28.0"
    hbone: bool = False


def http_filter(name: str) -> dict[str, Any]:
    kind = _ROUTER_TYPE if name == ROUTER else _STAND_IN
    return {"name": name, "typed_config": {"@type": kind}}


# Istio's Zipkin collector cluster, as a Telemetry provider `zipkin.istio-system:9411` names it.
ZIPKIN_CLUSTER = "outbound|9411||zipkin.istio-system.svc.cluster.local"
_DRY_RUN = {
    "istio.authorization.dry_run.allow_policy.name": "istio_dry_run_allow_shadow_effective_policy_id",
    "istio.authorization.dry_run.allow_policy.result": "istio_dry_run_allow_shadow_engine_result",
    "istio.authorization.dry_run.deny_policy.name": "istio_dry_run_deny_shadow_effective_policy_id",
    "istio.authorization.dry_run.deny_policy.result": "istio_dry_run_deny_shadow_engine_result",
}


def istio_tracing(proxy: Proxy, sampling: float = 100.0) -> dict[str, Any]:
    """I9: the HCM `tracing` istiod builds for `proxy` with a Zipkin provider."""
    service = {
        "istio.canonical_revision": proxy.labels.get(
            "service.istio.io/canonical-revision", "latest"
        ),
        "istio.canonical_service": proxy.labels.get("service.istio.io/canonical-name", "unknown"),
        "istio.mesh_id": "unknown",
        "istio.namespace": proxy.namespace,
        "istio.cluster_id": "unknown",
    }
    tags = [{"tag": tag, "literal": {"value": value}} for tag, value in service.items()]
    tags += [
        {
            "tag": tag,
            "metadata": {
                "kind": {"request": {}},
                "metadata_key": {"key": "envoy.filters.http.rbac", "path": [{"key": key}]},
            },
        }
        for tag, key in _DRY_RUN.items()
    ]
    zipkin = {
        "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
        "collector_cluster": ZIPKIN_CLUSTER,
        "collector_endpoint": "/api/v2/spans",
        "collector_endpoint_version": "HTTP_JSON",
        "collector_hostname": "zipkin.istio-system:9411",
        "trace_id_128bit": True,
        "shared_span_context": False,
    }
    return {
        "provider": {"name": "envoy.tracers.zipkin", "typed_config": zipkin},
        "client_sampling": {"value": 100.0},
        "overall_sampling": {"value": 100.0},
        "random_sampling": {"value": sampling},
        "custom_tags": sorted(tags, key=lambda t: t["tag"]),
    }


def listener(
    name: str, port: int, direction: str, filters: tuple[str, ...], **settings: Any
) -> dict[str, Any]:
    """A listener with one HCM chain of `filters`; `settings` may set `route_config` and
    `tracing`."""
    manager = {
        "@type": HCM_TYPE,
        "stat_prefix": name,
        "route_config": settings.get("route_config", {"name": name, "virtual_hosts": []}),
        "http_filters": [http_filter(f) for f in filters],
    }
    if settings.get("tracing") is not None:
        manager["tracing"] = settings["tracing"]
    return {
        "name": name,
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "traffic_direction": direction,
        "filter_chains": [{"filters": [{"name": HCM, "typed_config": manager}]}],
    }


def listeners_of(proxy: Proxy, *, traced: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """(patch context, listener) as istiod builds them for `proxy` (I4); `traced`: the mesh
    has a Zipkin tracing provider (I9)."""
    t = {"tracing": istio_tracing(proxy)} if traced else {}
    if proxy.router:
        # Gateways: OUTBOUND (listener.go:1183), named ADDRESS_PORT.
        return [("GATEWAY", listener("0.0.0.0_8080", 8080, "OUTBOUND", OUTBOUND_FILTERS, **t))]
    out = [
        ("SIDECAR_OUTBOUND", listener("0.0.0.0_8080", 8080, "OUTBOUND", OUTBOUND_FILTERS, **t)),
        ("SIDECAR_INBOUND", listener("virtualInbound", 15006, "INBOUND", INBOUND_FILTERS, **t)),
    ]
    if proxy.hbone:
        out += [
            (
                "SIDECAR_INBOUND",
                listener("connect_terminate", 15008, "INBOUND", CONNECT_TERMINATE_FILTERS, **t),
            ),
            (
                "SIDECAR_INBOUND",
                listener("main_internal", 0, "INBOUND", HBONE_INBOUND_FILTERS, **t),
            ),
        ]
    return out


def _selected(envoy_filter: dict[str, Any], proxy: Proxy) -> bool:
    """I1: a selector's labels are a subset of the workload's."""
    labels = envoy_filter["spec"].get("workloadSelector", {}).get("labels", {})
    return all(proxy.labels.get(k) == v for k, v in labels.items())


def matched_filters(
    envoy_filters: list[dict[str, Any]], proxy: Proxy, root_namespace: str
) -> list[dict[str, Any]]:
    """I1 and I2: the EnvoyFilters that reach `proxy`, in the order istiod applies them.

    Creation time is `metadata.creationTimestamp` (RFC 3339, as the API server sets it);
    a rendered filter has none and counts as the oldest.
    """
    namespaces = [root_namespace]
    if proxy.namespace != root_namespace:
        namespaces.append(proxy.namespace)
    matched = [
        f
        for ns in namespaces
        for f in envoy_filters
        if f["metadata"]["namespace"] == ns and _selected(f, proxy)
    ]

    def order(f: dict[str, Any]) -> tuple[int, bool, str, str]:
        meta = f["metadata"]
        root_last = meta["namespace"] != root_namespace
        created = meta.get("creationTimestamp", "")
        return (
            f["spec"].get("priority", 0),
            root_last,
            created,
            f"{meta['name']}.{meta['namespace']}",
        )

    return sorted(matched, key=order)


_WELL_KNOWN = re.compile(r"\^1\\\.(\d+)\.\*")


def proxy_matches(patch: dict[str, Any], proxy: Proxy) -> bool:
    """I3: the patch's proxyVersion against the proxy's Istio version."""
    wanted = patch.get("match", {}).get("proxy", {}).get("proxyVersion", "")
    if not wanted:
        return True
    known = _WELL_KNOWN.fullmatch(wanted)
    if known and 16 <= int(known.group(1)) <= 23:
        return proxy.version.startswith(f"1.{known.group(1)}")
    return bool(proxy.version) and re.search(wanted, proxy.version) is not None


def patches_for(
    envoy_filters: list[dict[str, Any]], proxy: Proxy, root_namespace: str
) -> list[dict[str, Any]]:
    """I2: every patch that applies to `proxy`, in order."""
    return [
        patch
        for f in matched_filters(envoy_filters, proxy, root_namespace)
        for patch in f["spec"]["configPatches"]
        if proxy_matches(patch, proxy)
    ]


def _listener_match(patch: dict[str, Any], lis: dict[str, Any]) -> bool:
    """I5 `listenerMatch`: the listener's name, and its port unless it is a virtual one."""
    wanted = patch.get("match", {}).get("listener")
    if wanted is None:
        return True
    if wanted.get("name") and wanted["name"] != lis["name"]:
        return False
    port = wanted.get("portNumber", 0)
    if port and not _virtual(lis):
        return lis.get("address", {}).get("socket_address", {}).get("port_value") == port
    return True


def _virtual(lis: dict[str, Any]) -> bool:
    return lis["name"] in ("virtualInbound", "virtualOutbound")


def _chain_match(patch: dict[str, Any], lis: dict[str, Any], chain: dict[str, Any]) -> bool:
    """I5 `filterChainMatch` (name, SNI, destination port; a virtual listener's portNumber
    is its chain's destination port) and the network filter's name."""
    wanted = patch.get("match", {}).get("listener")
    if wanted is None:
        return True
    fcm = chain.get("filter_chain_match", {})
    port = wanted.get("portNumber", 0)
    if _virtual(lis) and port and fcm.get("destination_port") != port:
        return False
    match = wanted.get("filterChain", {})
    if match.get("name") and match["name"] != chain.get("name"):
        return False
    if match.get("sni") and match["sni"] not in fcm.get("server_names", []):
        return False
    if match.get("destinationPort") and fcm.get("destination_port") != match["destinationPort"]:
        return False
    network = match.get("filter", {}).get("name")
    return not network or network == HCM


def _sub_filter(patch: dict[str, Any]) -> str | None:
    chain = patch.get("match", {}).get("listener", {}).get("filterChain", {})
    sub = chain.get("filter", {}).get("subFilter")
    return None if sub is None else str(sub["name"])


def _context_match(patch: dict[str, Any], context: str) -> bool:
    return patch.get("match", {}).get("context", "ANY") in (context, "ANY")


def _apply_http_patch(filters: list[dict[str, Any]], patch: dict[str, Any]) -> list[dict[str, Any]]:
    """I6: one HTTP_FILTER patch on one HCM's filter list."""
    operation = patch["patch"]["operation"]
    value = copy.deepcopy(patch["patch"].get("value"))
    sub = _sub_filter(patch)
    at = next((n for n, f in enumerate(filters) if f["name"] == sub), None)
    match operation:
        case "ADD":
            return [*filters, value]
        case "INSERT_FIRST":
            return [value, *filters]
        case "INSERT_BEFORE":
            if sub is None:
                return [value, *filters]
            return filters if at is None else [*filters[:at], value, *filters[at:]]
        case "INSERT_AFTER":
            if sub is None:
                return [*filters, value]
            return filters if at is None else [*filters[: at + 1], value, *filters[at + 1 :]]
        case "REPLACE":
            return filters if at is None else [*filters[:at], value, *filters[at + 1 :]]
        case "REMOVE":
            return [f for f in filters if sub is None or f["name"] != sub]
        case "MERGE":
            return [proto_merge(f, value or {}) if f["name"] == sub else f for f in filters]
    raise AssertionError(f"operation {operation} is not modelled")


def proto_merge(base: Any, value: Any) -> Any:
    """I8: `value` merged into `base` as proto merge does, on the JSON form: a message
    field by field, a repeated field appended, anything else replaced. (A map would have
    its entries replaced; the fields patched here have none.)"""
    if isinstance(base, dict) and isinstance(value, dict):
        return {**base, **{k: proto_merge(base.get(k), v) for k, v in value.items()}}
    if isinstance(base, list) and isinstance(value, list):
        return [*base, *value]
    return value


def _merge_network_filter(network: dict[str, Any], patch: dict[str, Any]) -> None:
    """I8: a MERGE patch on the network filter `network` (same typed_config type)."""
    value = copy.deepcopy(patch["patch"].get("value") or {})
    config = value.get("typed_config")
    if config is None:
        return
    assert config["@type"] == network["typed_config"]["@type"], "MergeAnyWithAny: one type"
    network["typed_config"] = proto_merge(network["typed_config"], config)


def apply(
    envoy_filters: list[dict[str, Any]], proxy: Proxy, root_namespace: str, *, traced: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(listeners, inserted clusters) of `proxy` after istiod applied the EnvoyFilters;
    `traced`: the mesh has a Zipkin tracing provider (I9)."""
    patches = patches_for(envoy_filters, proxy, root_namespace)
    built = listeners_of(proxy, traced=traced)
    out = [patch_listener(lis, context, patches) for context, lis in built]
    return out, _inserted_clusters(patches, proxy)


def _patch_applies(
    patch: dict[str, Any], context: str, lis: dict[str, Any], chain: dict[str, Any]
) -> bool:
    return (
        _context_match(patch, context)
        and _listener_match(patch, lis)
        and _chain_match(patch, lis, chain)
    )


def patch_listener(
    lis: dict[str, Any], context: str, patches: list[dict[str, Any]]
) -> dict[str, Any]:
    """I5, I6, I8: each HCM chain of `lis` gets the NETWORK_FILTER MERGE patches, then the
    HTTP_FILTER patches, each kind in order."""
    for chain in lis["filter_chains"]:
        for network in chain["filters"]:
            if network["name"] != HCM:
                continue
            for patch in patches:
                if (
                    patch["applyTo"] == "NETWORK_FILTER"
                    and patch["patch"]["operation"] == "MERGE"
                    and _patch_applies(patch, context, lis, chain)
                ):
                    _merge_network_filter(network, patch)
            manager = network["typed_config"]
            for patch in patches:
                if patch["applyTo"] == "HTTP_FILTER" and _patch_applies(patch, context, lis, chain):
                    manager["http_filters"] = _apply_http_patch(manager["http_filters"], patch)
    return lis


def _inserted_clusters(patches: list[dict[str, Any]], proxy: Proxy) -> list[dict[str, Any]]:
    """I7: the clusters ADDed for the contexts this proxy builds clusters in."""
    contexts = ("GATEWAY",) if proxy.router else ("SIDECAR_OUTBOUND", "SIDECAR_INBOUND")
    clusters = []
    for context in contexts:
        for patch in patches:
            if patch["applyTo"] != "CLUSTER" or patch["patch"]["operation"] != "ADD":
                continue
            wanted = patch.get("match", {}).get("context", "ANY")
            if wanted == "ANY" and context not in ("SIDECAR_OUTBOUND", "GATEWAY"):
                continue
            if _context_match(patch, context):
                clusters.append(copy.deepcopy(patch["patch"]["value"]))
    return clusters
