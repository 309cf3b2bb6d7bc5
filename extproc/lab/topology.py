"""The lab as a description: a client sidecar, server sidecars and apps, in Envoy configs out.

A `Topology` says what the mesh looks like, in the terms an operator uses: workloads
behind server sidecars in STRICT or PERMISSIVE mode, the client sidecar's clusters (with
Istio's names, DestinationRule metadata and TLS settings: client certificate, SNI, ALPN,
expected SAN) and the routes that pick them. `Lab` turns it into certificates from a
generated mesh CA and two Envoy bootstraps, and runs everything for a `with` block:

```
client --HTTP--> client sidecar Envoy (ext_proc filter, JSON access log)
                   | clusters: plaintext, or TLS with a client certificate, SNI, ALPN
                   v
                 server-side Envoy: one inbound listener per workload's sidecar
                   STRICT      tls_inspector; one chain: transport_protocol "tls" +
                               Istio's ALPN tokens, require_client_certificate
                   PERMISSIVE  the same chain, plus a plaintext ("raw_buffer") chain
                   TLS         a TLS front door choosing its chain by SNI (server_names)
                   | plaintext
                   v
                 apps: an echo app, a failing app (Python, in threads)
```

Some apps are reached without a sidecar, each failing as a real server does (a gRPC app
answering UNAVAILABLE, a TLS app closing kept-alive connections, a CDN-like front door
refusing a ClientHello without SNI). Routes can carry what an Istio VirtualService or an
EnvoyFilter adds: a retry policy, and the HTTP filters that answer for the upstream
(CORS, local rate limit, ext_authz, fault injection). Those filters come after the
ext_proc filter in the client sidecar's chain, so the doctor sees their answers, as in
Istio's outbound chain.

All server sidecars share one Envoy process: a listener per workload behaves like a pod's
inbound listener, and one process starts in a tenth of a second. The builder functions
(`cluster()`, `route()`, `upstream_tls()` ...) return Envoy's JSON shape, so each
bootstrap reads like the description it came from.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from extproc.filter_config import (
    GRPC,
    annotation_guard_filter,
    ext_proc_cluster,
    ext_proc_filters,
)
from extproc.lab.certs import CertFiles, CertificateAuthority
from extproc.lab.envoy import EnvoyProcess, free_ports, wait_for_port
from extproc.lab.upstreams import (
    GrpcUnavailableUpstream,
    HttpUpstream,
    echo_upstream,
    keepalive_close_upstream,
    sni_required_upstream,
    status_upstream,
)

LOOPBACK = "127.0.0.1"
CLIENT_LISTENER = "client_sidecar"
EXTPROC_CLUSTER = "extproc"
TRUST_DOMAIN = "cluster.local"
# Istio's passthrough cluster: an original-destination cluster. Without iptables in the
# lab, the "original destination" comes from a header the catch-all route adds.
PASSTHROUGH_CLUSTER = "PassthroughCluster"
ORIGINAL_DST_HEADER = "x-lab-original-dst"
# What Istio's inbound mTLS chain matches (`filter_chain_match.application_protocols`),
# and what its client sidecar offers on an HTTP/1.1 cluster (the istio.alpn filter).
ISTIO_ALPN: tuple[str, ...] = (
    "istio",
    "istio-peer-exchange",
    "istio-http/1.0",
    "istio-http/1.1",
    "istio-h2",
)
ISTIO_HTTP11_ALPN: tuple[str, ...] = ("istio-http/1.1",)
# A name where nothing listens: clusters aimed at it are refused.
NOWHERE = "nowhere"

# The client sidecar's JSON access log, keyed like Istio's JSON encoding so that
# `extproc.accesslog` reads it, plus what the doctor emitted: its response header and
# its whole dynamic metadata namespace.
ACCESS_LOG_FORMAT: dict[str, str] = {
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(:PATH)%",
    "authority": "%REQ(:AUTHORITY)%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "upstream_transport_failure_reason": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    "route_name": "%ROUTE_NAME%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_service_time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "grpc_status": "%GRPC_STATUS_NUMBER%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "extproc_diagnosis": "%RESP(X-EXTPROC-DIAGNOSIS)%",
    "extproc_doctor": "%DYNAMIC_METADATA(extproc_doctor)%",
}


def spiffe_id(service_account: str, namespace: str = "default") -> str:
    """The SPIFFE ID Istio gives a workload in the `cluster.local` trust domain."""
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


def outbound(service: str, port: int = 8080, subset: str = "", namespace: str = "default") -> str:
    """Istio's name for an outbound cluster: `outbound|8080|v2|app.default.svc.cluster.local`."""
    return f"outbound|{port}|{subset}|{service}.{namespace}.svc.cluster.local"


# --- The description -------------------------------------------------------------------


class Mode(StrEnum):
    """How a server sidecar's inbound listener takes connections."""

    STRICT = "STRICT"  # mTLS only (PeerAuthentication STRICT)
    PERMISSIVE = "PERMISSIVE"  # mTLS or plaintext
    TLS = "TLS"  # server-side TLS without client certificates: a front door


class Cert(StrEnum):
    """Which certificate a sidecar holds."""

    MESH = "mesh"  # valid, from the mesh CA
    EXPIRED = "expired"  # from the mesh CA, expired yesterday
    OTHER_CA = "other-ca"  # valid, from an unrelated root


class App(StrEnum):
    """The application behind a server sidecar (or reached directly)."""

    ECHO = "echo"  # answers 200 with the request it got
    FAILING = "failing"  # answers 503 on its own
    GRPC_UNAVAILABLE = "grpc-unavailable"  # h2c gRPC: every call ends UNAVAILABLE (14)
    # TLS with a client certificate: answers once per connection, then closes it
    # unanswered when the next request arrives (the keep-alive race).
    KEEPALIVE_CLOSE = "keepalive-close"
    # The same, plaintext: an app behind its sidecar's inbound cluster, or without a sidecar.
    KEEPALIVE_CLOSE_PLAIN = "keepalive-close-plain"
    SNI_REQUIRED = "sni-required"  # TLS: a handshake_failure alert to a hello without SNI
    AUTHZ_DENY = "authz-deny"  # an HTTP ext_authz service that answers 403 to every check


class RouteFilter(StrEnum):
    """An HTTP filter that answers in the upstream's place on the routes that enable it."""

    CORS = "cors"  # a CORS policy allowing CORS_ORIGIN: the filter answers preflights
    RATE_LIMIT = "rate_limit"  # a local rate limit of one request per hour
    EXT_AUTHZ = "ext_authz"  # external authorization by App.AUTHZ_DENY
    FAULT_ABORT = "fault_abort"  # fault injection: abort every request with 503
    RBAC_DENY = "rbac_deny"  # RBAC: Istio's AuthorizationPolicy `default/deny-all` denies all


@dataclass(frozen=True, slots=True)
class Workload:
    """A server-side pod: its sidecar's inbound listener and the app behind it."""

    name: str
    mode: Mode = Mode.STRICT
    app: App = App.ECHO
    # The service account in the SPIFFE ID of its certificate; default: `name`.
    service_account: str = ""
    cert: Cert = Cert.MESH
    # The ALPN protocols its TLS chain matches.
    alpn: tuple[str, ...] = ISTIO_ALPN
    # With names, the TLS chain matches only these SNI names, and there is no default chain.
    server_names: tuple[str, ...] = ()

    @property
    def identity(self) -> str:
        return spiffe_id(self.service_account or self.name)


@dataclass(frozen=True, slots=True)
class Tls:
    """TLS origination on a client-side cluster (Istio: `ISTIO_MUTUAL` or `SIMPLE`)."""

    cert: Cert | None = Cert.MESH  # the client certificate; None presents none
    sni: str = ""  # "" sends no SNI
    alpn: tuple[str, ...] = ISTIO_HTTP11_ALPN
    # The URI SAN the peer must present; "" checks only the chain.
    expect_san: str = ""


@dataclass(frozen=True, slots=True)
class Destination:
    """A cluster of the client sidecar: one endpoint, a workload, an app, or NOWHERE."""

    cluster: str
    target: str
    tls: Tls | None = None
    # The DestinationRule Istio names in the cluster's metadata (`istio.config`).
    destination_rule: str = ""
    # Speak HTTP/2 to the endpoint (a gRPC app; Istio: port name grpc/http2).
    http2: bool = False
    # The cluster's retry circuit breaker (DestinationRule connectionPool maxRetries).
    max_retries: int | None = None
    # The load assignment drops every request (EDS `drop_overloads` at 100%).
    drop_all: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    """A route of the client sidecar: Host (and path prefix, header) to a cluster."""

    host: str
    cluster: str
    name: str = ""  # default: the Host
    prefix: str = "/"
    # Only requests with this header value take the route (a VirtualService match).
    header: tuple[str, str] | None = None
    # Envoy's retry_on conditions (`5xx`, `unavailable`); "" retries nothing.
    retry_on: str = ""
    filters: tuple[RouteFilter, ...] = ()


@dataclass(frozen=True, slots=True)
class Topology:
    """A whole lab: routes first match first, per Host; unmatched Hosts go to passthrough."""

    workloads: tuple[Workload, ...]
    destinations: tuple[Destination, ...]
    routes: tuple[Route, ...]
    # The workload that a request out the passthrough route reaches, if any.
    passthrough_target: str | None = None
    apps: tuple[App, ...] = field(default=(App.ECHO, App.FAILING))

    def __post_init__(self) -> None:
        names = {w.name for w in self.workloads} | set(self.apps) | {NOWHERE}
        clusters = {d.cluster for d in self.destinations}
        for d in self.destinations:
            if d.target not in names:
                raise ValueError(f"destination {d.cluster!r}: unknown target {d.target!r}")
        for r in self.routes:
            if r.cluster not in clusters:
                raise ValueError(f"route for {r.host!r}: unknown cluster {r.cluster!r}")
        if self.passthrough_target is not None and self.passthrough_target not in names:
            raise ValueError(f"unknown passthrough target {self.passthrough_target!r}")
        if RouteFilter.EXT_AUTHZ in self.route_filters and App.AUTHZ_DENY not in self.apps:
            raise ValueError(f"ext_authz on a route needs the app {App.AUTHZ_DENY.value!r}")

    @property
    def route_filters(self) -> tuple[RouteFilter, ...]:
        """The filters some route enables, in the client sidecar's chain order."""
        used = {f for r in self.routes for f in r.filters}
        return tuple(f for f in RouteFilter if f in used)


# --- Envoy config builders -------------------------------------------------------------


def socket_address(port: int) -> dict[str, Any]:
    """A loopback address."""
    return {"socket_address": {"address": LOOPBACK, "port_value": port}}


def cluster(
    name: str,
    port: int,
    *,
    tls: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    http2: bool = False,
    max_retries: int | None = None,
    drop_all: bool = False,
) -> dict[str, Any]:
    """A STATIC cluster of one loopback endpoint, optionally originating TLS or HTTP/2."""
    config: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(port)}}]}],
        },
    }
    if tls is not None:
        config["transport_socket"] = tls
    if metadata is not None:
        config["metadata"] = metadata
    if http2:
        config["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    if max_retries is not None:
        config["circuit_breakers"] = {"thresholds": [{"max_retries": max_retries}]}
    if drop_all:
        drop = {"category": "lab", "drop_percentage": {"numerator": 100, "denominator": "HUNDRED"}}
        config["load_assignment"]["policy"] = {"drop_overloads": [drop]}
    return config


def original_dst_cluster(name: str) -> dict[str, Any]:
    """An original-destination cluster that reads the destination from ORIGINAL_DST_HEADER."""
    return {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "1s",
        "original_dst_lb_config": {
            "use_http_header": True,
            "http_header_name": ORIGINAL_DST_HEADER,
        },
    }


def destination_rule(name: str, namespace: str = "default") -> dict[str, Any]:
    """Cluster metadata as Istio stamps it on a cluster shaped by a DestinationRule."""
    config = f"/apis/networking.istio.io/v1/namespaces/{namespace}/destination-rule/{name}"
    return {"filter_metadata": {"istio": {"config": config}}}


def upstream_tls(
    client: CertFiles | None,
    trusted_ca: Path,
    *,
    sni: str = "",
    alpn: Iterable[str] = (),
    expect_san: str = "",
) -> dict[str, Any]:
    """TLS origination: present `client` (if any), trust `trusted_ca`, optionally check a URI SAN."""
    validation: dict[str, Any] = {"trusted_ca": {"filename": str(trusted_ca)}}
    if expect_san:
        validation["match_typed_subject_alt_names"] = [
            {"san_type": "URI", "matcher": {"exact": expect_san}}
        ]
    common: dict[str, Any] = {"validation_context": validation}
    if client is not None:
        common["tls_certificates"] = [_tls_certificate(client)]
    if alpn:
        common["alpn_protocols"] = list(alpn)
    context: dict[str, Any] = {"common_tls_context": common}
    if sni:
        context["sni"] = sni
    return _tls_socket("UpstreamTlsContext", context)


def downstream_tls(server: CertFiles, *, require_client_certificate: bool) -> dict[str, Any]:
    """Server-side TLS: present `server`; with mTLS, demand a client cert from its CA."""
    common: dict[str, Any] = {
        "tls_certificates": [_tls_certificate(server)],
        # What Istio's inbound chain negotiates once the chain was chosen.
        "alpn_protocols": ["h2", "http/1.1"],
    }
    if require_client_certificate:
        common["validation_context"] = {"trusted_ca": {"filename": str(server.trusted_ca)}}
    context = {
        "require_client_certificate": require_client_certificate,
        "common_tls_context": common,
    }
    return _tls_socket("DownstreamTlsContext", context)


def route(
    name: str,
    cluster_name: str,
    *,
    prefix: str = "/",
    header: tuple[str, str] | None = None,
    add_headers: Mapping[str, str] | None = None,
    retry_on: str = "",
    filters: Iterable[RouteFilter] = (),
) -> dict[str, Any]:
    """A named route sending a path prefix (and, optionally, a header value) to a cluster.

    `retry_on` adds a retry policy (two retries, short back-off); each of `filters` gets
    its per-route configuration, which turns it on for this route.
    """
    match: dict[str, Any] = {"prefix": prefix}
    if header is not None:
        match["headers"] = [{"name": header[0], "string_match": {"exact": header[1]}}]
    action: dict[str, Any] = {"cluster": cluster_name}
    if retry_on:
        action["retry_policy"] = {
            "retry_on": retry_on,
            "num_retries": RETRIES,
            "retry_back_off": {"base_interval": "0.002s", "max_interval": "0.005s"},
        }
    config: dict[str, Any] = {"name": name, "match": match, "route": action}
    if filters:
        config["typed_per_filter_config"] = {
            ROUTE_FILTERS[f][0]["name"]: ROUTE_FILTERS[f][1] for f in filters
        }
    if add_headers:
        config["request_headers_to_add"] = [
            {"header": {"key": key, "value": value}} for key, value in add_headers.items()
        ]
    return config


def virtual_host(domain: str, *routes: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """A virtual host for one Host (`*` for the catch-all)."""
    return {"name": name or domain, "domains": [domain], "routes": list(routes)}


def http_connection_manager(
    name: str,
    virtual_hosts: Iterable[dict[str, Any]],
    *,
    http_filters: Iterable[dict[str, Any]] = (),
    access_log: Path | None = None,
) -> dict[str, Any]:
    """The HTTP connection manager network filter; the router filter goes last."""
    manager: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {"name": name, "virtual_hosts": list(virtual_hosts)},
        # Lets a client find its request in the access log (`Lab.access_log_entry`).
        "always_set_request_id_in_response": True,
        "http_filters": [*http_filters, _ROUTER],
    }
    if access_log is not None:
        manager["access_log"] = [json_access_log(access_log)]
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}


def http_listener(
    name: str,
    port: int,
    virtual_hosts: Iterable[dict[str, Any]],
    *,
    http_filters: Iterable[dict[str, Any]] = (),
    access_log: Path | None = None,
    direction: str | None = None,
) -> dict[str, Any]:
    """A plaintext loopback listener with one HTTP connection manager."""
    manager = http_connection_manager(
        name, virtual_hosts, http_filters=http_filters, access_log=access_log
    )
    listener: dict[str, Any] = {
        "name": name,
        "address": socket_address(port),
        "filter_chains": [{"filters": [manager]}],
    }
    if direction is not None:
        listener["traffic_direction"] = direction
    return listener


def inbound_listener(workload: Workload, port: int, cert: CertFiles) -> dict[str, Any]:
    """A server sidecar's inbound listener, with chains chosen like Istio's (see module doc)."""
    app_cluster = inbound_cluster_name(workload.app)
    vhosts = [virtual_host("*", route("inbound", app_cluster), name=f"inbound|{workload.name}")]
    manager = http_connection_manager(f"inbound_{workload.name}", vhosts)
    tls_match: dict[str, Any] = {"transport_protocol": "tls"}
    if workload.server_names:
        tls_match["server_names"] = list(workload.server_names)
    else:
        tls_match["application_protocols"] = list(workload.alpn)
    tls_chain = {
        "filter_chain_match": tls_match,
        "filters": [manager],
        "transport_socket": downstream_tls(
            cert, require_client_certificate=workload.mode is not Mode.TLS
        ),
    }
    chains = [tls_chain]
    if workload.mode is Mode.PERMISSIVE:
        chains.append(
            {"filter_chain_match": {"transport_protocol": "raw_buffer"}, "filters": [manager]}
        )
    return {
        "name": f"inbound_{workload.name}",
        "address": socket_address(port),
        "traffic_direction": "INBOUND",
        "listener_filters": [_TLS_INSPECTOR],
        "filter_chains": chains,
    }


def inbound_cluster_name(app: App) -> str:
    """Istio's name for the inbound cluster that reaches the app."""
    return f"inbound|8080||{app.value}"


def json_access_log(path: Path) -> dict[str, Any]:
    """A file access log writing one JSON object per request."""
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(path),
            "log_format": {"json_format": ACCESS_LOG_FORMAT},
        },
    }


# How many times a route with `retry_on` retries.
RETRIES = 2
# The origin a CORS-enabled route allows.
CORS_ORIGIN = "https://shop.example"
EXT_AUTHZ_CLUSTER = "ext_authz"
_HUNDRED_PERCENT = {"numerator": 100, "denominator": "HUNDRED"}
_FILTERS_PREFIX = "type.googleapis.com/envoy.extensions.filters.http"
_LOCAL_RATE_LIMIT = f"{_FILTERS_PREFIX}.local_ratelimit.v3.LocalRateLimit"
_FAULT = f"{_FILTERS_PREFIX}.fault.v3.HTTPFault"
_RBAC = f"{_FILTERS_PREFIX}.rbac.v3.RBAC"
# The policy name Istio gives rule 0 of AuthorizationPolicy default/deny-all.
ISTIO_DENY_POLICY = "ns[default]-policy[deny-all]-rule[0]"

# Each route filter: its entry in the HTTP filter chain, which does nothing on its own
# (no CORS policy, no token bucket, no fault; ext_authz disabled), and the per-route
# configuration that turns it on.
ROUTE_FILTERS: dict[RouteFilter, tuple[dict[str, Any], dict[str, Any]]] = {
    RouteFilter.CORS: (
        {
            "name": "envoy.filters.http.cors",
            "typed_config": {"@type": f"{_FILTERS_PREFIX}.cors.v3.Cors"},
        },
        {
            "@type": f"{_FILTERS_PREFIX}.cors.v3.CorsPolicy",
            "allow_origin_string_match": [{"exact": CORS_ORIGIN}],
            "allow_methods": "GET",
        },
    ),
    RouteFilter.RATE_LIMIT: (
        {
            "name": "envoy.filters.http.local_ratelimit",
            "typed_config": {"@type": _LOCAL_RATE_LIMIT, "stat_prefix": "lab_rate_limit"},
        },
        {
            "@type": _LOCAL_RATE_LIMIT,
            "stat_prefix": "lab_rate_limit",
            "token_bucket": {"max_tokens": 1, "tokens_per_fill": 1, "fill_interval": "3600s"},
            "filter_enabled": {"default_value": _HUNDRED_PERCENT, "runtime_key": "lab_rl_on"},
            "filter_enforced": {"default_value": _HUNDRED_PERCENT, "runtime_key": "lab_rl_enf"},
        },
    ),
    RouteFilter.EXT_AUTHZ: (
        {
            "name": "envoy.filters.http.ext_authz",
            "disabled": True,
            "typed_config": {
                "@type": f"{_FILTERS_PREFIX}.ext_authz.v3.ExtAuthz",
                "http_service": {
                    "server_uri": {
                        "uri": "http://ext-authz.lab",
                        "cluster": EXT_AUTHZ_CLUSTER,
                        "timeout": "1s",
                    }
                },
            },
        },
        {"@type": f"{_FILTERS_PREFIX}.ext_authz.v3.ExtAuthzPerRoute", "check_settings": {}},
    ),
    RouteFilter.FAULT_ABORT: (
        {"name": "envoy.filters.http.fault", "typed_config": {"@type": _FAULT}},
        {"@type": _FAULT, "abort": {"http_status": 503, "percentage": _HUNDRED_PERCENT}},
    ),
    # No rules at the top: the filter enforces nothing until a route's config says DENY.
    RouteFilter.RBAC_DENY: (
        {"name": "envoy.filters.http.rbac", "typed_config": {"@type": _RBAC}},
        {
            "@type": f"{_FILTERS_PREFIX}.rbac.v3.RBACPerRoute",
            "rbac": {
                "rules": {
                    "action": "DENY",
                    "policies": {
                        ISTIO_DENY_POLICY: {
                            "permissions": [{"any": True}],
                            "principals": [{"any": True}],
                        }
                    },
                }
            },
        },
    ),
}

_ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
_TLS_INSPECTOR = {
    "name": "envoy.filters.listener.tls_inspector",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
    },
}


def _tls_certificate(files: CertFiles) -> dict[str, Any]:
    return {
        "certificate_chain": {"filename": str(files.cert_chain)},
        "private_key": {"filename": str(files.private_key)},
    }


_TLS_TYPE_PREFIX = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"


def _tls_socket(context_type: str, context: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"{_TLS_TYPE_PREFIX}.{context_type}",
            **context,
        },
    }


# --- From a description to bootstraps --------------------------------------------------


class MeshCerts:
    """Certificates from a mesh CA (and one unrelated CA), issued on demand into a directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._mesh = CertificateAuthority.create("mesh")
        self._other: CertificateAuthority | None = None
        self._issued: dict[tuple[str, Cert], CertFiles] = {}
        root = directory / "mesh-root-cert.pem"
        root.write_bytes(self._mesh.cert_pem)
        self.mesh_root = root

    def get(self, identity: str, kind: Cert, dns_names: Iterable[str] = ()) -> CertFiles:
        """The bundle for `identity` (a SPIFFE ID) of the given kind, issued once."""
        key = (identity, kind)
        if key not in self._issued:
            ca = self._mesh if kind is not Cert.OTHER_CA else self._other_ca()
            issued = ca.issue(
                spiffe_id=identity, dns_names=list(dns_names), expired=kind is Cert.EXPIRED
            )
            name = f"{identity.rsplit('/', 1)[-1]}-{kind.value}"
            self._issued[key] = issued.write(self.directory, name)
        return self._issued[key]

    def _other_ca(self) -> CertificateAuthority:
        if self._other is None:
            self._other = CertificateAuthority.create("other-mesh")
        return self._other


# Where each target of a description (workload, app, NOWHERE) listens on 127.0.0.1.
Addresses = Mapping[str, int]


def server_bootstrap(topology: Topology, addresses: Addresses, certs: MeshCerts) -> dict[str, Any]:
    """The server-side Envoy: one inbound listener per workload, one cluster per app behind one."""
    listeners = [
        inbound_listener(w, addresses[w.name], certs.get(w.identity, w.cert, w.server_names))
        for w in topology.workloads
    ]
    apps = dict.fromkeys(w.app for w in topology.workloads)
    clusters = [cluster(inbound_cluster_name(app), addresses[app]) for app in apps]
    return {"static_resources": {"listeners": listeners, "clusters": clusters}}


def client_bootstrap(
    topology: Topology,
    addresses: Addresses,
    certs: MeshCerts,
    extproc_address: tuple[str, int],
    access_log: Path,
    *,
    transport: str = GRPC,
) -> dict[str, Any]:
    """The client sidecar: its clusters and routes, the ext_proc filter(s), the access log.

    `transport`: gRPC, or the HTTP lane (two single-phase `http_service` filters)."""
    clusters = [_client_cluster(d, addresses, certs) for d in topology.destinations]
    clusters.append(ext_proc_cluster(EXTPROC_CLUSTER, *extproc_address, transport=transport))
    vhosts = _virtual_hosts(topology.routes)
    if topology.passthrough_target is not None:
        clusters.append(original_dst_cluster(PASSTHROUGH_CLUSTER))
        destination = f"{LOOPBACK}:{addresses[topology.passthrough_target]}"
        allow_any = route(
            "allow_any", PASSTHROUGH_CLUSTER, add_headers={ORIGINAL_DST_HEADER: destination}
        )
        vhosts.append(virtual_host("*", allow_any, name="allow_any"))
    if RouteFilter.EXT_AUTHZ in topology.route_filters:
        clusters.append(cluster(EXT_AUTHZ_CLUSTER, addresses[App.AUTHZ_DENY]))
    listener = http_listener(
        CLIENT_LISTENER,
        0,
        vhosts,
        http_filters=[
            *ext_proc_filters(EXTPROC_CLUSTER, direction="outbound", transport=transport),
            annotation_guard_filter(),
            *(ROUTE_FILTERS[f][0] for f in topology.route_filters),
        ],
        access_log=access_log,
        direction="OUTBOUND",
    )
    return {"static_resources": {"listeners": [listener], "clusters": clusters}}


def _client_cluster(d: Destination, addresses: Addresses, certs: MeshCerts) -> dict[str, Any]:
    tls = None
    if d.tls is not None:
        client = None
        if d.tls.cert is not None:
            client = certs.get(spiffe_id("client"), d.tls.cert)
        tls = upstream_tls(
            client,
            certs.mesh_root,
            sni=d.tls.sni,
            alpn=d.tls.alpn,
            expect_san=d.tls.expect_san,
        )
    metadata = destination_rule(d.destination_rule) if d.destination_rule else None
    return cluster(
        d.cluster,
        addresses[d.target],
        tls=tls,
        metadata=metadata,
        http2=d.http2,
        max_retries=d.max_retries,
        drop_all=d.drop_all,
    )


def _virtual_hosts(routes: Iterable[Route]) -> list[dict[str, Any]]:
    """One virtual host per Host, its routes in the order given."""
    by_host: dict[str, list[dict[str, Any]]] = {}
    for r in routes:
        built = route(
            r.name or r.host,
            r.cluster,
            prefix=r.prefix,
            header=r.header,
            retry_on=r.retry_on,
            filters=r.filters,
        )
        by_host.setdefault(r.host, []).append(built)
    return [virtual_host(host, *built) for host, built in by_host.items()]


# --- The running lab -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    """What the client got back: header names lower-cased, in order, duplicates kept."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header `name` (any case), or None."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key == wanted), None)


Headers = Mapping[str, str] | Iterable[tuple[str, str]]
LogEntry = dict[str, Any]
T = TypeVar("T")


def _app_cert(certs: MeshCerts, app: App) -> CertFiles:
    return certs.get(spiffe_id(app.value), Cert.MESH)


# Each app's server, given the lab's certificates (for the TLS ones).
_APP_SERVERS: dict[
    App, Callable[[MeshCerts], AbstractContextManager[HttpUpstream | GrpcUnavailableUpstream]]
] = {
    App.ECHO: lambda _: echo_upstream(),
    App.FAILING: lambda _: status_upstream(503),
    App.GRPC_UNAVAILABLE: lambda _: GrpcUnavailableUpstream(),
    App.KEEPALIVE_CLOSE: lambda certs: keepalive_close_upstream(
        _app_cert(certs, App.KEEPALIVE_CLOSE)
    ),
    App.KEEPALIVE_CLOSE_PLAIN: lambda _: keepalive_close_upstream(None),
    App.SNI_REQUIRED: lambda certs: sni_required_upstream(_app_cert(certs, App.SNI_REQUIRED)),
    App.AUTHZ_DENY: lambda _: status_upstream(403, b"denied by the authorization service"),
}


class Lab:
    """A running `Topology` for the duration of a `with` block: apps, certificates, Envoys.

    The server-side Envoy starts first, so the client sidecar's clusters never point at
    a listener that is not there yet.

    `extproc_address` is where the ext_proc server listens; it need not be up yet, since
    the filter fails open. Certificates, bootstraps and logs go to `workdir`.
    """

    def __init__(
        self,
        extproc_address: tuple[str, int],
        workdir: Path,
        topology: Topology,
        *,
        ready_timeout: float = 20.0,
        transport: str = GRPC,
    ) -> None:
        self.extproc_address = extproc_address
        self.transport = transport
        self.workdir = workdir
        self.topology = topology
        self.access_log_path = workdir / "access.log"
        self._ready_timeout = ready_timeout
        self._stack: ExitStack | None = None
        self._client: EnvoyProcess | None = None
        self._server: EnvoyProcess | None = None
        self._port: int | None = None

    @property
    def envoy(self) -> EnvoyProcess:
        """The client sidecar's Envoy process (admin port, log)."""
        if self._client is None:
            raise RuntimeError("the lab is not running")
        return self._client

    @property
    def server_envoy(self) -> EnvoyProcess:
        """The Envoy process of the server sidecars."""
        if self._server is None:
            raise RuntimeError("the lab is not running")
        return self._server

    @property
    def admin_url(self) -> str:
        """The client sidecar's admin base URL (for `--envoy-admin`)."""
        return f"http://{LOOPBACK}:{self.envoy.admin_port}"

    @property
    def port(self) -> int:
        """The client sidecar listener's port on 127.0.0.1."""
        if self._port is None:
            raise RuntimeError("the lab is not running")
        return self._port

    @property
    def url(self) -> str:
        """The client sidecar listener's base URL."""
        return f"http://{LOOPBACK}:{self.port}"

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            certs = MeshCerts(self.workdir)
            ports = {
                app.value: stack.enter_context(_APP_SERVERS[app](certs)).port
                for app in self.topology.apps
            }
            names = [w.name for w in self.topology.workloads] + [NOWHERE]
            ports.update(zip(names, free_ports(len(names)), strict=True))
            addresses: Addresses = ports
            server = stack.enter_context(
                self._envoy("server", server_bootstrap(self.topology, addresses, certs))
            )
            client_config = client_bootstrap(
                self.topology, addresses, certs, self.extproc_address, self.access_log_path,
                transport=self.transport,
            )  # fmt: skip
            client = stack.enter_context(self._envoy("client", client_config))
            for workload in self.topology.workloads:
                wait_for_port(LOOPBACK, addresses[workload.name], timeout=self._ready_timeout)
            port = client.listener_ports()[CLIENT_LISTENER]
            wait_for_port(LOOPBACK, port, timeout=self._ready_timeout)
            self._stack, self._client, self._server, self._port = (
                stack.pop_all(),
                client,
                server,
                port,
            )
        return self

    def _envoy(self, name: str, bootstrap: dict[str, Any]) -> EnvoyProcess:
        workdir = self.workdir / f"envoy-{name}"
        workdir.mkdir(exist_ok=True)
        return EnvoyProcess(bootstrap, workdir=workdir, ready_timeout=self._ready_timeout)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._stack is not None:
                self._stack.close()
        finally:
            self._stack = self._client = self._server = self._port = None

    def request(
        self,
        host: str | None,
        path: str = "/",
        headers: Headers = (),
        *,
        method: str = "GET",
        timeout: float = 10.0,
    ) -> Response:
        """Send one request through the client sidecar and read the whole answer (blocking).

        `host` becomes the Host header; with None, none is added (pass your own, even two).
        """
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=timeout)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            if host is not None:
                conn.putheader("Host", host)
            pairs = headers.items() if isinstance(headers, Mapping) else headers
            for name, value in pairs:
                conn.putheader(name, value)
            conn.endheaders()
            answer = conn.getresponse()
            pairs_back = [(name.lower(), value) for name, value in answer.getheaders()]
            return Response(answer.status, pairs_back, answer.read())
        finally:
            conn.close()

    def access_log_entries(self, *, at_least: int = 0, timeout: float = 5.0) -> list[LogEntry]:
        """The client sidecar's access log, one dict per request, once it has `at_least`.

        Envoy writes an entry after the response and flushes the file every 100 ms.
        """
        return self._wait_for_log(
            lambda entries: entries if len(entries) >= at_least else None,
            timeout,
            f"{at_least} access log entries",
        )

    def access_log_entry(self, request_id: str, *, timeout: float = 5.0) -> LogEntry:
        """The access log entry of one request, by the `x-request-id` its response carries."""
        return self._wait_for_log(
            lambda entries: next((e for e in entries if e.get("request_id") == request_id), None),
            timeout,
            f"the access log entry of request {request_id}",
        )

    def _wait_for_log(
        self, pick: Callable[[list[LogEntry]], T | None], timeout: float, what: str
    ) -> T:
        """Re-read the access log until `pick` finds something in it."""
        deadline = time.monotonic() + timeout
        while (found := pick(self._read_access_log())) is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no {what} in {self.access_log_path} after {timeout:g}s")
            time.sleep(0.05)
        return found

    def _read_access_log(self) -> list[LogEntry]:
        try:
            text = self.access_log_path.read_text()
        except FileNotFoundError:
            return []
        # Whatever follows the last newline is an entry still being written.
        complete = text.split("\n")[:-1]
        return [json.loads(line) for line in complete if line]
