"""The Envoy side of the contract: the ext_proc filter settings the server relies on.

One source for the docs, the demo, the tests and the rendered manifests
(`extproc.render` parses these dicts into typed envoy-data-plane objects): a setting
changed here changes everywhere. Plain dicts in Envoy's JSON/YAML shape, so this module
needs neither protobuf nor envoy-data-plane, and the server can import it cheaply.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from extproc.annotate import ACTIONS_HEADER, DIAGNOSIS_HEADER, HINT_HEADER
from extproc.headers import REVEAL_HEADER

# The dynamic metadata namespace the server writes the diagnosis into. Access logs read
# it as %DYNAMIC_METADATA(extproc_doctor:reason)%.
METADATA_NAMESPACE = "extproc_doctor"

# Sent with the request headers. The listener direction tells an outbound sidecar
# listener (2) from an inbound one (1) and from a gateway or plain Envoy (0 or absent).
REQUEST_ATTRIBUTES: tuple[str, ...] = ("xds.listener_direction",)

# Sent with the response headers: Envoy's own account of how the request ended.
RESPONSE_ATTRIBUTES: tuple[str, ...] = (
    "response.code",
    "response.flags",
    "response.code_details",
    "upstream.transport_failure_reason",
    "upstream.address",
    "xds.cluster_name",
    "xds.route_name",
    "xds.cluster_metadata",
    # The Host the request was routed with, and where the listener sits. The server
    # reads them with the request headers when it saw them; a response-only call (gated
    # mode) did not.
    "request.host",
    "xds.listener_direction",
    # The caller's mesh identity on an mTLS connection (a SPIFFE ID; Envoy 1.40 sends
    # nothing on plaintext): at an inbound sidecar `response_annotations: auto` shows the
    # annotations only to a mesh peer (tests/envoy/test_trust_e2e.py).
    "connection.uri_san_peer_certificate",
    # Set only on a TLS upstream connection (`TLSv1.3`): a closed connection on a TLS
    # cluster is no plaintext/STRICT mismatch, known without --envoy-admin.
    "upstream.tls_version",
)

# Sent with the response headers to a filter that sees no request phase and runs only on
# a failing response (gated mode's diagnose filter): the failing request's method, path,
# id and trace id, for the live page's samples (`failures.attribute_fields`), so only
# failures pay. A filter that sees every response does not ask: the request phase has
# them. Envoy 1.40 evaluates each as a CEL expression and leaves an absent header out
# (tests/page/test_samples_e2e.py). Over gRPC the attributes are a protobuf Struct, whose
# strings must be UTF-8, and Envoy 1.40 puts a header's bytes in as they are: the gRPC
# door reads such a message with U+FFFD for each bad byte (`extproc.wire`) instead of
# failing it; over HTTP Envoy's JSON has replaced such bytes already.
# (attribute, the request header it reads)
SAMPLE_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("request.method", ":method"),
    ("request.path", ":path"),  # with its query: the server cuts it, as the header's
    ("request.id", "x-request-id"),
    ("request.headers['traceparent']", "traceparent"),
    ("request.headers['x-b3-traceid']", "x-b3-traceid"),
)

# Envoy waits this long for each answer before it applies failure_mode_allow. The
# default (200 ms) is tight for a Python server on a busy node; a late answer on the
# failure path only costs an annotation, never the request, because the filter fails open.
MESSAGE_TIMEOUT = "0.5s"


# The doctor's own HTTP filter names. Not ext_proc's extension name: whatever configures
# `envoy.filters.http.ext_proc` per route by that name (Istio's InferencePool support does)
# must not configure ours (Envoy looks per-route config up by the configured name). The
# attributes still arrive under the extension's name, a constant in Envoy (`FilterName`,
# the key `Filter::addAttributes` writes, source/extensions/filters/http/ext_proc/
# ext_proc.cc at envoyproxy/envoy 0026fb37), not the configured one: checked on Envoy
# 1.40 in tests/deploy/test_doors_e2e.py, so both adapters keep reading core.ATTRIBUTES_KEY.
EXT_PROC_FILTER = "extproc-doctor.ext_proc"
# The HTTP lane's second, response-only filter in the same chain.
EXT_PROC_RESPONSE_FILTER = "extproc-doctor.ext_proc.response"

# Request and response headers Envoy keeps from the server (ext_proc `forward_rules`): the
# server has no rule that needs their values, so they do not travel to it. Envoy leaves
# them out of the message, name and value, and the request keeps them (checked on Envoy
# 1.40, both lanes, in tests/deploy/test_doors_e2e.py). Every name a hygiene rule reads still travels.
WITHHELD_HEADERS: tuple[str, ...] = ("authorization", "cookie", "proxy-authorization", "set-cookie")

# The ext_proc cluster's circuit breakers, all at the maximum, as Istio sets its own
# clusters' (getDefaultCircuitBreakerThresholds, pilot/pkg/networking/core/
# cluster_traffic_policy.go:477 at istio/istio 86c9f01f). Envoy's defaults (1024 requests,
# 1024 pending) would cap the streams at 1024: in always mode each in-flight request holds
# one, and beyond it the filter fails open without a sign. The server bounds itself
# (`--max-streams`, counted); ext_proc streams are never retried.
UNLIMITED = 4294967295
CIRCUIT_BREAKERS: dict[str, Any] = {
    "thresholds": [
        {
            "priority": "DEFAULT",
            "max_connections": UNLIMITED,
            "max_pending_requests": UNLIMITED,
            "max_requests": UNLIMITED,
            "max_retries": UNLIMITED,
        }
    ]
}

# `--extproc-mtls`: a directory inside the proxy with these files (a cert-manager
# Certificate's Secret: the issuing CA, the chain, the key), or MESH_IDENTITY: the Istio
# proxy's own workload certificate and mesh root, by SDS from istio-agent.
MTLS_CA, MTLS_CERT, MTLS_KEY = "ca.crt", "tls.crt", "tls.key"
MESH_IDENTITY = "istio"
# istio-agent's SDS cluster and resource names (pkg/model/authentication.go:27-34 at
# istio/istio 86c9f01f), as Istio's own clusters reference them.
ISTIO_SDS_CLUSTER = "sds-grpc"
ISTIO_CERT_SECRET, ISTIO_ROOT_SECRET = "default", "ROOTCA"

# gRPC metadata on every stream, set per rendered filter: where the filter sits (edge,
# outbound, inbound). The manifest knows this; `xds.listener_direction` cannot tell an
# Istio gateway (OUTBOUND) from a sidecar's outbound side.
DIRECTION_METADATA = "x-extproc-direction"

# The response headers only the doctor may write. Whatever an upstream sends under these
# names is removed before the client sees it (see `annotation_guard_filter`).
ANNOTATION_HEADERS: tuple[str, ...] = (DIAGNOSIS_HEADER, HINT_HEADER, ACTIONS_HEADER)

ANNOTATION_GUARD_FILTER = "extproc-doctor.annotation-guard"


# The diagnosis on Envoy's own span: HCM `tracing.custom_tags`, each reading one key of our
# metadata namespace. Kind `request` is the stream's dynamic metadata, where ext_proc's
# response phase writes the diagnosis before Envoy finishes the span (also when a composite
# filter created ext_proc for that response only: tests/deploy/test_traces_e2e.py). A tag
# whose key is absent is not set, so a clean, unchanged request's span carries none of them.
# What each tag carries is what the diagnosis already holds, bounded as there (annotate.MAX_VALUE);
# the Host and the path are not repeated: Envoy's span has them (`http.url`). The tags go to
# the tracing backend only: they are span tags, never headers. (tag, metadata key):
TRACE_TAGS: tuple[tuple[str, str], ...] = (
    ("extproc.reason", "reason"),  # the reason code: what an operator filters on first
    ("extproc.dr", "dr"),  # the DestinationRule behind the cluster: the object to edit
    ("extproc.detail", "detail"),  # the TLS or socket error that sets one case apart
    ("extproc.hint", "hint"),  # the one-line what to do, read in the span's view
    ("extproc.actions", "actions"),  # what the doctor changed on the request
)


def trace_custom_tags() -> list[dict[str, Any]]:
    """The HCM `tracing.custom_tags` that put the diagnosis on Envoy's span."""
    return [
        {
            "tag": tag,
            "metadata": {
                "kind": {"request": {}},
                "metadata_key": {"key": METADATA_NAMESPACE, "path": [{"key": key}]},
            },
        }
        for tag, key in TRACE_TAGS
    ]


# The HTTP lane (`http_service`): the path Envoy POSTs to (the server accepts any), and
# how long the cluster keeps an idle connection: shorter than the server's own idle limit
# (`http_lane.IDLE_SECONDS`), so Envoy closes first and never writes into a closing one.
HTTP_PATH = "/process"
HTTP_IDLE_TIMEOUT = "60s"
# The oldest Envoy whose response-phase `http_service` filter sends anything (design.md).
HTTP_MIN_ENVOY = (1, 37)
GRPC, HTTP = "grpc", "http"
TRANSPORTS = (GRPC, HTTP)


def ext_proc_filter(
    cluster_name: str,
    *,
    failure_mode_allow: bool = True,
    request_headers: bool = True,
    response_headers: bool = True,
    direction: str | None = None,
    transport: str = GRPC,
    forward_metadata: bool = False,
    only_failures: bool = False,
) -> dict[str, Any]:
    """The `envoy.filters.http.ext_proc` HTTP filter.

    With `request_headers=False` it sees only the response: the shape a filter takes
    when a response matcher creates it, after the request has gone upstream. `direction`
    (edge, outbound, inbound) travels to the server as gRPC metadata on each stream, or
    as a header of each POST over HTTP.

    Over HTTP (`transport="http"`) a filter must have one phase only: one with both
    loses the second answer (design.md), so `ext_proc_filters` renders two. The response
    phase reads what the request phase carried in our namespace (`forwarding_namespaces`).
    `forward_metadata` forwards it over gRPC too: gated mode's hygiene filter then sees a
    diagnosis the response filter wrote before it, and does not make a second one.
    `only_failures`: a response-only filter that a response matcher creates for failing
    responses alone; it also asks for the request's `SAMPLE_ATTRIBUTES`.
    """
    if only_failures and request_headers:
        raise ValueError("only a response-only filter runs on failing responses alone")
    if transport == HTTP and request_headers and response_headers:
        raise ValueError("an http_service ext_proc filter takes one header phase")
    service_key, service = _service(cluster_name, direction, transport)
    metadata_options: dict[str, Any] = {"receiving_namespaces": {"untyped": [METADATA_NAMESPACE]}}
    if response_headers and (transport == HTTP or forward_metadata):
        metadata_options["forwarding_namespaces"] = {"untyped": [METADATA_NAMESPACE]}
    only_response = transport == HTTP and not request_headers
    return {
        "name": EXT_PROC_RESPONSE_FILTER if only_response else EXT_PROC_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            service_key: service,
            "failure_mode_allow": failure_mode_allow,
            "message_timeout": MESSAGE_TIMEOUT,
            "processing_mode": {
                "request_header_mode": "SEND" if request_headers else "SKIP",
                "response_header_mode": "SEND" if response_headers else "SKIP",
                "request_body_mode": "NONE",
                "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
            "request_attributes": list(REQUEST_ATTRIBUTES) if request_headers else [],
            "response_attributes": [
                *(RESPONSE_ATTRIBUTES if response_headers else ()),
                *(a for a, _ in SAMPLE_ATTRIBUTES if only_failures),
            ],
            # The Host rewrite changes :authority, a routing header, and stripping echoed
            # x-envoy-* headers needs allow_envoy: without them Envoy ignores those
            # mutations silently.
            "mutation_rules": {"allow_all_routing": True, "allow_envoy": True},
            "metadata_options": metadata_options,
            "forward_rules": {
                "disallowed_headers": {"patterns": [{"exact": n} for n in WITHHELD_HEADERS]}
            },
        },
    }


def ext_proc_filters(
    cluster_name: str,
    *,
    failure_mode_allow: bool = True,
    direction: str | None = None,
    transport: str = GRPC,
    forward_metadata: bool = False,
) -> list[dict[str, Any]]:
    """The doctor's always-on filters: one over gRPC, two single-phase ones over HTTP."""
    if transport == GRPC:
        return [ext_proc_filter(cluster_name, failure_mode_allow=failure_mode_allow,
                                direction=direction, forward_metadata=forward_metadata)]  # fmt: skip
    return [
        ext_proc_filter(cluster_name, failure_mode_allow=failure_mode_allow,
                        response_headers=False, direction=direction, transport=HTTP),
        ext_proc_filter(cluster_name, failure_mode_allow=failure_mode_allow,
                        request_headers=False, direction=direction, transport=HTTP),
    ]  # fmt: skip


def _service(
    cluster_name: str, direction: str | None, transport: str
) -> tuple[str, dict[str, Any]]:
    """The filter's `grpc_service`, or its `http_service` (ext_proc's JSON protocol)."""
    if transport == GRPC:
        grpc_service: dict[str, Any] = {"envoy_grpc": {"cluster_name": cluster_name}}
        if direction is not None:
            grpc_service["initial_metadata"] = [{"key": DIRECTION_METADATA, "value": direction}]
        return "grpc_service", grpc_service
    if transport != HTTP:
        raise ValueError(f"unknown transport {transport!r}: {' or '.join(TRANSPORTS)}")
    http_service: dict[str, Any] = {
        "http_uri": {
            "uri": f"http://{cluster_name}{HTTP_PATH}",
            "cluster": cluster_name,
            "timeout": MESSAGE_TIMEOUT,
        }
    }
    if direction is not None:
        http_service["request_headers_to_add"] = [
            {"header": {"key": DIRECTION_METADATA, "value": direction}}
        ]
    return "http_service", {"http_service": http_service}


def annotation_guard_filter(request_removals: Sequence[str] = (REVEAL_HEADER,)) -> dict[str, Any]:
    """An `envoy.filters.http.header_mutation` filter: Envoy's own hand on fixed names.

    Put it right after the doctor's filter(s). On the response path filters run in
    reverse, so it removes what the upstream sent under `ANNOTATION_HEADERS` before ext_proc
    writes its own, including on responses the server never sees (gated mode, or the
    server down and the filter failing open). On the request path it runs after ext_proc,
    so the server still sees `request_removals` (the reveal token, and the fixed names the
    policy strips where the filter sits: `headers.native_removals`) before Envoy removes
    them, also when the server is down or gated out. Checked with Envoy 1.40 in
    tests/envoy/test_trust_e2e.py. Where the manifest owns the route configuration and the
    mesh's Envoy lacks this filter (cilium-envoy), the route's `response_headers_to_remove`
    and `request_headers_to_remove` do the same: the router applies them after every filter.
    """
    mutations: dict[str, Any] = {
        "response_mutations": [{"remove": name} for name in ANNOTATION_HEADERS]
    }
    if request_removals:
        mutations["request_mutations"] = [{"remove": name} for name in request_removals]
    return {
        "name": ANNOTATION_GUARD_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": mutations,
        },
    }


def _protocol(transport: str = GRPC) -> dict[str, Any]:
    """Cluster protocol options: gRPC needs HTTP/2 to the server; the HTTP lane speaks
    HTTP/1.1 and Envoy closes idle connections before the server would."""
    if transport == GRPC:
        options: dict[str, Any] = {"explicit_http_config": {"http2_protocol_options": {}}}
    else:
        options = {
            "explicit_http_config": {"http_protocol_options": {}},
            "common_http_protocol_options": {"idle_timeout": HTTP_IDLE_TIMEOUT},
        }
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            **options,
        }
    }


def ext_proc_cluster(
    name: str,
    host: str,
    port: int,
    *,
    tls_ca: str | None = None,
    mtls: str | None = None,
    transport: str = GRPC,
) -> dict[str, Any]:
    """A cluster for the ext_proc server: HTTP/2 for gRPC, HTTP/1.1 for the HTTP lane.

    An IP address is STATIC; a name is STRICT_DNS, so a headless Service's name resolves
    to every ready pod and Envoy spreads streams over them (one ClusterIP would pin a
    long-lived HTTP/2 connection to whichever pod kube-proxy picked). With `tls_ca`, the
    connection is TLS to `host` as SNI, verified against that CA file; with `mtls` Envoy
    also presents a client certificate (`upstream_tls`).
    """
    cluster: dict[str, Any] = {
        "name": name,
        "type": discovery_type(host),
        "connect_timeout": "1s",
        "circuit_breakers": CIRCUIT_BREAKERS,
        "typed_extension_protocol_options": _protocol(transport),
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                    ]
                }
            ],
        },
    }
    if tls_ca is not None or mtls is not None:
        cluster["transport_socket"] = upstream_tls(host, transport, ca_file=tls_ca, mtls=mtls)
    return cluster


def ext_proc_pipe_cluster(
    name: str, paths: Sequence[str], *, transport: str = GRPC
) -> dict[str, Any]:
    """A cluster for a server co-located with Envoy on Unix sockets (`serve --listen unix:PATH`).

    With `--workers N` the server listens on PATH.0 .. PATH.N-1: list them all.
    """
    endpoints = [{"endpoint": {"address": {"pipe": {"path": path}}}} for path in paths]
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "circuit_breakers": CIRCUIT_BREAKERS,
        "typed_extension_protocol_options": _protocol(transport),
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
    }


def upstream_tls(
    sni: str, transport: str = GRPC, *, ca_file: str | None = None, mtls: str | None = None
) -> dict[str, Any]:
    """The TLS transport socket to the server, verified as `sni` (a DNS SAN).

    `ca_file` alone: the server is verified, Envoy presents nothing. `mtls` a directory:
    the CA, the client chain and key from its `ca.crt`, `tls.crt`, `tls.key`. `mtls`
    MESH_IDENTITY: Istio's workload certificate and mesh root by SDS, as Istio's own
    clusters have them, so nothing is mounted into the proxy.
    """
    san = {"match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": sni}}]}
    context: dict[str, Any] = {
        # gRPC over TLS negotiates h2 by ALPN; a server that insists on it would
        # otherwise reset the handshake.
        "alpn_protocols": ["h2"] if transport == GRPC else ["http/1.1"],
    }
    if mtls == MESH_IDENTITY:
        context["tls_certificate_sds_secret_configs"] = [_istio_sds(ISTIO_CERT_SECRET)]
        context["combined_validation_context"] = {
            "default_validation_context": san,
            "validation_context_sds_secret_config": _istio_sds(ISTIO_ROOT_SECRET),
        }
    elif mtls is not None:
        directory = mtls.rstrip("/")
        context["tls_certificates"] = [
            {
                "certificate_chain": {"filename": f"{directory}/{MTLS_CERT}"},
                "private_key": {"filename": f"{directory}/{MTLS_KEY}"},
            }
        ]
        context["validation_context"] = {
            "trusted_ca": {"filename": f"{directory}/{MTLS_CA}"},
            **san,
        }
    elif ca_file is not None:
        context["validation_context"] = {"trusted_ca": {"filename": ca_file}, **san}
    else:
        raise ValueError("upstream_tls needs a CA file or an mTLS source")
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": sni,
            "common_tls_context": context,
        },
    }


def _istio_sds(secret: str) -> dict[str, Any]:
    """An SDS secret from istio-agent, configured as Istio configures its own clusters'."""
    return {
        "name": secret,
        "sds_config": {
            "api_config_source": {
                "api_type": "GRPC",
                "grpc_services": [{"envoy_grpc": {"cluster_name": ISTIO_SDS_CLUSTER}}],
                "set_node_on_first_message_only": True,
                "transport_api_version": "V3",
            },
            "resource_api_version": "V3",
            "initial_fetch_timeout": "0s",
        },
    }


def discovery_type(host: str) -> str:
    """STATIC for an IP address, STRICT_DNS (every address the name resolves to) otherwise."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "STRICT_DNS"
    return "STATIC"
