"""The `istio` target: one mesh-wide EnvoyFilter.

It adds the ext_proc server's cluster to every proxy and inserts the doctor's filter
before `envoy.filters.http.router` in the HTTP connection manager of sidecar outbound,
sidecar inbound and gateway listeners. In gated mode each context gets the request
matchers of its own direction: an inbound request legitimately carries Istio's
`x-envoy-peer-metadata`, an outbound one must not.
"""

from __future__ import annotations

from typing import Any

from extproc.config import Direction
from extproc.render.envoy_config import doctor_filters, extproc_cluster
from extproc.render.gate import request_gate
from extproc.render.options import NAME, RenderOptions

# An EnvoyFilter in the root namespace applies to every proxy in the mesh.
ROOT_NAMESPACE = "istio-system"

CONTEXTS: tuple[tuple[str, Direction], ...] = (
    ("SIDECAR_OUTBOUND", Direction.OUTBOUND),
    ("SIDECAR_INBOUND", Direction.INBOUND),
    ("GATEWAY", Direction.EDGE),
)


def render_envoy_filter(options: RenderOptions) -> dict[str, Any]:
    """The EnvoyFilter resource."""
    host, port = options.extproc_target(in_cluster=True)
    cluster_patch = {
        "applyTo": "CLUSTER",
        "match": {"context": "ANY"},
        "patch": {
            "operation": "ADD",
            "value": extproc_cluster(NAME, host, port, options.extproc_tls_ca),
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
    options: RenderOptions, context: str, direction: Direction
) -> list[dict[str, Any]]:
    """One INSERT_BEFORE the router per filter; Istio keeps their order."""
    gate = request_gate(options.policy, direction)
    return [
        {
            "applyTo": "HTTP_FILTER",
            "match": {
                "context": context,
                "listener": {
                    "filterChain": {
                        "filter": {
                            "name": "envoy.filters.network.http_connection_manager",
                            "subFilter": {"name": "envoy.filters.http.router"},
                        }
                    }
                },
            },
            "patch": {"operation": "INSERT_BEFORE", "value": value},
        }
        for value in doctor_filters(options.mode, NAME, gate)
    ]
