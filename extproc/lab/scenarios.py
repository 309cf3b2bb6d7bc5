"""The lab's mesh and its scenarios, as data: which request to send, and what the doctor says.

`MESH` describes the services a client sidecar calls, each set up the way one real
incident was (see `topology.py` for the terms). `SCENARIOS` is the table the demo prints
and the real-Envoy tests walk: first the mesh incidents, numbered as in the issue that
collected them (`extproc demo --scenario 4`), then edge and hygiene cases, addressed by
name (`extproc demo --scenario not_tls`). `SIGNATURE_SCENARIOS` are the rarer failures
(and filter answers) that the real-Envoy tests check but the demo's table leaves out;
`--scenario NAME` runs one of them too.
"""

from __future__ import annotations

from dataclasses import dataclass

from extproc.config import Policy, policy_from_mapping
from extproc.diagnosis import (
    AUTHZ_POLICY_HINT,
    DROP_OVERLOAD_HINT,
    HELLO_NO_SNI_HINT,
    HELLO_REFUSED_HINT,
    HINTS,
    INBOUND_CLOSED_HINT,
    INBOUND_PASSTHROUGH,
    INBOUND_REFUSED_HINT,
    NO_H2_HINT,
    PLAINTEXT_CLOSED_HINT,
    PLAINTEXT_RACE_HINT,
    RETRIED_APP_ERROR_HINT,
    SNI_MISSING_HINT,
    TLS_CLOSED_HINT,
)
from extproc.lab.topology import (
    CORS_ORIGIN,
    NOWHERE,
    App,
    Cert,
    Destination,
    Mode,
    Route,
    RouteFilter,
    Tls,
    Topology,
    Workload,
    outbound,
    spiffe_id,
)

AUTHZ_DENY_HINT = AUTHZ_POLICY_HINT.format(policy="default/deny-all", rule=0)
# The demo's policy: the defaults, stated as a policy so the table can name its source.
DEMO_POLICY: Policy = policy_from_mapping({}, source="<demo policy>")
# Incident 1 fixed: the external Host mapped to the mesh service.
REWRITE_POLICY: Policy = policy_from_mapping(
    {"host_rewrites": {"app.example.com": "app.default.svc.cluster.local"}},
    source="<demo policy + host_rewrites>",
)
SUBSET_HEADER = "x-subset"


def mesh_host(service: str) -> str:
    return f"{service}.default.svc.cluster.local"


def istio_mutual(service: str, *, subset: str = "", cert: Cert = Cert.MESH) -> Tls:
    """What ISTIO_MUTUAL sets: the sidecar's certificate, Istio's SNI, the service's SPIFFE ID."""
    return Tls(
        cert=cert,
        sni=f"outbound_.8080_.{subset}_.{mesh_host(service)}",
        expect_san=spiffe_id(service),
    )


def service(
    name: str,
    target: str | None = None,
    *,
    tls: Tls | None = None,
    plaintext: bool = False,
    destination_rule: str = "",
) -> tuple[Destination, Route]:
    """A mesh service on port 8080: its outbound cluster (ISTIO_MUTUAL unless plaintext) and route."""
    cluster = outbound(name)
    origination = None if plaintext else (tls or istio_mutual(name))
    destination = Destination(cluster, target or name, origination, destination_rule)
    return destination, Route(mesh_host(name), cluster)


_PAY = "pay.example.net"
_CDN = "cdn.example.net"
_SERVICES = [
    service("app"),
    service("orders", NOWHERE),
    service("ratings", plaintext=True, destination_rule="ratings"),
    service("search"),
    service("details"),
    service("cart", tls=istio_mutual("cart", cert=Cert.EXPIRED)),
    service("checkout", tls=istio_mutual("checkout", cert=Cert.OTHER_CA)),
    service("inventory"),
    service("shipping"),
    service("legacy", plaintext=True),
    service("billing"),
]

MESH = Topology(
    workloads=(
        Workload("app"),
        Workload("ratings"),
        Workload("reviews-v1", service_account="reviews"),
        Workload("reviews-v2", service_account="reviews"),
        # Its mTLS chain matches only h2: an HTTP/1.1 client finds no chain.
        Workload("search", alpn=("istio-h2", "h2")),
        # A TLS front door that picks its chain by SNI and has no default chain.
        Workload("pay", mode=Mode.TLS, server_names=(_PAY,)),
        # Runs under the namespace's default service account, not `details`.
        Workload("details", service_account="default"),
        Workload("cart"),
        Workload("checkout"),
        Workload("inventory", cert=Cert.EXPIRED),
        Workload("shipping", app=App.FAILING),
        Workload("legacy", mode=Mode.PERMISSIVE),
        Workload("billing", cert=Cert.OTHER_CA),
        # Failing apps behind routes that retry 5xx: attempts run out, or the retry
        # circuit breaker (maxRetries 0) allows none.
        Workload("payments", app=App.FAILING),
        Workload("stock", app=App.FAILING),
    ),
    destinations=(
        *(d for d, _ in _SERVICES),
        # A DestinationRule `reviews` with subsets; v2 has no trafficPolicy, so the
        # mesh-wide ISTIO_MUTUAL does not apply to it and it goes plaintext.
        Destination(
            outbound("reviews", subset="v1"),
            "reviews-v1",
            tls=istio_mutual("reviews", subset="v1"),
            destination_rule="reviews",
        ),
        Destination(outbound("reviews", subset="v2"), "reviews-v2", destination_rule="reviews"),
        # A ServiceEntry with TLS origination (DestinationRule `pay`, mode SIMPLE): no SNI,
        # except in the subset `sni`, whose trafficPolicy sets tls.sni.
        Destination(f"outbound|443||{_PAY}", "pay", tls=Tls(cert=None, alpn=()), destination_rule="pay"),
        Destination(
            f"outbound|443|sni|{_PAY}", "pay", tls=Tls(cert=None, alpn=(), sni=_PAY), destination_rule="pay"
        ),
        # Reached without a sidecar: the app itself, plaintext.
        Destination("echo", App.ECHO),
        Destination("not_tls", App.ECHO, tls=istio_mutual("echo")),
        Destination(outbound("payments"), "payments", istio_mutual("payments")),
        Destination(outbound("stock"), "stock", istio_mutual("stock"), max_retries=0),
        # A gRPC app without a sidecar, over h2c.
        Destination("grpc", App.GRPC_UNAVAILABLE, http2=True),
        # mTLS straight to an app that closes kept-alive connections.
        Destination(
            outbound("catalog"),
            App.KEEPALIVE_CLOSE,
            Tls(sni=f"outbound_.8080_._.{mesh_host('catalog')}", expect_san=spiffe_id(App.KEEPALIVE_CLOSE)),
        ),
        # The same app, plaintext: behind a sidecar's inbound cluster (Istio's
        # `inbound|8080||`), and behind an outbound cluster with tls.mode DISABLE.
        Destination("inbound|8080||", App.KEEPALIVE_CLOSE_PLAIN),
        Destination(outbound("legacy-api"), App.KEEPALIVE_CLOSE_PLAIN),
        Destination("drop", App.ECHO, drop_all=True),
        # A sidecar's inbound passthrough to an app port where nothing listens.
        Destination(INBOUND_PASSTHROUGH, NOWHERE),
        # TLS origination without SNI to a CDN-like front door.
        Destination(f"outbound|443||{_CDN}", App.SNI_REQUIRED, Tls(cert=None, alpn=()), destination_rule="cdn"),
    ),
    routes=(
        *(r for _, r in _SERVICES),
        Route(mesh_host("reviews"), outbound("reviews", subset="v2"), "reviews-v2", header=(SUBSET_HEADER, "v2")),
        Route(mesh_host("reviews"), outbound("reviews", subset="v1"), "reviews-v1"),
        Route(_PAY, f"outbound|443|sni|{_PAY}", "pay-sni", header=(SUBSET_HEADER, "sni")),
        Route(_PAY, f"outbound|443||{_PAY}", "pay"),
        Route("echo.demo", "echo", "echo"),
        Route("not-tls.demo", "not_tls", "not_tls"),
        Route("api.demo", "echo", "api", prefix="/api/"),
        Route(mesh_host("payments"), outbound("payments"), retry_on="5xx"),
        Route(mesh_host("stock"), outbound("stock"), retry_on="5xx"),
        Route("grpc.demo", "grpc", "grpc", retry_on="unavailable"),
        Route(mesh_host("catalog"), outbound("catalog")),
        Route(_CDN, f"outbound|443||{_CDN}", "cdn"),
        Route("inbound-keepalive.demo", "inbound|8080||", "inbound|8080||"),
        Route(mesh_host("legacy-api"), outbound("legacy-api")),
        Route("cors.demo", "echo", "cors", filters=(RouteFilter.CORS,)),
        Route("limited.demo", "echo", "limited", filters=(RouteFilter.RATE_LIMIT,)),
        Route("authz.demo", "echo", "authz", filters=(RouteFilter.EXT_AUTHZ,)),
        Route("fault.demo", "echo", "fault", filters=(RouteFilter.FAULT_ABORT,)),
        Route("denied.demo", "echo", "denied", filters=(RouteFilter.RBAC_DENY,)),
        Route("drop.demo", "drop", "drop"),
        Route("inbound-passthrough.demo", INBOUND_PASSTHROUGH, "inbound-passthrough"),
    ),
    # Istio's passthrough: plaintext to wherever the client meant to go, here `app`.
    passthrough_target="app",
    apps=(App.ECHO, App.FAILING, App.GRPC_UNAVAILABLE, App.KEEPALIVE_CLOSE, App.KEEPALIVE_CLOSE_PLAIN,
          App.SNI_REQUIRED, App.AUTHZ_DENY),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Scenario:
    """One request through the lab and what the doctor should answer."""

    name: str
    host: str
    path: str
    # None: the request succeeds and needs no diagnosis.
    expected_reason: str | None
    description: str
    # The incident number; None for the edge and hygiene cases.
    incident: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    # Under the scenario's policy: the x-extproc-actions members (with ;report flags).
    expected_actions: tuple[str, ...] = ()
    expected_status: int | None = None
    # Run under this policy instead of the lab's.
    policy: Policy | None = None
    # A catalogue row's own hint, where it has one.
    hint: str | None = None
    # Parameters the x-extproc-diagnosis header must carry, as written there.
    evidence: tuple[str, ...] = ()
    # The reason without the cluster's TLS settings (the access log, no --envoy-admin),
    # and its row's own hint, where it has one.
    offline_reason: str | None = None
    offline_hint: str | None = None
    method: str = "GET"
    # Send the request this many times in a row; the last answer is the outcome (a rate
    # limit allows the first; a kept-alive connection is reused by the second).
    repeat: int = 1

    @property
    def expected_hint(self) -> str | None:
        if self.expected_reason is None:
            return None
        return self.hint or HINTS[self.expected_reason]

    @property
    def reason_without_context(self) -> str | None:
        return self.offline_reason or self.expected_reason

    @property
    def hint_without_context(self) -> str | None:
        if self.offline_reason is None:
            return self.expected_hint
        return self.offline_hint or HINTS[self.offline_reason]

    @property
    def label(self) -> str:
        """How `--list` and the table name it: the incident number, or the name."""
        return str(self.incident) if self.incident is not None else self.name


_STRICT = "a STRICT server sidecar"

MESH_INCIDENTS: tuple[Scenario, ...] = (
    Scenario(
        "host_not_in_mesh", "app.example.com", "/", "host_not_in_mesh",
        "a reverse proxy forwards the external Host; no virtual host matches, so the "
        f"request leaves by the passthrough route, plaintext, to {_STRICT}",
        incident=1,
        evidence=('route="allow_any"', 'cluster="PassthroughCluster"', 'host="app.example.com"'),
    ),
    Scenario(
        "host_rewrite", "app.example.com", "/", None,
        "the same request with host_rewrites app.example.com -> app.default.svc.cluster.local",
        incident=1, policy=REWRITE_POLICY, expected_status=200, expected_actions=("rewrite-host",),
    ),
    Scenario(
        "refused", mesh_host("orders"), "/", "upstream_refused",
        "the service is called on a port where nothing listens (the cluster is mTLS)",
        incident=2,
    ),
    Scenario(
        "requires_mtls", mesh_host("ratings"), "/", "upstream_requires_mtls",
        f"DestinationRule ratings says tls.mode DISABLE; {_STRICT} closes the plaintext, "
        "every request",
        incident=3, hint=PLAINTEXT_CLOSED_HINT, evidence=('dr="default/ratings"', 'tls="off"'),
        repeat=2, offline_reason="upstream_connection_closed",
    ),
    Scenario(
        "subset_plaintext", mesh_host("reviews"), "/", "upstream_requires_mtls",
        "subset v2 has no trafficPolicy, overriding mesh-wide mTLS: plaintext to "
        f"{_STRICT}, every request",
        incident=4, headers=((SUBSET_HEADER, "v2"),), hint=PLAINTEXT_CLOSED_HINT,
        evidence=(
            'cluster="outbound|8080|v2|reviews.default.svc.cluster.local"',
            'dr="default/reviews"',
        ),
        repeat=2, offline_reason="upstream_connection_closed",
    ),
    Scenario(
        "subset_mtls", mesh_host("reviews"), "/", None,
        "subset v1 of the same DestinationRule keeps mTLS and works",
        incident=4, expected_status=200,
    ),
    Scenario(
        "alpn_h2_only", mesh_host("search"), "/", "alpn_mismatch",
        "an HTTP/1.1 cluster (ALPN istio-http/1.1) meets an mTLS chain that accepts only h2",
        incident=5, hint=NO_H2_HINT, evidence=('alpn="istio-http/1.1"',),
        offline_reason="tls_handshake_rejected",
    ),
    Scenario(
        "sni_missing", _PAY, "/", "sni_rejected",
        "TLS origination without SNI to a front door that picks its chain by SNI",
        incident=6, hint=SNI_MISSING_HINT, evidence=('sni="none"',),
        offline_reason="tls_handshake_rejected",
    ),
    Scenario(
        "sni_set", _PAY, "/", None,
        "the same upstream through the subset whose trafficPolicy sets tls.sni",
        incident=6, headers=((SUBSET_HEADER, "sni"),), expected_status=200,
    ),
    Scenario(
        "san_mismatch", mesh_host("details"), "/", "upstream_san_mismatch",
        "the server presents .../sa/default where the client expects .../sa/details",
        incident=7,
    ),
    Scenario(
        "client_cert_expired", mesh_host("cart"), "/", "client_cert_rejected",
        "the client sidecar's certificate expired yesterday",
        incident=8,
    ),
    Scenario(
        "client_cert_other_ca", mesh_host("checkout"), "/", "client_cert_rejected",
        "the client sidecar's certificate comes from another mesh's root CA",
        incident=8,
    ),
    Scenario(
        "expired", mesh_host("inventory"), "/", "upstream_cert_expired",
        "the server sidecar's certificate expired yesterday",
        incident=9,
    ),
    Scenario(
        "app_error", mesh_host("shipping"), "/", "upstream_app_error",
        "the app behind an mTLS server sidecar answers 503 itself",
        incident=10,
    ),
)  # fmt: skip

EDGE_SCENARIOS: tuple[Scenario, ...] = (
    Scenario("clean", "echo.demo", "/", None, "a healthy plaintext service answers"),
    Scenario(
        "mtls", mesh_host("app"), "/", None, f"mTLS to {_STRICT}", expected_status=200,
    ),
    Scenario(
        "permissive", mesh_host("legacy"), "/", None,
        "plaintext to a PERMISSIVE server sidecar", expected_status=200,
    ),
    Scenario(
        "not_tls", "not-tls.demo", "/", "upstream_not_tls",
        "the sidecar originates mesh TLS to an app without a sidecar (plaintext port)",
    ),
    Scenario(
        "untrusted", mesh_host("billing"), "/", "upstream_cert_untrusted",
        "the server sidecar's certificate comes from another mesh's root CA",
    ),
    Scenario("no_route", "api.demo", "/other", "no_route", "the virtual host routes only /api/"),
    Scenario(
        "echoed_headers", "echo.demo", "/", None,
        "an app echoed inbound-only x-envoy headers and sent an underscore header",
        headers=(
            ("x-envoy-peer-metadata-id", "sidecar~10.0.0.9~reviews-v1.default~default.svc.cluster.local"),
            ("x-envoy-attempt-count", "3"),
            ("x_user_id", "42"),
        ),
        expected_actions=("strip-echoed-envoy-headers", "strip-underscore-headers;report"),
        expected_status=200,
    ),
    Scenario(
        "retries_exhausted", mesh_host("payments"), "/", "upstream_app_error",
        "the app answers 503 to the request and to both retries (retry_on 5xx)",
        expected_status=503, hint=RETRIED_APP_ERROR_HINT, evidence=('flags="URX"',),
    ),
    Scenario(
        "keepalive_race", mesh_host("catalog"), "/", "upstream_connection_closed",
        "an mTLS app closes a kept-alive connection just as the sidecar reuses it",
        repeat=2, expected_status=503, evidence=('flags="UC"', 'tls="on"'), hint=TLS_CLOSED_HINT,
        # Without --envoy-admin, Envoy's upstream.tls_version still proves TLS.
        offline_reason="upstream_connection_closed", offline_hint=TLS_CLOSED_HINT,
    ),
    Scenario(
        "keepalive_race_inbound", "inbound-keepalive.demo", "/", "upstream_connection_closed",
        "an app closes a kept-alive connection just as its sidecar's inbound cluster "
        "(plaintext to the app) reuses it: no mTLS problem",
        repeat=2, expected_status=503, evidence=('flags="UC"', 'cluster="inbound|8080||"'),
        hint=INBOUND_CLOSED_HINT,
    ),
    Scenario(
        "keepalive_race_plaintext", mesh_host("legacy-api"), "/", "upstream_connection_closed",
        "a plaintext cluster (tls.mode DISABLE): its app answers each connection's first "
        "request and closes it on the second; answers come between the closes, so no mismatch",
        repeat=4, expected_status=503, evidence=('flags="UC"', 'tls="off"'),
        hint=PLAINTEXT_RACE_HINT, offline_reason="upstream_connection_closed",
    ),
    Scenario(
        "rate_limited", "limited.demo", "/", "rate_limited",
        "a local rate limit of one request per hour; the client sends a second one",
        repeat=2, expected_status=429, evidence=('flags="RL"',),
    ),
)  # fmt: skip

SIGNATURE_SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "grpc_unavailable", "grpc.demo", "/lab.App/Call", "upstream_app_error",
        "a gRPC app answers UNAVAILABLE (14), also to both retries (retry_on unavailable)",
        method="POST", headers=(("content-type", "application/grpc"), ("te", "trailers")),
        expected_status=200, hint=RETRIED_APP_ERROR_HINT, evidence=("grpc=14", 'flags="URX"'),
    ),
    Scenario(
        "retry_overflow", mesh_host("stock"), "/", "upstream_app_error",
        "the app answers 503; the retry circuit breaker (maxRetries 0) allows no retry",
        expected_status=503, hint=RETRIED_APP_ERROR_HINT, evidence=('flags="UO"',),
    ),
    Scenario(
        "client_hello_no_sni", _CDN, "/", "sni_rejected",
        "TLS origination without SNI to a front door that refuses a ClientHello without it",
        expected_status=503, hint=HELLO_NO_SNI_HINT, evidence=('sni="none"',),
        offline_reason="tls_handshake_rejected", offline_hint=HELLO_REFUSED_HINT,
    ),
    Scenario(
        "cors_preflight", "cors.demo", "/", None,
        "a CORS preflight the cors filter answers itself: not a failure",
        method="OPTIONS",
        headers=(("origin", CORS_ORIGIN), ("access-control-request-method", "GET")),
        expected_status=200,
    ),
    Scenario(
        "ext_authz_denied", "authz.demo", "/", "ext_authz_denied",
        "the ext_authz service answers 403 to the check", expected_status=403,
        evidence=('flags="UAEX"',),
    ),
    Scenario(
        "drop_overload", "drop.demo", "/", "circuit_open",
        "the control plane's load assignment drops every request (drop_overloads 100%)",
        hint=DROP_OVERLOAD_HINT,
        expected_status=503, evidence=('flags="UDO"',),
    ),
    Scenario(
        "inbound_passthrough_refused", "inbound-passthrough.demo", "/", "upstream_refused",
        "the inbound passthrough finds nothing on the app's port (the app does not listen on "
        "the port the Service names): not a Host problem",
        hint=INBOUND_REFUSED_HINT, expected_status=503,
        evidence=('cluster="InboundPassthroughCluster"',),
    ),
    Scenario(
        "authz_policy_denied", "denied.demo", "/", "authz_policy_denied",
        "Istio's AuthorizationPolicy default/deny-all, as Envoy's RBAC filter runs it, denies "
        "the request", expected_status=403, hint=AUTHZ_DENY_HINT,
        evidence=('policy="default/deny-all rule 0"',),
    ),
    Scenario(
        "fault_abort", "fault.demo", "/", "fault_injected",
        "a fault filter aborts every request with 503", expected_status=503,
        evidence=('flags="FI"',),
    ),
)  # fmt: skip

SCENARIOS: tuple[Scenario, ...] = MESH_INCIDENTS + EDGE_SCENARIOS
# Everything the real-Envoy tests walk.
ALL_SCENARIOS: tuple[Scenario, ...] = SCENARIOS + SIGNATURE_SCENARIOS


def find_scenarios(label: str) -> tuple[Scenario, ...]:
    """The scenarios of an incident number, or the one with that name; raises KeyError."""
    found = tuple(s for s in ALL_SCENARIOS if label in (s.label, s.name))
    if not found:
        known = ", ".join(dict.fromkeys(s.label for s in ALL_SCENARIOS))
        raise KeyError(f"no scenario {label!r}; choose one of: {known}")
    return found
