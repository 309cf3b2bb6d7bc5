"""The `envoy` target: a standalone Envoy bootstrap in front of one upstream.

One listener, one route to the upstream, the doctor's filter before the router, the
ext_proc server's cluster, and an access log on stdout that carries the diagnosis from
dynamic metadata. It is the smallest complete deployment, and the one the end-to-end
test runs. The filter says where it sits (`--direction`, edge by default: a plain Envoy
is usually the front door). Upstream-sent `x-extproc-*` annotations, and the request
headers Envoy removes itself (`headers.native_removals`: the reveal token, and what the
policy strips by a fixed name here), are removed twice: by the guard filter after the
doctor's (for users who copy the filter list into their own Envoy) and by the route
configuration (for users who copy the route).

Tracing, when the user names a collector (`--tracing-zipkin` or `--tracing-otlp`): the
HCM gets that tracer (Envoy's default sampling: every request) and the diagnosis as span
tags (`filter_config.TRACE_TAGS`). Zipkin is JSON v2 over HTTP to `/api/v2/spans` (Zipkin,
and the Zipkin receivers of Jaeger and Tempo, take it there), with a span id of its own for the
server side, as Istio configures its Zipkin tracer (istio/istio pilot/pkg/networking/
core/tracing.go:263-267 at 86c9f01f; its 128-bit trace ids are left at Envoy's default,
64 bits: envoy-data-plane cannot spell `trace_id_128bit`); OpenTelemetry is
OTLP/gRPC. Without a collector there is no tracing block: a tracer with nowhere to send
is only cost.
"""

from __future__ import annotations

from typing import Any

from extproc.filter_config import METADATA_NAMESPACE, discovery_type, trace_custom_tags
from extproc.render.envoy_config import (
    Bootstrap,
    annotation_guard,
    doctor_filters,
    extproc_cluster,
    http_connection_manager,
    typed,
    without_annotations,
)
from extproc.render.gate import request_gate
from extproc.render.options import NAME, OTLP, ZIPKIN, RenderOptions, host_port

LISTENER = "ingress"
UPSTREAM_CLUSTER = "upstream"
ADMIN_PORT = 9901
TRACE_COLLECTOR = f"{NAME}-trace-collector"
ZIPKIN_PATH = "/api/v2/spans"
_TRACE = "type.googleapis.com/envoy.config.trace.v3"

ACCESS_LOG_FORMAT = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "authority": "%REQ(:AUTHORITY)%",
    "path": "%REQ(:PATH)%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "extproc_doctor": f"%DYNAMIC_METADATA({METADATA_NAMESPACE})%",
}


def render_bootstrap(options: RenderOptions) -> dict[str, Any]:
    """The whole bootstrap, typed."""
    host, port = options.extproc_target(in_cluster=False)
    gate = request_gate(options.policy, options.direction)
    filters = [
        *doctor_filters(options.mode, NAME, gate, options.direction, options.transport),
        annotation_guard(options.policy, options.direction),
    ]
    clusters = [
        _upstream_cluster(*host_port(options.upstream, "--upstream")),
        extproc_cluster(NAME, host, port, options),
    ]
    if options.tracer is not None:
        clusters.append(_collector_cluster(*options.tracer))
    bootstrap = {
        "admin": {"address": _address("127.0.0.1", ADMIN_PORT)},
        "static_resources": {"listeners": [_listener(options, filters)], "clusters": clusters},
    }
    return typed(Bootstrap, bootstrap)


def hcm_tracing(options: RenderOptions) -> dict[str, Any] | None:
    """The HCM's `tracing`: the named collector's tracer and the diagnosis as tags; None
    when no collector is named."""
    if options.tracer is None:
        return None
    kind, _ = options.tracer
    provider = _zipkin() if kind == ZIPKIN else _opentelemetry()
    tracing: dict[str, Any] = {"provider": provider}
    if options.trace_tags:
        tracing["custom_tags"] = trace_custom_tags()
    return tracing


def _zipkin() -> dict[str, Any]:
    return {
        "name": "envoy.tracers.zipkin",
        "typed_config": {
            "@type": f"{_TRACE}.ZipkinConfig",
            "collector_cluster": TRACE_COLLECTOR,
            "collector_endpoint": ZIPKIN_PATH,
            "collector_endpoint_version": "HTTP_JSON",
            "shared_span_context": False,
        },
    }


def _opentelemetry() -> dict[str, Any]:
    return {
        "name": "envoy.tracers.opentelemetry",
        "typed_config": {
            "@type": f"{_TRACE}.OpenTelemetryConfig",
            "grpc_service": {"envoy_grpc": {"cluster_name": TRACE_COLLECTOR}, "timeout": "1s"},
        },
    }


def _collector_cluster(kind: str, collector: str) -> dict[str, Any]:
    """The collector's cluster: HTTP/1.1 for Zipkin, HTTP/2 for OTLP/gRPC."""
    host, port = host_port(collector, f"--tracing-{kind}")
    cluster = _upstream_cluster(host, port, TRACE_COLLECTOR)
    if kind == OTLP:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def _listener(options: RenderOptions, filters: list[dict[str, Any]]) -> dict[str, Any]:
    route = without_annotations(
        {
            "name": "local",
            "virtual_hosts": [
                {
                    "name": "upstream",
                    "domains": ["*"],
                    "routes": [
                        {
                            "name": UPSTREAM_CLUSTER,
                            "match": {"prefix": "/"},
                            "route": {"cluster": UPSTREAM_CLUSTER},
                        }
                    ],
                }
            ],
        },
        options.policy,
        options.direction,
    )
    access_log = {
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {"json_format": ACCESS_LOG_FORMAT},
        },
    }
    tracing = hcm_tracing(options)
    manager = http_connection_manager(
        LISTENER, filters, route_config=route, access_log=[access_log],
        **({"tracing": tracing} if tracing is not None else {}),
    )  # fmt: skip
    return {
        "name": LISTENER,
        "address": _address(*host_port(options.envoy_listen, "--envoy-listen")),
        "filter_chains": [{"filters": [manager]}],
    }


def _upstream_cluster(host: str, port: int, name: str = UPSTREAM_CLUSTER) -> dict[str, Any]:
    return {
        "name": name,
        "type": discovery_type(host),
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(host, port)}}]}],
        },
    }


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}
