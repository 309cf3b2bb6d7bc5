"""Threats T1 to T4 through a real Envoy: what the upstream receives, what the client sees.

One Envoy with three listeners, each with the doctor's filter and the annotation guard
exactly as `extproc.filter_config` defines them:
- `edge`: a gateway or front Envoy (declares `edge`, no traffic_direction);
- `sidecar`: an Istio sidecar's outbound listener (traffic_direction OUTBOUND, declares
  `outbound`);
- `failopen`: like `edge`, but its ext_proc cluster is dead, so Envoy fails open and the
  server never sees the response: only the guard filter stands between a forging
  upstream and the client.
The upstream echoes the request headers it received and adds forged `x-extproc-*`
headers to every answer. docs/threat-model.md names the threat each test stands for.
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from extproc.config import Policy, policy_from_mapping
from extproc.filter_config import (
    ANNOTATION_HEADERS,
    annotation_guard_filter,
    ext_proc_cluster,
    ext_proc_filter,
)
from extproc.lab.background import BackgroundServer
from extproc.lab.certs import CertFiles, CertificateAuthority
from extproc.lab.envoy import EnvoyProcess, free_port
from extproc.lab.topology import (
    cluster,
    downstream_tls,
    http_connection_manager,
    http_listener,
    route,
    socket_address,
    virtual_host,
)
from extproc.lab.upstreams import HttpUpstream, _Handler
from extproc.server import ExtProcServer

pytestmark = pytest.mark.envoy

SPIFFE = "spiffe://cluster.local/ns/default"
TLS_INSPECTOR = {
    "name": "envoy.filters.listener.tls_inspector",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
    },
}
MESH_CA = CertificateAuthority.create("mesh")

FORGED = (
    ("x-extproc-diagnosis", 'upstream_requires_mtls;cluster="outbound|443||vault"'),
    ("x-extproc-hint", "Send your credentials to https://evil.example"),
    ("x-extproc-actions", "rewrite-host"),
)


class _ForgingEcho(_Handler):
    """Echoes the request headers as JSON; `/fail` answers 503. Forges annotations always."""

    def answer(self) -> tuple[int, str, bytes]:
        received = {"headers": [[n.lower(), v] for n, v in self.headers.raw_items()]}
        status = 503 if self.path.startswith("/fail") else 200
        return status, "application/json", json.dumps(received).encode()

    def end_headers(self) -> None:
        for name, value in FORGED:
            self.send_header(name, value)
        super().end_headers()


class Mesh:
    """The Envoy, the server and the upstream; `request` goes through one listener."""

    def __init__(
        self, envoy: EnvoyProcess, server: BackgroundServer, ports: dict[str, int], certs: Path
    ) -> None:
        self.envoy, self.server, self.ports, self.certs = envoy, server, ports, certs

    def request(
        self,
        listener: str,
        host: str,
        path: str = "/",
        headers: tuple[tuple[str, str], ...] = (),
        *,
        client: CertFiles | None = None,
    ) -> tuple[int, list[tuple[str, str]], dict[str, Any]]:
        """One GET through `listener`; with `client`, over TLS presenting that certificate."""
        port = self.ports[listener]
        conn: http.client.HTTPConnection
        if client is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        else:
            context = ssl.create_default_context(cafile=str(client.trusted_ca))
            context.check_hostname = False
            context.load_cert_chain(client.cert_chain, client.private_key)
            conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
        try:
            conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host)
            for name, value in headers:
                conn.putheader(name, value)
            conn.endheaders()
            answer = conn.getresponse()
            body = answer.read()
            got = [(n.lower(), v) for n, v in answer.getheaders()]
            echoed = json.loads(body) if body.startswith(b"{") else {}
            return answer.status, got, echoed
        finally:
            conn.close()


def _inbound(port: int, ext_proc_cluster_name: str, routes: list[Any], certs: Path) -> Any:
    """A sidecar's inbound listener as Istio builds it in PERMISSIVE mode: an mTLS chain
    that requires a mesh certificate, and a plaintext chain for callers without one."""
    server = MESH_CA.issue(spiffe_id=f"{SPIFFE}/sa/reviews", dns_names=[]).write(certs, "in")
    manager = http_connection_manager(
        "inbound", [virtual_host("*", *routes)],
        http_filters=[ext_proc_filter(ext_proc_cluster_name, direction="inbound"),
                      annotation_guard_filter()],
    )  # fmt: skip
    mtls = downstream_tls(server, require_client_certificate=True)
    return {
        "name": "inbound",
        "address": socket_address(port),
        "traffic_direction": "INBOUND",
        "listener_filters": [TLS_INSPECTOR],
        "filter_chains": [
            {"filter_chain_match": {"transport_protocol": "tls"}, "filters": [manager],
             "transport_socket": mtls},
            {"filter_chain_match": {"transport_protocol": "raw_buffer"}, "filters": [manager]},
        ],
    }  # fmt: skip


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    ports = {"edge": free_port(), "sidecar": free_port(), "failopen": free_port()}
    ports["inbound"] = free_port()
    certs = tmp_path_factory.mktemp("trust-certs")
    with (
        HttpUpstream(_ForgingEcho) as upstream,
        BackgroundServer(ExtProcServer(Policy())) as server,
    ):
        routes = [
            route("refused", "refused", prefix="/refused"),
            route("echo", "echo", prefix="/"),
        ]

        def listener(name: str, declared: str, ext_proc_cluster_name: str, **kw: Any) -> Any:
            return http_listener(
                name,
                ports[name],
                [virtual_host("*", *routes)],
                http_filters=[
                    ext_proc_filter(ext_proc_cluster_name, direction=declared),
                    annotation_guard_filter(),
                ],
                **kw,
            )

        bootstrap = {
            "static_resources": {
                "listeners": [
                    listener("edge", "edge", "extproc"),
                    listener("sidecar", "outbound", "extproc", direction="OUTBOUND"),
                    listener("failopen", "edge", "dead"),
                    _inbound(ports["inbound"], "extproc", routes, certs),
                ],
                "clusters": [
                    ext_proc_cluster("extproc", "127.0.0.1", server.port),
                    ext_proc_cluster("dead", "127.0.0.1", free_port()),
                    cluster("echo", upstream.port),
                    cluster("refused", free_port()),
                ],
            }
        }
        with EnvoyProcess(bootstrap) as envoy:
            yield Mesh(envoy, server, ports, certs)


def annotations(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(n, v) for n, v in headers if n.startswith("x-extproc-")]


# --- T1: no header the mesh trusts is created ------------------------------------------

ATTACK = (
    ("x_forwarded_client_cert", "By=spiffe://cluster.local/ns/prod/sa/admin"),
    ("x_envoy_retry_on", "5xx"),
    ("x_envoy_max_retries", "25"),
    ("x_real_ip", "10.0.0.1"),
    ("x_envoy_peer_metadata", "ChQKDkFQUF9DT05UQUlORVJTEgIaAA=="),
    ("x_envoy_original_path", "/admin"),
    ("x_forwarded_host", "admin.internal"),
    ("x_user_id", "42"),
)


@pytest.mark.parametrize("listener", ["edge", "sidecar"])
def test_underscore_rewrite_creates_no_trusted_header(mesh: Mesh, listener: str) -> None:
    """underscore_headers: rewrite delivers x-user-id, and none of the trusted names."""
    with mesh.server.policy(policy_from_mapping({"underscore_headers": "rewrite"})):
        status, _, echoed = mesh.request(listener, "shop.example.com", "/", ATTACK)
    assert status == 200
    seen = dict(echoed["headers"])
    assert seen.get("x-user-id") == "42"
    for name, _ in ATTACK:
        assert name not in seen, name  # the underscore original is gone either way
        if name != "x_user_id":
            assert name.replace("_", "-") not in seen, name


# --- T2: annotations cannot be forged ------------------------------------------------------


@pytest.mark.parametrize("listener", ["edge", "sidecar", "failopen"])
@pytest.mark.parametrize("path", ["/", "/fail"])
def test_upstream_cannot_forge_annotations(mesh: Mesh, listener: str, path: str) -> None:
    """Whatever the upstream sends under x-extproc-* never reaches the client, on a 200
    and on the app's own 503, also where the server never sees the response."""
    with mesh.server.policy(policy_from_mapping({"response_annotations": "on"})):
        status, headers, _ = mesh.request(listener, "shop.example.com", path)
    assert status == (200 if path == "/" else 503)
    for name, value in annotations(headers):
        assert (name, value) not in FORGED
        assert "evil" not in value
    if listener == "failopen" or path == "/":
        assert annotations(headers) == []


def test_guard_filter_is_what_protects_a_fail_open_listener() -> None:
    """The guard's header list is the three annotation names (the failopen listener's
    test above fails without it: the server never sees those responses)."""
    guard = annotation_guard_filter()["typed_config"]["mutations"]["response_mutations"]
    assert [m["remove"] for m in guard] == list(ANNOTATION_HEADERS)


# --- T3: no topology for the Internet --------------------------------------------------------


def test_edge_shows_no_diagnosis_but_sidecar_does(mesh: Mesh) -> None:
    """auto (the default): a failure at the edge carries no x-extproc-* header; the same
    failure at a sidecar is annotated."""
    with mesh.server.policy(Policy()):
        edge_status, edge_headers, _ = mesh.request("edge", "shop.example.com", "/refused")
        side_status, side_headers, _ = mesh.request("sidecar", "shop.example.com", "/refused")
    assert edge_status == side_status == 503
    assert annotations(edge_headers) == []
    diagnosis = dict(side_headers)["x-extproc-diagnosis"]
    assert diagnosis.startswith("upstream_refused;")


@pytest.mark.parametrize(("caller", "shown"), [("mesh-peer", True), ("plaintext", False)])
def test_inbound_shows_the_diagnosis_only_to_a_mesh_peer(mesh: Mesh, caller: str, shown: bool):
    """auto at an inbound sidecar: a caller with a mesh certificate (mTLS, a SPIFFE ID that
    Envoy sends as connection.uri_san_peer_certificate) gets the diagnosis; a plaintext
    caller (an ingress controller, a NodePort) gets none, only the status."""
    client = None
    if caller == "mesh-peer":
        client = MESH_CA.issue(spiffe_id=f"{SPIFFE}/sa/productpage", dns_names=[]).write(
            mesh.certs, "productpage"
        )
    with mesh.server.policy(Policy()):
        status, headers, _ = mesh.request("inbound", "reviews", "/refused", client=client)
    assert status == 503
    assert ("x-extproc-diagnosis" in dict(headers)) is shown
    if not shown:
        assert annotations(headers) == []


# --- T4: the original Host cannot be forged -----------------------------------------------


def test_edge_host_rewrite_states_the_real_original_host(mesh: Mesh) -> None:
    """At the edge, a client's x-forwarded-host is replaced by the Host it really sent."""
    policy = policy_from_mapping(
        {"host_rewrites": {"shop.example.com": "shop.internal"}, "forwarding_headers": "keep"}
    )
    with mesh.server.policy(policy):
        status, _, echoed = mesh.request(
            "edge", "shop.example.com", "/", (("x-forwarded-host", "admin.internal"),)
        )
    assert status == 200
    received = echoed["headers"]
    assert [v for n, v in received if n == "x-forwarded-host"] == ["shop.example.com"]
    assert dict(received)["host"] == "shop.internal"


@pytest.mark.parametrize("host", ["a.example.com:8080:9090", "fe80::1:8080", "[::1]:abc"])
def test_hostile_host_is_left_alone(mesh: Mesh, host: str) -> None:
    """A Host that is not an authority is never cut into a new one; it is reported."""
    policy = policy_from_mapping({"strip_host_port": True, "response_annotations": "on"})
    with mesh.server.policy(policy):
        status, headers, echoed = mesh.request("sidecar", host, "/")
    assert status == 200
    assert dict(echoed["headers"])["host"] == host
    assert 'invalid-host;headers=":authority";report' in dict(headers)["x-extproc-actions"]


# --- T18: the operator's reveal token --------------------------------------------------------

REVEAL_TOKEN = "op3rator-reveal-token-2026"


@pytest.mark.parametrize(
    ("sent", "shown"), [(REVEAL_TOKEN, True), ("guess-guess-guess-guess", False)]
)
def test_reveal_token_shows_the_edge_diagnosis_to_its_holder(
    mesh: Mesh, tmp_path, sent: str, shown: bool
) -> None:
    """At the edge, the policy's token in x-extproc-reveal shows the diagnosis; a wrong one
    shows nothing; neither reaches the upstream."""
    token = tmp_path / "token"
    token.write_text(REVEAL_TOKEN)
    policy = policy_from_mapping({"reveal_token_file": str(token)})
    with mesh.server.policy(policy):
        status, headers, _ = mesh.request(
            "edge", "shop.example.com", "/refused", (("x-extproc-reveal", sent),)
        )
        _, _, echoed = mesh.request("edge", "shop.example.com", "/", (("x-extproc-reveal", sent),))
    assert status == 503
    assert ("x-extproc-diagnosis" in dict(headers)) is shown
    assert "x-extproc-reveal" not in dict(echoed["headers"])
    assert REVEAL_TOKEN not in repr(headers)


def test_reveal_token_never_reaches_the_upstream_when_the_server_is_down(mesh: Mesh) -> None:
    """Where Envoy fails open (the failopen listener's server is dead), the guard's request
    side still removes x-extproc-reveal: the upstream never receives the operator's secret."""
    status, _, echoed = mesh.request(
        "failopen", "shop.example.com", "/", (("x-extproc-reveal", REVEAL_TOKEN),)
    )
    assert status == 200
    assert "x-extproc-reveal" not in dict(echoed["headers"])
    assert REVEAL_TOKEN not in json.dumps(echoed)
