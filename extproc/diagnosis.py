"""Failure diagnosis: Envoy's own failure evidence in, one reason code and a hint out.

Strategy: the catalogue is a table of `Signature` rows, walked top to bottom by one
matcher (`classify`); the first row that fits wins, so rows go from the most specific
(a TLS reason buried in the transport failure reason) to the most general (any
Envoy-generated failure). Envoy's strings drift between versions (`|` or `,` separators,
errno numbers or words, `TLS error: ` or `TLS_error:|`), so text conditions are plain
substrings matched against a normalised copy of the code details and the transport
failure reason: lower case, with `_` turned back into spaces.

No grpc or protobuf here: the adapter in `server.py` (or the access-log parser) builds an
`Evidence`, and everything below is a pure function of it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from extproc import flags as F

# Clusters and routes that carry traffic whose Host matched no mesh service: Istio's
# outbound catch-all (`allow_any` → PassthroughCluster under ALLOW_ANY, `block_all` →
# BlackHoleCluster under REGISTRY_ONLY). Not `InboundPassthroughCluster`: inbound
# routing does not depend on the Host, it forwards to the port the caller dialled.
PASSTHROUGH_CLUSTERS = frozenset({"PassthroughCluster", "BlackHoleCluster"})
PASSTHROUGH_ROUTES = frozenset({"allow_any", "block_all"})
# A sidecar's inbound clusters: Istio's `inbound|PORT||` ones and the inbound passthrough.
INBOUND_PASSTHROUGH = "InboundPassthroughCluster"
INBOUND_PREFIX = "inbound|"
# Code details of answers that are not failures: the upstream's own, filters answering on
# purpose (a CORS preflight, the admin filter), and an internal redirect. A direct response
# or a Lua respond() is the configuration answering: not a failure below 400, and
# `configured_response` from 400 on.
NOT_FAILURE_DETAILS = frozenset(
    {"via_upstream", "cors_response", "admin_filter_response", "internal_redirect"}
)
# `Evidence.cluster_sni` of a cluster with auto_sni (the SNI comes from the Host).
AUTO_SNI = "auto"
# ALPN tokens that ask for HTTP/2: plain, and Istio's mesh token.
H2_ALPN = frozenset({"h2", "istio-h2"})


@dataclass(frozen=True, slots=True)
class Evidence:
    """What Envoy told us about one response, from attributes, headers or a log line."""

    status: int | None = None
    flags: int = 0
    code_details: str = ""
    transport_failure_reason: str = ""
    cluster: str = ""
    upstream_address: str = ""
    route: str = ""
    host: str = ""
    grpc_status: int | None = None
    # True when the response came from the upstream (Envoy adds
    # x-envoy-upstream-service-time); None when unknown.
    upstream_answered: bool | None = None
    overloaded: bool = False
    # The text-format `envoy.config.core.v3.Metadata` of the cluster, as Envoy sends
    # `xds.cluster_metadata`; Istio names the DestinationRule there.
    cluster_metadata: str = ""
    # False when Envoy sent none of the failure attributes: reasons then come from the
    # status and headers only, and are less precise.
    has_attributes: bool = False
    # The failing cluster's TLS settings, from Envoy's admin /config_dump when the server
    # knows the admin address (`extproc.envoy_admin`); None when unknown. Attributes
    # cannot say this (`upstream.sni` does not exist), yet it tells the causes of a reset
    # during the handshake apart.
    # The SNI the cluster sends: a name, AUTO_SNI, or "" for none.
    cluster_sni: str | None = None
    # The ALPN protocols it offers, in order; empty when it offers none.
    cluster_alpn: tuple[str, ...] | None = None
    # True when the cluster originates TLS, False when it speaks plaintext, None when unknown.
    cluster_tls: bool | None = None
    # `upstream.tls_version` (`TLSv1.3`): Envoy sets it only on a TLS upstream connection,
    # so it proves TLS without --envoy-admin; its absence proves nothing.
    upstream_tls_version: str = ""
    # The server's own memory of this cluster (`extproc.closes`): True when connections
    # closed under requests several times in a row with no answer from the cluster in
    # between (a mismatch fails every request), False when not (a keep-alive race follows
    # answers), None when there is no memory (offline, or no --envoy-admin).
    repeated_close: bool | None = None
    # Flag bits or names this Envoy sent that `flags.RESPONSE_FLAGS` does not know
    # (`bit40`, `XYZ`); kept as evidence, never matched.
    unknown_flags: str = ""
    # The doctor's own diagnosis, where a log line carries it
    # (`%DYNAMIC_METADATA(extproc_doctor)%`): the live server knew more than the line (the
    # cluster's TLS settings, its memory of closes), so offline takes its word.
    doctor_reason: str = ""
    doctor_hint: str = ""


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """A reason code from the catalogue, a one-line hint, and the evidence that led there."""

    reason: str
    hint: str
    evidence: tuple[tuple[str, str | int], ...] = field(default=())


@dataclass(frozen=True, slots=True)
class Signature:
    """One catalogue row.

    `flags` and `text` are alternatives: the row fits when any of its flag bits is set
    or any of its substrings occurs. The other fields narrow it and must all hold.
    A row with neither `flags` nor `text` is decided by the narrowing fields alone.
    """

    reason: str
    flags: int = 0
    text: tuple[str, ...] = ()
    status: tuple[int, int] | None = None
    upstream_answered: bool | None = None
    has_attributes: bool | None = None
    passthrough: bool | None = None
    overloaded: bool | None = None
    grpc_status: frozenset[int] | None = None
    # Context from the cluster's TLS settings; a row that asks needs the context known.
    sends_sni: bool | None = None
    offers_h2: bool | None = None
    cluster_tls: bool | None = None
    # True for a sidecar's inbound cluster (`inbound|…`, `InboundPassthroughCluster`).
    inbound: bool | None = None
    repeated_close: bool | None = None
    # Overrides the reason's hint where this row knows more than the reason does.
    hint: str | None = None


HINTS: dict[str, str] = {
    "host_not_in_mesh": (
        "The Host matched no mesh service, so the sidecar sent the request out its "
        "passthrough route; fix the Host (a reverse proxy forwarding the external Host?) "
        "or add a host_rewrites entry."
    ),
    "upstream_requires_mtls": (
        "The upstream requires mTLS and did not get it (a client certificate asked for and "
        "not sent): check the DestinationRule's tls.mode (ISTIO_MUTUAL) against the "
        "server's STRICT PeerAuthentication."
    ),
    "upstream_not_tls": (
        "Envoy spoke TLS to a port that answered in plaintext: the destination has no "
        "sidecar, or the cluster's TLS settings point at a plaintext port."
    ),
    "upstream_cert_untrusted": (
        "Envoy did not trust the upstream's certificate chain: check that both sides use "
        "the same root CA (trust domain, cacerts)."
    ),
    "upstream_san_mismatch": (
        "The upstream's certificate does not carry the expected SAN/SPIFFE identity: check "
        "subjectAltNames, the service account and the trust domain."
    ),
    "upstream_cert_expired": (
        "The upstream's certificate has expired: rotate it, and check the cert agent or SDS."
    ),
    "client_cert_rejected": (
        "The upstream rejected our client certificate (expired, or from a CA it does not "
        "trust): check this sidecar's certificate and the shared root."
    ),
    "sni_rejected": (
        "The upstream did not accept the TLS server name: set sni or auto_sni on the "
        "cluster's TLS context."
    ),
    "tls_handshake_rejected": (
        "The upstream reset the TLS handshake: usually no filter chain matched, either the "
        "SNI (set sni/auto_sni) or the ALPN (an HTTP/1.1 client where the server expects h2)."
    ),
    "alpn_mismatch": (
        "No ALPN protocol in common: the upstream expects another protocol (often h2); "
        "name the port by protocol or enable HTTP/2 to it."
    ),
    "tls_version_mismatch": (
        "Envoy and the upstream share no TLS version or cipher: align tls_minimum/"
        "maximum_protocol_version and cipher suites."
    ),
    "sds_secret_missing": (
        "Envoy had no certificate to present: the SDS secret is not ready (check the "
        "istio-agent or cert provider)."
    ),
    "protocol_mismatch": (
        "The upstream spoke another HTTP version than Envoy expected (HTTP/1.1 vs h2): "
        "name the service port by protocol or set appProtocol."
    ),
    "upstream_refused": (
        "Nothing listens on the upstream port: check the port the service was called on "
        "and the targetPort."
    ),
    "upstream_connect_timeout": (
        "The upstream connection timed out: the endpoint is unreachable, filtered, or a TLS "
        "handshake stalled (missing SNI?)."
    ),
    "upstream_reset": (
        "The upstream reset the stream: it crashed or closed the connection, or an idle "
        "keep-alive connection raced with a new request."
    ),
    "upstream_timeout": (
        "The upstream did not answer within the route timeout: raise the timeout or find "
        "the slow dependency."
    ),
    "no_healthy_upstream": (
        "The cluster has no healthy endpoint: no ready pods, or outlier detection ejected them all."
    ),
    "circuit_open": (
        "A circuit breaker or overload limit rejected the request: check the "
        "DestinationRule connectionPool settings."
    ),
    "no_route": (
        "No route matched the request's Host and path: check the Host (and a host:port "
        "mismatch) against the virtual hosts."
    ),
    "cluster_not_found": (
        "The route names a cluster that does not exist: check the route's destination and "
        "the service's registration."
    ),
    "dns_failure": "DNS resolution of the upstream failed: check the host name and the resolver.",
    "upstream_app_error": (
        "The upstream, or its own sidecar, answered with this error (a 503 from the sidecar "
        "in front of the app looks the same here); the mesh between delivered it: check the "
        "upstream's logs and its sidecar's."
    ),
    "upstream_connection_closed": (
        "The upstream closed the connection under the request: now and then, the keep-alive "
        "race (make its idle timeout longer than Envoy's, retry on reset); on every request "
        "to a plaintext cluster, a server requiring mTLS (--envoy-admin tells them apart)."
    ),
    "rate_limited": (
        "A rate limit rejected the request (the local_ratelimit filter or the global rate "
        "limit service): the limit did its job; raise it or slow the client down."
    ),
    "ext_authz_denied": (
        "The external authorization service denied the request: check the caller's "
        "credentials and the authorization policy, not the upstream."
    ),
    "fault_injected": (
        "A fault injection rule aborted the request on purpose: check the VirtualService "
        "fault settings or the fault filter."
    ),
    "invalid_request_headers": (
        "The client sent x-envoy-* header values that failed Envoy's strict check: fix or "
        "drop them in the client."
    ),
    "downstream_protocol_error": (
        "The client's request broke the HTTP protocol (malformed, or HTTP/1.1 vs h2 on a "
        "port declared for the other): fix the client or the port's protocol."
    ),
    "stream_idle_timeout": (
        "The stream had no activity for the stream idle timeout: a slow client or upstream, "
        "or a long-lived stream; raise stream_idle_timeout or the route's idle_timeout."
    ),
    "client_disconnected": (
        "The client went away before the response was complete: not a mesh failure; check "
        "the client's own timeout."
    ),
    "authz_policy_denied": (
        "An authorization policy denied the request (an Istio AuthorizationPolicy, Envoy's "
        "RBAC filter): the policy in the evidence did its job, or it must allow this caller."
    ),
    "jwt_rejected": (
        "The request's JWT was missing or rejected (expired, wrong issuer or audience, "
        "unknown signing key): check the token and the RequestAuthentication's issuer and jwks."
    ),
    "request_too_large": (
        "The request exceeded a limit of this proxy (header size or count, often a cookie "
        "that grew, or the body buffer): raise max_request_headers_kb or the buffer limit, "
        "or shrink the request. Not a circuit breaker."
    ),
    "response_too_large": (
        "The upstream's response exceeded the buffer of a filter that reads it whole: raise "
        "that buffer limit or stream the response."
    ),
    "upgrade_rejected": (
        "A protocol upgrade (WebSocket, CONNECT) was refused: the route does not allow it "
        "(upgrade_configs) or the upstream did not answer 101 Switching Protocols."
    ),
    "overload_shed": (
        "Envoy's overload manager shed the request: this proxy is short of memory or "
        "connections; give the sidecar more resources or spread the load."
    ),
    "configured_response": (
        "The configuration itself answered with this status (a direct_response, a "
        "VirtualService directResponse, a Lua respond(), a cluster in maintenance mode): "
        "no upstream was asked; check the route."
    ),
    "client_timeout": (
        "The client did not send its request in time (headers or the whole request): a slow "
        "or stalled client; see request_headers_timeout and request_timeout."
    ),
    "stream_duration_exceeded": (
        "A configured maximum duration ended the stream or connection (max_stream_duration, "
        "max_connection_duration): long-lived streams must reconnect, or raise the limit."
    ),
    "filter_error": (
        "An Envoy filter failed or misbehaved (ext_proc, Lua, header mutation, a transcoder, "
        "a filter removing required headers): check that filter's configuration, not the upstream."
    ),
    "origin_rejected": (
        "The CSRF filter rejected the request's Origin: send it from an allowed origin or add "
        "the origin to the policy's additional_origins."
    ),
    "tls_peer_alert": (
        "The upstream ended the TLS handshake with an alert (see detail): its TLS settings "
        "refuse something in ours; compare both sides' TLS configuration."
    ),
    "tls_config_error": (
        "This proxy's own TLS configuration enables nothing usable (no cipher, version, "
        "group, certificate or key that works): check the cluster's TLS context."
    ),
    "tls_protocol_error": (
        "The TLS handshake broke on a protocol error (a malformed or unexpected message, see "
        "detail): often a middlebox or a peer that is not the TLS server it should be."
    ),
    "upstream_failure": (
        "Envoy failed the request for a reason the catalogue does not know; see the evidence."
    ),
}

_TERMINATION = ("connection termination",)
_REFUSED = ("connection refused", "connect error: 111", "connect error:111")
# BoringSSL's errno text when the peer reset the connection in the middle of the handshake.
_HANDSHAKE_RESET = ("openssl internal:connection reset by peer",)

# The client's BoringSSL adds this to a handshake failure alert sent in answer to its
# ClientHello, before any certificate was asked for.
_HELLO_REFUSED = ("handshake failure on client hello",)

# BoringSSL's SSL reasons by what a user does about them (tests/unit/data/
# boringssl_ssl_reasons.txt has them all). Each fragment follows `OPENSSL_internal:`, so it
# matches only inside a BoringSSL error, and a prefix covers a family (`no cipher`).
_TLS_ALPN = tuple(f"internal:{r}" for r in (
    "invalid alpn protocol", "alpn mismatch on early data", "negotiated both npn and alpn",
    "negotiated alps without alpn", "alps mismatch on early data", "invalid alps codepoint",
))  # fmt: skip
_TLS_ECH_REFUSED = ("internal:ech rejected", "alert ech required")
_TLS_PEER_REFUSED_OUR_CERT = (
    "alert unsupported certificate", "alert bad certificate hash value",
    "alert bad certificate status response", "alert certificate unobtainable",
    "alert no certificate",
)  # fmt: skip
_TLS_NEGOTIATION = (
    "alert insufficient security", "alert inappropriate fallback", "alert export restriction",
    "alert no renegotiation",
    *(f"internal:{r}" for r in (
        "inappropriate fallback", "wrong ssl version", "unknown ssl version", "unknown protocol",
        "no shared group", "no common signature algorithms", "wrong curve",
        "unsupported elliptic curve", "wrong cipher returned", "unknown cipher returned",
        "cipher or hash unavailable", "downgrade detected", "tls13 downgrade", "dh p too long",
        "bad dh p length", "wrong signature type", "no supported psk mode",
        "unknown key exchange type", "second serverhello version mismatch",
        "unsupported compression algorithm", "required cipher missing", "old session",
        "unknown cipher type", "cipher mismatch on early data", "wrong version on early data",
        "unsafe legacy renegotiation disabled", "no renegotiation", "renegotiation",
        "scsv received when renegotiating", "ems state inconsistent", "resumed",
        "negotiated tb without ems or ri", "unexpected compatibility mode",
    )),
)  # fmt: skip
_TLS_THEIR_CERT = tuple(f"internal:{r}" for r in (
    "no certificates returned", "tls peer did not respond with certificate list",
    "cannot parse leaf cert", "server cert changed", "ecc cert not for signing",
    "key usage bit incorrect", "bad ecc cert", "x509 lib", "x509 verification setup problems",
    "no matching issuer", "unknown certificate type", "wrong certificate type",
    "unsupported certificate", "peer error unsupported certificate type",
    "invalid delegated credential", "invalid raw public key", "cert decompression failed",
    "uncompressed cert too large", "unknown cert compression alg", "cert length mismatch",
    "ca dn", "invalid cert types list",
))  # fmt: skip
_TLS_LOCAL_CONFIG = tuple(f"internal:{r}" for r in (
    "no cipher", "no supported versions enabled", "no groups specified", "no certificate",
    "no private key assigned", "certificate and private key mismatch", "missing key",
    "missing rsa certificate", "null ssl", "ssl ctx has no default ssl version",
    "no method specified", "invalid command", "connection type not set", "bio not set",
    "invalid cipher flags", "mixed special operator with groups", "nested group",
    "unexpected operator in group", "bad ssl filetype", "cannot have both privkey and method",
    "invalid ticket keys length", "duplicate group", "duplicate cipher",
    "duplicate signature algorithm", "invalid signature algorithm",
    "unsupported credential list", "quic transport parameters misconfigured",
    "invalid certificate property list", "invalid sct list", "ech server",
    "unsupported ech server config", "invalid ech", "unusable ech config list",
    "inconsistent ech negotiation", "psk no", "session id context uninitialized",
    "ssl session id context too long", "srtp", "bad srtp", "unsupported protocol for custom key",
    "invalid spake2plusv1 value", "pake exhausted", "peer pake mismatch",
    "private key operation failed", "cert cb error", "ocsp cb error",
    "bad data returned by callback", "custom extension error", "error adding extension",
    "could not parse hints", "missing tmp", "unable to find ecdh parameters",
    "invalid trust anchor list", "no compression specified", "invalid compression list",
    "invalid ssl session", "attempt to reuse session in different context",
    "session may not be created", "invalid psk for connection", "channel id not p256",
    "invalid alpn protocol list", "mtu too small", "ticket encryption failed",
    "no required digest",
))  # fmt: skip
_TLS_PEER_ALERT = ("internal:sslv3 alert", "internal:tlsv1 alert", "internal:bad alert",
                   "internal:unknown alert type", "internal:too many warning alerts")  # fmt: skip
# Any other TLS error Envoy reports (`TLS_error:…`, older `TLS error: …`).
_TLS_ANY = ("tls error",)

CERT_UNUSABLE_HINT = (
    "Envoy could not use the upstream's certificate (none sent, unparsable, the wrong type "
    "or key usage, no matching issuer): check the certificate the upstream serves."
)
ECH_REFUSED_HINT = (
    "The upstream refused the TLS ClientHello's encrypted part (ECH): check the ECH "
    "configuration both sides use."
)

# Row hints for a handshake reset once the cluster's TLS settings are known.
SNI_MISSING_HINT = (
    "The upstream reset the TLS handshake and this cluster sends no SNI: the upstream "
    "likely chooses its filter chain or certificate by server name. Set sni or auto_sni "
    "on the cluster's TLS context (DestinationRule tls.sni)."
)
NO_H2_HINT = (
    "The upstream reset the TLS handshake and this cluster offers no HTTP/2 in its ALPN "
    "(see alpn): the server's chain likely accepts only h2 (istio-h2). Send HTTP/2 to it "
    "(port name or appProtocol http2/grpc) or let the server accept HTTP/1.1."
)

HELLO_NO_SNI_HINT = (
    "The upstream refused the TLS ClientHello and this cluster sends no SNI: a CDN or "
    "shared TLS front door needs the server name. Set sni or auto_sni on the cluster's "
    "TLS context (DestinationRule tls.sni)."
)
HELLO_REFUSED_HINT = (
    "The upstream refused the TLS ClientHello itself, before asking for any certificate: "
    "it found no usable server name (SNI), TLS version, cipher or ALPN in it; check what "
    "the upstream accepts."
)
DROP_OVERLOAD_HINT = (
    "Envoy dropped the request by the cluster's drop_overload setting from the control "
    "plane's load assignment, not by a circuit breaker: check what the control plane "
    "sends for this cluster."
)
RETRIED_APP_ERROR_HINT = (
    "The upstream (or its own sidecar) answered with this error, also on each retry (see "
    "flags: URX retries exhausted, UO retry budget full); the mesh delivered its last answer."
)
PLAINTEXT_CLOSED_HINT = (
    "The upstream closed a plaintext connection on every request: it requires mTLS "
    "(STRICT PeerAuthentication vs a DestinationRule with tls.mode DISABLE or a subset "
    "without trafficPolicy); this cluster originates no TLS."
)
TLS_CLOSED_HINT = (
    "The upstream closed a TLS connection Envoy was reusing: usually the keep-alive race, "
    "an idle connection the upstream closed just as a request went out. Make the "
    "upstream's idle timeout longer than Envoy's (DestinationRule "
    "connectionPool.http.idleTimeout) and retry on reset."
)
PLAINTEXT_RACE_HINT = (
    "The upstream closed a plaintext connection, but not on every request so far (a first "
    "close, or answers in between): likely the keep-alive race; make its idle timeout longer "
    "than Envoy's. If every request fails this way, it requires mTLS."
)
INBOUND_CLOSED_HINT = (
    "The app closed the connection its sidecar was reusing (the sidecar speaks plaintext "
    "to the app, so this is no mTLS problem): the keep-alive race, or the app shutting "
    "down; make the app's keep-alive timeout longer than the sidecar's idle timeout, and "
    "drain before exit."
)
INBOUND_REFUSED_HINT = (
    "The sidecar's inbound side found nothing listening on the app's port: the app does "
    "not listen on the port the Service's targetPort names, or listens on localhost only."
)
UNDERSCORE_HINT = (
    "The request had a header name with an underscore and this listener rejects those "
    "(headers_with_underscores_action REJECT_REQUEST): rename the header in the client."
)
FILTER_CHAIN_HINT = (
    "No filter chain of the listener matched the connection: on a STRICT sidecar, a "
    "client sending plaintext (or another SNI/ALPN than the listener serves); check the "
    "client side's TLS settings."
)
RESPONSE_FRAMING_HINT = (
    "The upstream's HTTP/1.1 response broke the framing rules (a Transfer-Encoding or "
    "Content-Length where none is allowed): fix the upstream, or check the port's protocol."
)
IP_DETECTION_HINT = (
    "The original client IP could not be detected from the request (x-forwarded-for or the "
    "configured header) and the listener rejects such requests: check the proxies before it."
)
MAINTENANCE_HINT = (
    "The cluster is in maintenance mode (runtime upstream.maintenance_mode): Envoy answers "
    "for it on purpose; check the runtime setting."
)
AUTHZ_POLICY_HINT = (
    "The AuthorizationPolicy {policy} (rule {rule}) denied the request: allow this caller "
    "there, or the policy did its job."
)
LEGACY_NR_HINT = (
    "An older Envoy answered 503 NR: the route matched but names a cluster that does not "
    "exist; check the route's destination and the service's registration."
)

# The catalogue, most specific first. Text is matched after normalisation (see module doc).
CATALOGUE: tuple[Signature, ...] = (
    # The upstream answered: whatever it said and whatever the retry flags, the mesh
    # delivered it (`is_envoy_failure` lets only its error answers through).
    Signature(
        "upstream_app_error",
        flags=F.URX | F.UO,
        upstream_answered=True,
        hint=RETRIED_APP_ERROR_HINT,
    ),
    Signature("upstream_app_error", upstream_answered=True),
    # The Host fell through to the passthrough route and then failed.
    Signature("host_not_in_mesh", passthrough=True),
    # TLS: our verdict on their certificate.
    Signature("upstream_cert_expired", text=("certificate has expired",)),
    Signature("upstream_san_mismatch", text=("verify san list", "san matcher")),
    Signature("upstream_cert_untrusted", text=("certificate verify failed",)),
    # TLS: their verdict on us, as an alert.
    Signature(
        "upstream_requires_mtls",
        text=("alert certificate required", "peer did not return a certificate"),
    ),
    Signature(
        "client_cert_rejected",
        text=(
            "alert bad certificate",
            "alert unknown ca",
            "alert certificate expired",
            "alert certificate unknown",
            "alert certificate revoked",
            "alert access denied",
        ),
    ),
    # A handshake failure in answer to the ClientHello: the hello itself was refused.
    Signature("sni_rejected", text=_HELLO_REFUSED, sends_sni=False, hint=HELLO_NO_SNI_HINT),
    Signature("tls_handshake_rejected", text=_HELLO_REFUSED, hint=HELLO_REFUSED_HINT),
    Signature(
        "upstream_requires_mtls",
        text=("alert handshake failure",),
        hint=(
            "The upstream failed the TLS handshake: it most likely requires a client "
            "certificate (mTLS); if the cluster sends no SNI, the server may need one."
        ),
    ),
    Signature("sni_rejected", text=("alert unrecognized name",)),
    Signature("alpn_mismatch", text=("no application protocol",)),
    Signature(
        "tls_version_mismatch",
        text=("alert protocol version", "unsupported protocol", "no shared cipher"),
    ),
    Signature("upstream_not_tls", text=("wrong version number", "http request")),
    Signature("sds_secret_missing", text=("secret is not supplied by sds",)),
    # A reset during the handshake: no chain matched the SNI or the ALPN. The cluster's
    # TLS settings, when known, say which; without them the hint names both.
    Signature("sni_rejected", text=_HANDSHAKE_RESET, sends_sni=False, hint=SNI_MISSING_HINT),
    Signature(
        "alpn_mismatch", text=_HANDSHAKE_RESET, sends_sni=True, offers_h2=False, hint=NO_H2_HINT
    ),
    Signature("tls_handshake_rejected", text=_HANDSHAKE_RESET),
    # The rest of BoringSSL's vocabulary, by what a user does about it.
    Signature("sni_rejected", text=("internal:ssl3 ext invalid servername",)),
    Signature("alpn_mismatch", text=_TLS_ALPN),
    Signature("tls_handshake_rejected", text=_TLS_ECH_REFUSED, hint=ECH_REFUSED_HINT),
    Signature("client_cert_rejected", text=_TLS_PEER_REFUSED_OUR_CERT),
    Signature("upstream_not_tls", text=("internal:https proxy request",)),
    Signature("upstream_cert_untrusted", text=_TLS_THEIR_CERT, hint=CERT_UNUSABLE_HINT),
    Signature("tls_protocol_error", text=("internal:missing key share",)),
    Signature("tls_config_error", text=_TLS_LOCAL_CONFIG),
    Signature("tls_version_mismatch", text=_TLS_NEGOTIATION),
    Signature("tls_peer_alert", text=_TLS_PEER_ALERT),
    Signature("tls_protocol_error", text=_TLS_ANY),
    # Transport.
    Signature("upstream_refused", text=_REFUSED, inbound=True, hint=INBOUND_REFUSED_HINT),
    Signature("upstream_refused", text=_REFUSED),
    Signature("upstream_connect_timeout", text=("connection timeout",)),
    Signature("dns_failure", flags=F.DF),
    # Filters and limits that answer by their details (Envoy's and its filters'
    # vocabulary, tests/unit/data/envoy_response_code_details.txt).
    Signature("authz_policy_denied", text=("rbac access denied",)),
    Signature("jwt_rejected", text=("jwt authn access denied",)),
    Signature("origin_rejected", text=("csrf origin mismatch",)),
    Signature(
        "request_too_large",
        text=(
            "headers too large",
            "too many headers",
            "header list size too large",
            "cookies total bytes too large",
            "request payload too large",
            "request payload exceeded retry buffer limit",
        ),
    ),
    Signature("response_too_large", text=("response payload too large",)),
    Signature("upgrade_rejected", text=("upgrade failed", "websocket handshake unsuccessful")),
    Signature(
        "client_timeout",
        text=("request header timeout", "downstream header timeout", "request overall timeout"),
    ),
    Signature(
        "stream_duration_exceeded",
        text=("max duration timeout", "duration timeout", "max stream duration reached"),
    ),
    Signature(
        "filter_error",
        text=(
            "filter removed required",
            "filter added invalid",
            "header mutation",
            "ext proc error",
            "transcode failure",
        ),
    ),
    Signature("configured_response", text=("maintenance mode",), hint=MAINTENANCE_HINT),
    Signature("configured_response", text=("direct response", "lua response")),
    Signature(
        "invalid_request_headers",
        text=("rejecting because detection failed",),
        hint=IP_DETECTION_HINT,
    ),
    Signature("downstream_protocol_error", text=("unexpected underscore",), hint=UNDERSCORE_HINT),
    Signature(
        "downstream_protocol_error", text=("filter chain not found",), hint=FILTER_CHAIN_HINT
    ),
    Signature(
        "protocol_mismatch",
        text=("http1.transfer encoding not allowed", "http1.content length not allowed"),
        hint=RESPONSE_FRAMING_HINT,
    ),
    Signature("upstream_reset", text=("http2.remote reset", "http2.remote refuse")),
    # Routing and cluster state. Envoy before the NC flag answered 503 NR for a route
    # whose cluster does not exist; a missing route is a 404.
    Signature("cluster_not_found", flags=F.NR, status=(503, 503), hint=LEGACY_NR_HINT),
    Signature("no_route", flags=F.NR, text=("route not found", "route configuration not found")),
    Signature("cluster_not_found", flags=F.NC, text=("cluster not found",)),
    Signature("no_healthy_upstream", flags=F.UH, text=("no healthy upstream",)),
    # Drops come from the endpoints' load assignment (the control plane), not from a
    # connectionPool: the reason stays circuit_open, the hint says where to look.
    Signature(
        "circuit_open",
        flags=F.DO | F.UDO,
        hint=DROP_OVERLOAD_HINT,
    ),
    Signature("circuit_open", text=("drop overload",)),
    Signature("overload_shed", flags=F.OM, text=("overload",)),
    Signature("circuit_open", flags=F.UO, text=("{overflow",)),
    Signature("circuit_open", overloaded=True),
    # Filters that refused the request on purpose, before any upstream.
    Signature(
        "rate_limited",
        flags=F.RLSE,
        text=("rate limiter error",),
        hint=(
            "The rate limit service could not be asked and the filter fails closed "
            "(failure_mode_deny): check the rate limit service, not the upstream."
        ),
    ),
    Signature("rate_limited", flags=F.RL, text=("request rate limited", "local rate limited")),
    Signature(
        "ext_authz_denied",
        text=("ext authz error", "ext authz invalid"),
        hint=(
            "The external authorization service could not be asked (down, timed out, an "
            "invalid answer) and the filter fails closed: check the authorization service, "
            "not the upstream."
        ),
    ),
    Signature("ext_authz_denied", flags=F.UAEX, text=("ext authz denied",)),
    Signature("fault_injected", flags=F.FI, text=("fault filter abort",)),
    Signature("invalid_request_headers", flags=F.IH, text=("request headers failed strict check",)),
    Signature(
        "downstream_protocol_error",
        flags=F.DPE,
        text=(
            "codec error",
            "http1.",
            "http2.",
            "low version",
            "missing host header",
            "missing path rejected",
            "invalid path",
            "absolute path rejected",
            "path normalization failed",
            "early connect data",
        ),
    ),
    # HTTP and stream level.
    Signature("protocol_mismatch", flags=F.UPE, text=("protocol error",)),
    Signature(
        "upstream_timeout",
        flags=F.UT,
        text=("response timeout", "per try timeout", "per try idle timeout"),
    ),
    Signature("stream_idle_timeout", flags=F.SI, text=("stream idle timeout",)),
    # A connection closed under a request. The mTLS verdict needs proof: the cluster is
    # plaintext (--envoy-admin) and it closed on every request lately, with no answer in
    # between (`extproc.closes`). A sidecar's inbound cluster is always plaintext to the
    # app, a TLS one cannot be the mismatch, and one close alone may be the keep-alive race.
    Signature(
        "upstream_connection_closed",
        flags=F.UC,
        text=_TERMINATION,
        inbound=True,
        hint=INBOUND_CLOSED_HINT,
    ),
    Signature(
        "upstream_connection_closed",
        flags=F.UC,
        text=_TERMINATION,
        cluster_tls=True,
        hint=TLS_CLOSED_HINT,
    ),
    Signature(
        "upstream_requires_mtls",
        flags=F.UC,
        text=_TERMINATION,
        cluster_tls=False,
        repeated_close=True,
        hint=PLAINTEXT_CLOSED_HINT,
    ),
    Signature(
        "upstream_connection_closed",
        flags=F.UC,
        text=_TERMINATION,
        cluster_tls=False,
        repeated_close=False,
        hint=PLAINTEXT_RACE_HINT,
    ),
    Signature("upstream_connection_closed", flags=F.UC, text=_TERMINATION),
    Signature("upstream_reset", flags=F.UR | F.LR, text=("remote reset", "local reset")),
    Signature(
        "client_disconnected",
        flags=F.DC | F.DR,
        text=("downstream remote disconnect", "downstream local disconnect"),
    ),
    Signature(
        "upstream_failure",
        flags=F.UF,
        text=("connection failure",),
        hint=(
            "Envoy could not connect to the upstream and gave no transport reason: check "
            "the port, the TLS settings on both sides, and the endpoint's reachability."
        ),
    ),
    # A reset whose reason no row above knows.
    Signature(
        "upstream_reset",
        text=("upstream reset before response started", "upstream reset after response started"),
    ),
    # No attributes: the status and headers are all there is.
    Signature("upstream_timeout", status=(504, 504), upstream_answered=False, has_attributes=False),
    Signature(
        "upstream_timeout",
        grpc_status=frozenset({4}),
        upstream_answered=False,
        has_attributes=False,
    ),
    Signature("no_route", status=(404, 404), upstream_answered=False, has_attributes=False),
    Signature(
        "request_too_large", status=(431, 431), upstream_answered=False, has_attributes=False
    ),
    Signature(
        "upstream_failure",
        status=(500, 599),
        has_attributes=False,
        hint=(
            "Envoy failed this request but sent no failure attributes: configure the "
            "ext_proc response_attributes listed in docs/filter-settings.md for a precise reason."
        ),
    ),
    Signature(
        "upstream_failure",
        grpc_status=frozenset({4, 8, 13, 14}),
        upstream_answered=False,
        has_attributes=False,
        hint=(
            "Envoy failed this gRPC call but sent no failure attributes: configure the "
            "ext_proc response_attributes listed in docs/filter-settings.md for a precise reason."
        ),
    ),
    # Anything else Envoy failed.
    Signature("upstream_failure"),
)


def _normalise(text: str) -> str:
    return text.replace("_", " ").lower()


def is_envoy_failure(ev: Evidence) -> bool:
    """True when the response needs a diagnosis.

    A response Envoy did not fail (no failure flags, details `via_upstream` or absent,
    status below 500, no gRPC error from a local reply) is left alone; so is a filter's
    answer that is not a failure (`NOT_FAILURE_DETAILS`). An upstream's own answer counts
    when it is a 5xx, or an error that Envoy retried (a 429 or gRPC error with `URX`). A
    gRPC local reply is HTTP 200, so flags and details count as much as the status.
    Flag bits the table does not know decide nothing.
    """
    status = ev.status or 0
    error = status >= 400 or bool(ev.grpc_status)
    failure_flags = bool(ev.flags & F.ALL_FLAGS & ~F.BENIGN)
    if ev.has_attributes and ev.code_details == "via_upstream":
        return status >= 500 or (error and failure_flags)
    if failure_flags or status >= 500:
        return True
    if ev.code_details:
        return ev.code_details not in NOT_FAILURE_DETAILS and (ev.status is None or error)
    return not ev.has_attributes and _unattributed_failure(ev)


def _unattributed_failure(ev: Evidence) -> bool:
    """Without attributes, a 404 or a gRPC error that Envoy itself produced (no
    x-envoy-upstream-service-time) is the best sign there is."""
    if ev.status == 431:
        # Request headers over the limit: Envoy's own answer unless the upstream's.
        return ev.upstream_answered is not True
    if ev.upstream_answered is False:
        return ev.status == 404 or bool(ev.grpc_status)
    # x-envoy-overloaded below 500 is an upstream's own header (Envoy sets it on its 503s).
    return False


def _fits(sig: Signature, ev: Evidence, text: str, passthrough: bool) -> bool:
    if (sig.flags or sig.text) and not (ev.flags & sig.flags or any(t in text for t in sig.text)):
        return False
    if sig.status is not None:
        low, high = sig.status
        if ev.status is None or not low <= ev.status <= high:
            return False
    return (
        (sig.upstream_answered is None or sig.upstream_answered == _answered(ev))
        and (sig.has_attributes is None or sig.has_attributes == ev.has_attributes)
        and (sig.passthrough is None or sig.passthrough == passthrough)
        and (sig.overloaded is None or sig.overloaded == ev.overloaded)
        and (sig.grpc_status is None or ev.grpc_status in sig.grpc_status)
        and (sig.sends_sni is None or sig.sends_sni == _sends_sni(ev))
        and (sig.offers_h2 is None or sig.offers_h2 == _offers_h2(ev))
        and (sig.cluster_tls is None or sig.cluster_tls == _cluster_tls(ev))
        and (sig.inbound is None or sig.inbound == _inbound(ev))
        and (sig.repeated_close is None or sig.repeated_close == ev.repeated_close)
    )


def _cluster_tls(ev: Evidence) -> bool | None:
    """The cluster's transport: from --envoy-admin, else TLS when the connection was TLS."""
    if ev.cluster_tls is not None:
        return ev.cluster_tls
    return True if ev.upstream_tls_version else None


def _inbound(ev: Evidence) -> bool:
    return ev.cluster == INBOUND_PASSTHROUGH or ev.cluster.startswith(INBOUND_PREFIX)


def _sends_sni(ev: Evidence) -> bool | None:
    return None if ev.cluster_sni is None else bool(ev.cluster_sni)


def _offers_h2(ev: Evidence) -> bool | None:
    return None if ev.cluster_alpn is None else not H2_ALPN.isdisjoint(ev.cluster_alpn)


def _answered(ev: Evidence) -> bool:
    """Did the upstream itself produce this response?"""
    if ev.has_attributes:
        # Whatever the flags (URX, UO: retries ran out on the upstream's own answers).
        return ev.code_details == "via_upstream"
    return bool(ev.upstream_answered)


def classify(ev: Evidence) -> Diagnosis | None:
    """The first catalogue row that fits `ev`, or None when Envoy did not fail the response.

    A log line that carries the doctor's own diagnosis gets it back, so that offline
    and live agree."""
    if ev.doctor_reason in HINTS:
        return Diagnosis(
            ev.doctor_reason, ev.doctor_hint or HINTS[ev.doctor_reason], evidence_of(ev)
        )
    if not is_envoy_failure(ev):
        return None
    text = _normalise(ev.code_details) + "\n" + _normalise(ev.transport_failure_reason)
    passthrough = ev.cluster in PASSTHROUGH_CLUSTERS or ev.route in PASSTHROUGH_ROUTES
    passthrough = passthrough and not _answered(ev)
    for sig in CATALOGUE:
        if _fits(sig, ev, text, passthrough):
            # The cluster's TLS settings are evidence only where they decide the reason.
            tls_context = sig.text in (_HANDSHAKE_RESET, _HELLO_REFUSED, _TERMINATION)
            return Diagnosis(sig.reason, _hint(sig, ev), evidence_of(ev, tls_context))
    raise AssertionError("the catalogue ends with a catch-all row")  # pragma: no cover


def _hint(sig: Signature, ev: Evidence) -> str:
    """The row's hint; an AuthorizationPolicy denial names the policy Istio recorded."""
    policy = authz_policy(ev.code_details) if sig.reason == "authz_policy_denied" else None
    if policy is not None:
        return AUTHZ_POLICY_HINT.format(policy=policy[0], rule=policy[1])
    return sig.hint or HINTS[sig.reason]


# Istio's RBAC policy names: `ns[NS]-policy[NAME]-rule[N]` inside Envoy's
# `rbac_access_denied_matched_policy[...]` (istio/istio pilot/pkg/security/authz/builder).
_ISTIO_POLICY = re.compile(
    r"rbac_access_denied_matched_policy\[ns\[([A-Za-z0-9.\-]{1,63})\]"
    r"-policy\[([A-Za-z0-9.\-]{1,253})\]-rule\[(\d{1,6})\]\]"
)


def authz_policy(code_details: str) -> tuple[str, str] | None:
    """(`namespace/name`, rule) of the Istio AuthorizationPolicy that denied, or None."""
    m = _ISTIO_POLICY.search(code_details)
    return (f"{m.group(1)}/{m.group(2)}", m.group(3)) if m else None


# `TLS_error:|268435703:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER:TLS_error_end`
# → `WRONG_VERSION_NUMBER`; with a detail after the reason, that is kept too. Envoy joins
# several queued errors with `|` (a handshake_failure alert in answer to the ClientHello:
# `…:SSLV3_ALERT_HANDSHAKE_FAILURE|268435610:SSL routines:OPENSSL_internal:
# HANDSHAKE_FAILURE_ON_CLIENT_HELLO:TLS_error_end`); each error's code, library and
# function are dropped. Older Envoy wrote `TLS error: 268435581:…` and, in code details,
# spaces as `_`. Parsed with `str` methods, each a single pass, so the cost is linear in
# the text whatever a peer sends (tests/unit/test_linear.py).
_TLS_MARKS = ("TLS_error:", "TLS error:")
# Where a reason ends: Envoy's end mark, the `}` that closes code details, or the line.
_TLS_ENDS = (":TLS_error_end", "}", "\n")


def tls_reason(text: str) -> str | None:
    """The BoringSSL reason(s) in a transport failure reason or code details, or None.

    The first `TLS_error:` (or `TLS error:`) followed by `[code:]library:function:` gives
    the reason: the text up to `:TLS_error_end`, `}` or the end of the line.
    """
    for at in _marks(text):
        start = _tls_fields(text, at)
        if start is not None:
            return _drop_error_prefixes(text[start : _tls_end(text, start)])
    return None


def _marks(text: str) -> Iterator[int]:
    """Where each TLS mark starts, in order; each mark's search resumes where it stopped."""
    ahead = [text.find(mark) for mark in _TLS_MARKS]
    while live := [i for i in ahead if i != -1]:
        at = min(live)
        yield at
        ahead = [
            text.find(m, at + 1) if i == at else i for m, i in zip(_TLS_MARKS, ahead, strict=True)
        ]


def _tls_fields(text: str, at: int) -> int | None:
    """Where the reason starts after the mark at `at`: past `[\\s_]*|?[\\s_]*`, an optional
    numeric code, a library and a function, each ended by `:`; None when they are not there."""
    i = _skip_blank(text, at + len(_TLS_MARKS[0]))
    if i < len(text) and text[i] == "|":
        i = _skip_blank(text, i + 1)
    code_end = text.find(":", i)
    if code_end > i and text[i:code_end].isdecimal():
        after_code = _two_fields(text, code_end + 1)
        if after_code is not None:
            return after_code
    return _two_fields(text, i)


def _skip_blank(text: str, i: int) -> int:
    while i < len(text) and (text[i] == "_" or text[i].isspace()):
        i += 1
    return i


def _two_fields(text: str, i: int) -> int | None:
    """The index past `[^:|]*:[^:|]*:` at `i`, or None."""
    for _ in range(2):
        colon = text.find(":", i)
        if colon == -1 or text.find("|", i, colon) != -1:
            return None
        i = colon + 1
    return i


def _tls_end(text: str, start: int) -> int:
    ends = [i for i in (text.find(end, start) for end in _TLS_ENDS) if i != -1]
    return min(ends, default=len(text))


def _drop_error_prefixes(reason: str) -> str:
    """`A|268435610:SSL routines:OPENSSL_internal:B` → `A|B`."""
    first, *rest = reason.split("|")
    out = [first]
    for error in rest:
        parts = error.split(":", 3)
        out.append(parts[3] if len(parts) == 4 and parts[0].isdecimal() else error)
    return "|".join(out)


_DESTINATION_RULE = re.compile(r"/destination-rule/([A-Za-z0-9.\-]+)")
_DESTINATION_RULE_NS = re.compile(r"/namespaces/([A-Za-z0-9.\-]+)/destination-rule/")


def transport_detail(ev: Evidence) -> str:
    """The most telling part of the failure text: the TLS reason, the connect error, or the details."""
    source = ev.transport_failure_reason or ev.code_details
    reason = tls_reason(source)
    if reason is not None:
        return reason
    if ev.transport_failure_reason:
        return ev.transport_failure_reason
    return ev.code_details


def destination_rule(cluster_metadata: str) -> str:
    """`namespace/name` of the DestinationRule Istio recorded in the cluster metadata, or ''."""
    m = _DESTINATION_RULE.search(cluster_metadata)
    if not m:
        return ""
    ns = _DESTINATION_RULE_NS.search(cluster_metadata)
    return f"{ns.group(1)}/{m.group(1)}" if ns else m.group(1)


def evidence_of(ev: Evidence, tls_context: bool = False) -> tuple[tuple[str, str | int], ...]:
    """The evidence parameters, in a fixed order, leaving out what is unknown.

    `tls_context` adds whether the cluster originates TLS and its SNI and ALPN (`tls`,
    `sni`, `alpn`), when known.
    """
    sni = ev.cluster_sni if tls_context else None
    alpn = ev.cluster_alpn if tls_context else None
    transport = _cluster_tls(ev) if tls_context else None
    items: list[tuple[str, str | int]] = []
    if ev.status is not None:
        items.append(("status", ev.status))
    if ev.grpc_status:
        items.append(("grpc", ev.grpc_status))
    if ev.flags & F.ALL_FLAGS:
        items.append(("flags", F.format_flags(ev.flags)))
    for key, value in (
        ("unknown_flags", ev.unknown_flags),
        ("cluster", ev.cluster),
        ("route", ev.route),
        ("upstream", ev.upstream_address),
        ("host", ev.host),
        ("dr", destination_rule(ev.cluster_metadata)),
        ("policy", _policy_evidence(ev.code_details)),
        ("tls", "" if transport is None else ("on" if transport else "off")),
        ("sni", _known(sni)),
        ("alpn", _known(None if alpn is None else " ".join(alpn))),
        ("detail", transport_detail(ev)),
    ):
        if value:
            items.append((key, value))
    return tuple(items)


def _policy_evidence(code_details: str) -> str:
    policy = authz_policy(code_details) if "rbac" in code_details else None
    return f"{policy[0]} rule {policy[1]}" if policy else ""


def _known(setting: str | None) -> str:
    """A TLS setting for the evidence: '' when unknown (left out), `none` when not set."""
    if setting is None:
        return ""
    return setting or "none"
