"""The `istio` target: one mesh-wide EnvoyFilter.

It adds the ext_proc server's cluster to every proxy and inserts the doctor's filter
into the HTTP connection manager of sidecar outbound, sidecar inbound and gateway
listeners. In gated mode each context gets the request matchers of its own direction:
an inbound request legitimately carries Istio's `x-envoy-peer-metadata`, an outbound one
must not.

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

Trust: the annotation guard (`envoy.filters.http.header_mutation`) follows the doctor's
filters, so it is the first to see a response and removes what an upstream sent under
`x-extproc-*`, also on responses the server never sees. Istio's proxy compiles it
(istio/proxy bazel/extension_config/extensions_build_config.bzl:140 at 86a72d03), as it
compiles ext_proc (:130) and composite (:123).
"""

from __future__ import annotations

from typing import Any

from extproc.config import Direction
from extproc.render.envoy_config import annotation_guard, doctor_filters, extproc_cluster
from extproc.render.gate import request_gate
from extproc.render.options import NAME, RenderOptions

# An EnvoyFilter in the root namespace applies to every proxy in the mesh.
ROOT_NAMESPACE = "istio-system"

# (patch context, direction, first in the chain?)
CONTEXTS: tuple[tuple[str, Direction, bool], ...] = (
    ("SIDECAR_OUTBOUND", Direction.OUTBOUND, True),
    ("SIDECAR_INBOUND", Direction.INBOUND, False),
    ("GATEWAY", Direction.EDGE, True),
)


def render_envoy_filter(options: RenderOptions) -> dict[str, Any]:
    """The EnvoyFilter resource."""
    host, port = options.extproc_target(in_cluster=True)
    cluster_patch = {
        "applyTo": "CLUSTER",
        "match": {"context": "ANY"},
        "patch": {
            "operation": "ADD",
            "value": extproc_cluster(NAME, host, port, options),
        },
    }
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {
            "name": NAME,
            "namespace": ROOT_NAMESPACE,
            "labels": {"app.kubernetes.io/name": NAME},
        },
        "spec": {
            "configPatches": [
                cluster_patch,
                *(patch for context in CONTEXTS for patch in _filter_patches(options, *context)),
            ]
        },
    }


def _filter_patches(
    options: RenderOptions, context: str, direction: Direction, first: bool
) -> list[dict[str, Any]]:
    """One patch per filter, keeping the filters' order: INSERT_FIRST or INSERT_BEFORE the router."""
    gate = request_gate(options.policy, direction)
    filters = [
        *doctor_filters(options.mode, NAME, gate, direction, options.transport),
        annotation_guard(options.policy, direction),
    ]
    hcm: dict[str, Any] = {"name": "envoy.filters.network.http_connection_manager"}
    if first:
        # Each INSERT_FIRST lands before the previous one: insert in reverse.
        filters, operation = filters[::-1], "INSERT_FIRST"
    else:
        hcm["subFilter"] = {"name": "envoy.filters.http.router"}
        operation = "INSERT_BEFORE"
    return [
        {
            "applyTo": "HTTP_FILTER",
            "match": {"context": context, "listener": {"filterChain": {"filter": hcm}}},
            "patch": {"operation": operation, "value": value},
        }
        for value in filters
    ]
