"""The Envoy parts of every manifest, checked as typed envoy-data-plane messages.

Strategy: the filter and cluster settings live once, as dicts in Envoy's JSON shape, in
`extproc.filter_config` (the server, the lab and the docs read them there). Each
builder here adds what a deployment needs around them and passes the result through
`typed`, which parses it into the envoy-data-plane message it must be and writes it back
with Envoy's field names. A misspelt field, a wrong type or an `@type` Envoy does not know
fails at render time, not when a mesh pushes the config to every proxy. This module
imports envoy-data-plane (slow, pydantic); the server's start-up path never imports it.
"""

from __future__ import annotations

from typing import Any, TypeVar

import betterproto2

# Imported for their `@type` registrations: a typed_config resolves only through them.
import envoy_data_plane.envoy.config.trace.v3
import envoy_data_plane.envoy.extensions.access_loggers.stream.v3
import envoy_data_plane.envoy.extensions.common.matching.v3
import envoy_data_plane.envoy.extensions.filters.http.composite.v3
import envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3
import envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3
import envoy_data_plane.envoy.extensions.filters.http.router.v3
import envoy_data_plane.envoy.extensions.transport_sockets.tls.v3
import envoy_data_plane.envoy.extensions.upstreams.http.v3
import envoy_data_plane.envoy.type.matcher.v3  # noqa: F401
from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpFilter,
)

from extproc.config import Direction, Policy
from extproc.filter_config import (
    ANNOTATION_HEADERS,
    GRPC,
    annotation_guard_filter,
    ext_proc_cluster,
    ext_proc_filter,
    ext_proc_filters,
)
from extproc.headers import native_removals
from extproc.render.gate import (
    RESPONSE_CONDITIONS,
    Condition,
    HeaderTest,
    Phase,
    RequestGate,
)
from extproc.render.options import RenderError, RenderMode, RenderOptions

__all__ = [
    "Bootstrap",
    "Cluster",
    "HttpConnectionManager",
    "Listener",
    "RouteConfiguration",
    "annotation_guard",
    "doctor_filters",
    "extproc_cluster",
    "http_connection_manager",
    "router_filter",
    "typed",
    "without_annotations",
]

M = TypeVar("M", bound=betterproto2.Message)

HYGIENE_FILTER = "extproc-doctor.hygiene"
DIAGNOSE_FILTER = "extproc-doctor.diagnose"
_TYPE = "type.googleapis.com/"
_INPUTS = {
    Phase.REQUEST: f"{_TYPE}envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
    Phase.RESPONSE: f"{_TYPE}envoy.type.matcher.v3.HttpResponseHeaderMatchInput",
}


def typed(kind: type[M], value: dict[str, Any]) -> dict[str, Any]:
    """`value` checked as a `kind` message and written back with Envoy's field names."""
    try:
        message = kind.from_dict(value)
    except (KeyError, TypeError, ValueError) as exc:
        raise RenderError(f"not a valid Envoy {kind.__name__}: {exc}") from None
    return message.to_dict(casing=betterproto2.Casing.SNAKE)


def extproc_cluster(name: str, host: str, port: int, options: RenderOptions) -> dict[str, Any]:
    """The ext_proc server's cluster, typed: HTTP/2 for gRPC, HTTP/1.1 for http; TLS or
    mTLS as `options` ask."""
    cluster = ext_proc_cluster(
        name, host, port, tls_ca=options.extproc_tls_ca, mtls=options.extproc_mtls,
        transport=options.transport,
    )  # fmt: skip
    return typed(Cluster, cluster)


def router_filter() -> dict[str, Any]:
    return typed(
        HttpFilter,
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": f"{_TYPE}envoy.extensions.filters.http.router.v3.Router"},
        },
    )


def doctor_filters(
    mode: RenderMode,
    cluster: str,
    gate: RequestGate,
    direction: Direction,
    transport: str = GRPC,
) -> list[dict[str, Any]]:
    """The HTTP filters to put before the router: ext_proc itself, or ext_proc behind matchers.

    Each ext_proc filter tells the server where it sits (`direction`) in its stream's gRPC
    metadata (a header of each POST over HTTP): the listener's `traffic_direction` cannot
    tell an Istio gateway from a sidecar. Over HTTP each ext_proc filter has one phase
    (`filter_config.ext_proc_filters`).
    """
    if direction is Direction.AUTO:
        raise RenderError("a rendered filter must say where it sits: edge, outbound or inbound")
    if mode is RenderMode.ALWAYS or gate.every_request:
        filters = ext_proc_filters(cluster, direction=direction, transport=transport)
        return [typed(HttpFilter, f) for f in filters]
    gated = []
    if gate.conditions:
        # At request time, a request that needs hygiene gets the full filter (over HTTP
        # both single-phase filters), so its response is diagnosed and carries
        # x-extproc-actions too. On the response path the diagnose filter below runs
        # first; this one reads its diagnosis from our namespace and adds no second one.
        hygiene = ext_proc_filters(
            cluster, direction=direction, transport=transport, forward_metadata=True
        )
        gated.append(gated_filter(HYGIENE_FILTER, gate.conditions, hygiene))
    # A separate filter, because a matcher tree is evaluated again at response time, when
    # the request headers include what later filters added (the router's
    # x-envoy-expected-rq-timeout-ms): request tests would then match every request.
    responses = tuple(condition for _, condition in RESPONSE_CONDITIONS)
    diagnose = ext_proc_filter(
        cluster, request_headers=False, direction=direction, transport=transport,
        only_failures=True,
    )  # fmt: skip
    gated.append(gated_filter(DIAGNOSE_FILTER, responses, [diagnose]))
    return [typed(HttpFilter, f) for f in gated]


def annotation_guard(policy: Policy, direction: Direction) -> dict[str, Any]:
    """The filter right after the doctor's: it removes upstream-sent `x-extproc-*`
    annotations, and from requests the names Envoy removes itself at `direction`."""
    return typed(HttpFilter, annotation_guard_filter(native_removals(policy, direction)))


def without_annotations(
    route_config: dict[str, Any], policy: Policy, direction: Direction
) -> dict[str, Any]:
    """`route_config` with the router removing upstream-sent annotations from every
    response, and the names Envoy removes itself at `direction` from every request.

    For an Envoy without `envoy.filters.http.header_mutation` (cilium-envoy): the router
    applies `response_headers_to_remove` to the upstream's headers, before any filter, and
    `request_headers_to_remove` to the request it sends, after every filter.
    """
    return {
        **route_config,
        "response_headers_to_remove": list(ANNOTATION_HEADERS),
        "request_headers_to_remove": list(native_removals(policy, direction)),
    }


def gated_filter(
    name: str, conditions: tuple[Condition, ...], ext_proc: list[dict[str, Any]]
) -> dict[str, Any]:
    """A composite filter that creates the `ext_proc` filter(s) only when one of `conditions` holds."""
    return {
        "name": name,
        "typed_config": {
            "@type": f"{_TYPE}envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "extension_config": {
                "name": "composite",
                "typed_config": {
                    "@type": f"{_TYPE}envoy.extensions.filters.http.composite.v3.Composite"
                },
            },
            "xds_matcher": {"matcher_list": {"matchers": [_field_matcher(conditions, ext_proc)]}},
        },
    }


def _field_matcher(
    conditions: tuple[Condition, ...], filters: list[dict[str, Any]]
) -> dict[str, Any]:
    """One filter runs as the action's `typed_config`; two (the HTTP lane's phases) as its
    `filter_chain`, which Envoy has had since before 1.37, the HTTP lane's minimum."""
    execute: dict[str, Any] = {
        "@type": f"{_TYPE}envoy.extensions.filters.http.composite.v3.ExecuteFilterAction"
    }
    if len(filters) == 1:
        execute["typed_config"] = filters[0]
    else:
        execute["filter_chain"] = {"typed_config": filters}
    return {
        "predicate": _any_of(conditions),
        "on_match": {"action": {"name": "ext-proc", "typed_config": execute}},
    }


def _any_of(conditions: tuple[Condition, ...]) -> dict[str, Any]:
    if len(conditions) == 1:
        return _all_of(conditions[0])
    return {"or_matcher": {"predicate": [_all_of(c) for c in conditions]}}


def _all_of(condition: Condition) -> dict[str, Any]:
    if len(condition) == 1:
        return _predicate(condition[0])
    return {"and_matcher": {"predicate": [_predicate(test) for test in condition]}}


def _predicate(test: HeaderTest) -> dict[str, Any]:
    single = {
        "single_predicate": {
            "input": {
                "name": f"{test.phase}-{test.header.lstrip(':')}",
                "typed_config": {"@type": _INPUTS[test.phase], "header_name": test.header},
            },
            "value_match": (
                {"exact": test.value}
                if test.exact
                else {"safe_regex": {"google_re2": {}, "regex": test.value}}
            ),
        }
    }
    return {"not_matcher": single} if test.absent else single


def http_connection_manager(
    stat_prefix: str, filters: list[dict[str, Any]], **settings: Any
) -> dict[str, Any]:
    """An HTTP connection manager (as a network filter) with `filters` and the router last."""
    manager = {
        "@type": f"{_TYPE}envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "http_filters": [*filters, router_filter()],
        **settings,
    }
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
