"""The server's doors as the manifests render them, run by a real Envoy 1.40 on both lanes.

- Envoy withholds credentials from the server (`forward_rules`), and the hygiene rules
  still see every header name they act on;
- the attributes arrive under ext_proc's extension name while the doctor's filters have
  their own names;
- the ext_proc cluster's circuit breakers are what Envoy reports;
- with `--extproc-mtls` Envoy presents a client certificate and a server that requires
  one serves it; without one the server refuses and Envoy fails open.
"""

from __future__ import annotations

import asyncio
import copy
import http.client
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.core.v3.base_pb2 import DataSource
from envoy.extensions.transport_sockets.tls.v3.common_pb2 import (
    CertificateValidationContext,
    TlsCertificate,
)
from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import Secret
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryResponse
from envoy.service.secret.v3 import sds_pb2_grpc as sds_grpc
from google.protobuf import any_pb2

from extproc import core
from extproc.admission import StreamLimits
from extproc.config import Exposure, Policy, TlsFiles
from extproc.filter_config import (
    CIRCUIT_BREAKERS,
    EXT_PROC_FILTER,
    EXT_PROC_RESPONSE_FILTER,
    UNLIMITED,
)
from extproc.http_lane import HttpLane, HttpProcessor
from extproc.lab import BackgroundServer, EnvoyProcess, HttpUpstream
from extproc.lab.certs import CertificateAuthority, IssuedCert
from extproc.render import RenderMode, RenderOptions, render
from extproc.render.envoy_bootstrap import LISTENER
from extproc.render.options import NAME
from extproc.server import ExternalProcessor, ExtProcServer
from extproc.tls import ReloadingSslContext

from .placement import apply_envoy_filter
from .test_envoy_validate import ISTIO_SDS_STAND_IN

pytestmark = pytest.mark.envoy

POLICY = Policy(response_annotations=Exposure.ON)  # the rendered Envoy is the edge
SECRET = "s3cret"
CREDENTIALS = {
    "authorization": f"Bearer {SECRET}-token",
    "cookie": f"session={SECRET}-cookie",
    "proxy-authorization": f"Basic {SECRET}-proxy",
}
# Names the hygiene rules act on at the edge: each must still reach the server.
HYGIENE_NAMES = {
    "x-envoy-attempt-count": "3",  # echoed x-envoy-*
    "x-forwarded-host": "evil.example",  # forwarding headers
    "x_under": "1",  # underscore names
    "x-extproc-reveal": "not-the-token",  # the reveal header
}


class EchoWithCookie(BaseHTTPRequestHandler):
    """Answers 200 with the request headers it received as JSON, and sets a cookie."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps(dict(self.headers.items())).encode()
        self.send_response(200)
        self.send_header("Set-Cookie", f"id={SECRET}-set-cookie")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


class Witness:
    """What the server was sent: header names per message, attribute keys, raw messages."""

    def __init__(self) -> None:
        self.header_names: list[set[str]] = []
        self.attribute_keys: set[str] = set()
        self.raw: list[bytes] = []


class GrpcWitness(ExternalProcessor):
    """The real gRPC processor, noting what each message carried before answering it."""

    def __init__(self, policy: Policy, limits: StreamLimits | None = None) -> None:
        super().__init__(policy, limits=limits)
        self.seen = Witness()

    def _answer(
        self, kind: str | None, policy: Policy, first: Any, request: Any, state: Any
    ) -> Any:
        if kind in ("request_headers", "response_headers"):
            headers = getattr(request, kind).headers.headers
            self.seen.header_names.append({h.key for h in headers})
        self.seen.attribute_keys.update(request.attributes.keys())
        self.seen.raw.append(request.SerializeToString())
        return super()._answer(kind, policy, first, request, state)


class HttpWitness(HttpProcessor):
    """The real HTTP-lane processor, noting what each POST carried before answering it."""

    def __init__(self, policy: Policy) -> None:
        super().__init__(policy)
        self.seen = Witness()

    def answer(self, body: bytes, declared: Any = None) -> bytes:
        message = json.loads(body)
        for kind in ("request_headers", "response_headers"):
            if kind in message:
                headers = message[kind].get("headers", {}).get("headers", [])
                self.seen.header_names.append({h["key"] for h in headers})
        self.seen.attribute_keys.update(message.get("attributes", {}))
        self.seen.raw.append(body)
        return super().answer(body, declared)


def grpc_server(
    policy: Policy, tls: TlsFiles | None = None, limits: StreamLimits | None = None
) -> tuple[Any, BackgroundServer]:
    processor = GrpcWitness(policy, limits)
    server = ExtProcServer(policy, servicer=processor, tls=tls, limits=limits)
    return processor, BackgroundServer(server)


def http_server(policy: Policy, tls: TlsFiles | None = None) -> tuple[Any, BackgroundServer]:
    processor = HttpWitness(policy)
    context = ReloadingSslContext(tls).context if tls else None
    return processor, BackgroundServer(HttpLane(processor, "127.0.0.1:0", ssl_context=context))


SERVERS: dict[str, Callable[..., tuple[Any, BackgroundServer]]] = {
    "grpc": grpc_server,
    "http": http_server,
}


class Front:
    """The rendered Envoy in front of the upstream, and what its server saw."""

    def __init__(self, envoy: EnvoyProcess, seen: Witness) -> None:
        self.envoy = envoy
        self.seen = seen
        self.port = envoy.listener_ports()[LISTENER]

    def get(self, headers: dict[str, str]) -> tuple[int, dict[str, str], dict[str, str]]:
        """(status, response headers, the headers the upstream received)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/", headers=headers)
            response = conn.getresponse()
            received = json.loads(response.read())
            headers = {k.lower(): v for k, v in response.getheaders()}
            return response.status, headers, {k.lower(): v for k, v in received.items()}
        finally:
            conn.close()

    def stats(self, suffix: str) -> int:
        """The sum of Envoy's counters whose name ends with `suffix`."""
        _, text = self.envoy.admin_get("/stats")
        pairs = (line.rsplit(": ", 1) for line in text.splitlines() if ": " in line)
        return sum(int(v) for k, v in pairs if k.endswith(suffix) and v.isdigit())

    def gauge(self, name: str) -> int:
        """One of Envoy's gauges, by its full name."""
        _, text = self.envoy.admin_get(f"/stats?filter=^{name}$")
        return int(text.split(": ")[1])


def rendered_envoy(transport: str, address: str, upstream_port: int, **tls: str) -> dict[str, Any]:
    """`extproc render envoy --mode always` for this server, upstream and TLS options."""
    options = RenderOptions(
        mode=RenderMode.ALWAYS,
        transport=transport,
        extproc_address=address,
        envoy_listen="127.0.0.1:0",
        upstream=f"127.0.0.1:{upstream_port}",
        **tls,  # type: ignore[arg-type]
    )
    name = "always" if transport == "grpc" else "always-http"
    bootstrap: dict[str, Any] = yaml.safe_load(render("envoy", options)[f"envoy/{name}.yaml"])
    return bootstrap


def envoy_front(
    transport: str, tls: TlsFiles | None = None, **render_tls: str
) -> AbstractContextManager[Front]:
    """A context manager: upstream, server (optionally TLS) and the rendered Envoy."""

    @contextmanager
    def running() -> Iterator[Front]:
        processor, server = SERVERS[transport](POLICY, tls)
        with HttpUpstream(EchoWithCookie) as upstream, server:
            # The cluster verifies the server as `localhost`; the test's server listens on
            # 127.0.0.1, so the rendered name resolves to it, whatever the resolver prefers.
            host = "localhost" if tls else "127.0.0.1"
            bootstrap = rendered_envoy(
                transport, f"{host}:{server.port}", upstream.port, **render_tls
            )
            if tls:
                _pin_to_loopback(bootstrap)
            with EnvoyProcess(bootstrap) as envoy:
                yield Front(envoy, processor.seen)

    return running()


def _pin_to_loopback(bootstrap: dict[str, Any]) -> None:
    (cluster,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == NAME]
    cluster["type"] = "STATIC"
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"]["address"] = "127.0.0.1"


@pytest.fixture(scope="module", params=["grpc", "http"])
def front(request: pytest.FixtureRequest) -> Iterator[Front]:
    with envoy_front(request.param) as running:
        running.transport = request.param  # type: ignore[attr-defined]
        yield running


class TestCredentialsWithheld:
    def test_server_never_receives_a_credential(self, front):
        """No authorization, cookie, proxy-authorization or set-cookie reaches the server: not
        the value, not even the name; every name a hygiene rule needs does."""
        start, first = len(front.seen.raw), len(front.seen.header_names)
        status, _, _ = front.get({**CREDENTIALS, **HYGIENE_NAMES})
        assert status == 200
        request_names, response_names = front.seen.header_names[first:]
        assert set(HYGIENE_NAMES) <= request_names
        assert request_names.isdisjoint(CREDENTIALS)
        assert "set-cookie" not in response_names
        assert all(SECRET.encode() not in raw for raw in front.seen.raw[start:])

    def test_hygiene_still_works_and_the_upstream_keeps_the_credentials(self, front):
        """The request keeps its credentials on the way upstream and the cookie comes back,
        while the edge rules still strip the echoed and forwarding headers."""
        status, headers, received = front.get({**CREDENTIALS, **HYGIENE_NAMES})
        assert status == 200
        assert {name: received.get(name) for name in CREDENTIALS} == CREDENTIALS
        assert headers["set-cookie"] == f"id={SECRET}-set-cookie"
        assert "x-envoy-attempt-count" not in received
        assert "x-forwarded-host" not in received
        assert "strip-echoed-envoy-headers" in headers["x-extproc-actions"]


class TestFilterNames:
    def test_attributes_arrive_under_the_extension_name(self, front):
        """The doctor's filters have their own names, yet Envoy sends the attributes under
        `envoy.filters.http.ext_proc`, the key both adapters read."""
        front.get({})
        assert front.seen.attribute_keys == {core.ATTRIBUTES_KEY}

    def test_rendered_filters_have_the_doctor_names(self, front):
        """Envoy's config dump lists the doctor's ext_proc filters under the doctor's names."""
        _, static = front.envoy.admin_get("/config_dump")
        names = {f["name"] for f in _http_filters(json.loads(static))}
        expected = {EXT_PROC_FILTER} | (
            {EXT_PROC_RESPONSE_FILTER} if front.transport == "http" else set()
        )
        assert expected <= names
        assert "envoy.filters.http.ext_proc" not in names


def _http_filters(dump: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if isinstance(dump, dict):
        found += [f for f in dump.get("http_filters", []) if isinstance(f, dict)]
        for value in dump.values():
            found += _http_filters(value)
    elif isinstance(dump, list):
        for value in dump:
            found += _http_filters(value)
    return found


class TestCircuitBreakers:
    def test_envoy_reports_the_rendered_thresholds(self, front):
        """Envoy runs the ext_proc cluster with every threshold at the maximum, not its 1024."""
        _, text = front.envoy.admin_get("/clusters")
        for threshold in ("max_connections", "max_pending_requests", "max_requests", "max_retries"):
            assert f"{NAME}::default_priority::{threshold}::{UNLIMITED}" in text


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TlsFiles, Path]:
    """(the proxy's --extproc-mtls directory, the server's TLS files, the CA file)."""
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create("doctor")
    server = ca.issue(dns_names=["localhost"]).write(directory, "server")
    proxy_dir = directory / "proxy"
    proxy_dir.mkdir()
    client = ca.issue(spiffe_id="spiffe://cluster.local/ns/shop/sa/cart")
    (proxy_dir / "tls.crt").write_bytes(client.cert_pem + client.ca_pem)
    (proxy_dir / "tls.key").write_bytes(client.key_pem)
    (proxy_dir / "ca.crt").write_bytes(client.ca_pem)
    tls = TlsFiles(server.cert_chain, server.private_key, client_ca=server.trusted_ca)
    return proxy_dir, tls, server.trusted_ca


@pytest.mark.parametrize("transport", ["grpc", "http"])
class TestMutualTls:
    def test_served_with_the_rendered_client_certificate(self, transport, pki):
        """--extproc-mtls DIR: Envoy presents DIR's certificate; the server, requiring one,
        processes the request (the echoed header is stripped)."""
        proxy_dir, tls, _ = pki
        with envoy_front(transport, tls, extproc_mtls=str(proxy_dir)) as running:
            status, headers, received = running.get(HYGIENE_NAMES)
            assert status == 200
            assert "x-envoy-attempt-count" not in received
            assert "x-extproc-actions" in headers  # only the server writes it
            assert running.seen.header_names

    def test_refused_without_a_client_certificate(self, transport, pki):
        """--extproc-tls-ca alone: Envoy verifies the server but presents nothing; the server
        refuses, Envoy fails open, and nothing was processed."""
        _, tls, ca_file = pki
        with envoy_front(transport, tls, extproc_tls_ca=str(ca_file)) as running:
            status, headers, _ = running.get(HYGIENE_NAMES)
            assert status == 200
            # Envoy itself still removes the echoed header (native removal), but nothing
            # the server alone writes is there: it failed open.
            assert "x-extproc-actions" not in headers
            assert running.seen.raw == []
            assert running.stats("failure_mode_allowed") >= 1


class MeshSds(sds_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    """istio-agent's part: serves the workload certificate as `default` and the mesh root as
    `ROOTCA` over SDS (pkg/model/authentication.go:27-34 at istio/istio 86c9f01f)."""

    def __init__(self, workload: IssuedCert, root_pem: bytes) -> None:
        chain = DataSource(inline_bytes=workload.cert_pem + workload.ca_pem)
        key = DataSource(inline_bytes=workload.key_pem)
        self.secrets = {
            "default": Secret(
                name="default",
                tls_certificate=TlsCertificate(certificate_chain=chain, private_key=key),
            ),
            "ROOTCA": Secret(
                name="ROOTCA",
                validation_context=CertificateValidationContext(
                    trusted_ca=DataSource(inline_bytes=root_pem)
                ),
            ),
        }

    def StreamSecrets(self, request_iterator: Any, context: Any) -> Iterator[Any]:
        """Answer each subscription once; ACKs (they carry the nonce) need no answer."""
        for request in request_iterator:
            if request.response_nonce:
                continue
            resources = []
            for name in request.resource_names:
                packed = any_pb2.Any()
                packed.Pack(self.secrets[name])
                resources.append(packed)
            yield DiscoveryResponse(
                version_info="1", nonce="1", type_url=SECRET_TYPE, resources=resources
            )


SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


@contextmanager
def istio_agent(socket: Path, workload: IssuedCert, root_pem: bytes) -> Iterator[None]:
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    sds_grpc.add_SecretDiscoveryServiceServicer_to_server(MeshSds(workload, root_pem), server)
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    try:
        yield
    finally:
        server.stop(grace=None)


def istio_sidecar(upstream_port: int, server_port: int, sds_socket: Path) -> dict[str, Any]:
    """`render istio --extproc-mtls istio` applied as istiod applies it, with istio-agent's
    `sds-grpc` cluster and node; the doctor's Service name pinned to the test's server."""
    options = RenderOptions(mode=RenderMode.ALWAYS, extproc_mtls="istio")
    envoy_filters = list(yaml.safe_load_all(render("istio", options)["istio/always.yaml"]))
    bootstrap = apply_envoy_filter(envoy_filters, upstream_port)
    (cluster,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == NAME]
    cluster["type"] = "STATIC"
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"].update(address="127.0.0.1", port_value=server_port)
    sds = copy.deepcopy(ISTIO_SDS_STAND_IN)
    sds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] = {
        "pipe": {"path": str(sds_socket)}
    }
    bootstrap["static_resources"]["clusters"].append(sds)
    bootstrap["node"] = {
        "id": "sidecar~10.0.0.1~cart.shop~shop.svc.cluster.local",
        "cluster": "cart.shop",
    }
    return bootstrap


class TestIstioMeshIdentity:
    @pytest.mark.parametrize("same_mesh", [True, False], ids=["mesh-workload", "other-ca"])
    def test_sidecar_authenticates_with_its_workload_certificate(self, tmp_path, same_mesh):
        """With --extproc-mtls istio a sidecar presents the workload certificate istio-agent
        serves by SDS and verifies the server against ROOTCA: a server trusting the mesh root
        processes its requests; one whose client CA is another refuses, and Envoy fails open."""
        mesh = CertificateAuthority.create("mesh")
        other = CertificateAuthority.create("other")
        service = "extproc-doctor.extproc-doctor.svc.cluster.local"
        served = mesh.issue(dns_names=[service]).write(tmp_path, "server")
        client_ca = (
            served.trusted_ca if same_mesh else _write(tmp_path / "other.pem", other.cert_pem)
        )
        tls = TlsFiles(served.cert_chain, served.private_key, client_ca=client_ca)
        workload = mesh.issue(spiffe_id="spiffe://cluster.local/ns/shop/sa/cart")
        processor, server = grpc_server(POLICY, tls)
        socket = tmp_path / "sds.sock"
        with (
            HttpUpstream(EchoWithCookie) as upstream,
            server,
            istio_agent(socket, workload, mesh.cert_pem),
            EnvoyProcess(istio_sidecar(upstream.port, server.port, socket)) as envoy,
        ):
            port = envoy.listener_ports()["sidecar_outbound"]
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/", headers=HYGIENE_NAMES)
            response = conn.getresponse()
            response.read()
            annotated = response.getheader("x-extproc-actions") is not None
            conn.close()
        # Envoy removes the echoed header itself either way (native removal); what only the
        # server writes, and what it saw, tell a processed request from a failed-open one.
        assert annotated is same_mesh
        assert bool(processor.seen.raw) is same_mesh
        assert bool(processor.seen.raw) is same_mesh


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class HeldUpstream:
    """An upstream that holds every request until released, so their ext_proc streams stay
    open; it notes whether each request still carried the echoed header."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.arrived = asyncio.Condition()
        self.release = asyncio.Event()

    async def holding(self, count: int) -> None:
        """Return once `count` requests are held (bounded: a hang fails, never passes)."""
        async with self.arrived:
            await asyncio.wait_for(
                self.arrived.wait_for(lambda: len(self.heads) >= count), timeout=120
            )

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        async with self.arrived:
            self.heads.append(head.lower())
            self.arrived.notify_all()
        await self.release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()


async def _request(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nhost: held\r\nx-envoy-attempt-count: 3\r\n\r\n")
    await writer.drain()
    status = await reader.readline()
    writer.close()
    return status


class TestManyStreamsHeld:
    # More requests in flight than Envoy's default circuit breaker (1024) admits.
    IN_FLIGHT = 1100
    BATCH = 100  # sent a batch at a time, each held upstream before the next

    @pytest.mark.asyncio
    async def test_more_than_1024_streams_are_all_processed(self):
        """With 1100 requests in flight, each holding its ext_proc stream, every one is still
        processed (its echoed header stripped): none overflows the ext_proc cluster and
        fails open. Envoy's default thresholds would fail open the streams past 1024."""
        upstream = HeldUpstream()
        listener = await asyncio.start_server(upstream.handle, "127.0.0.1", 0, backlog=2048)
        try:
            open_streams, statuses, overflowed, failed_open = await self._hold(
                upstream, listener.sockets[0].getsockname()[1]
            )
        finally:
            listener.close()
            await listener.wait_closed()
        assert open_streams >= self.IN_FLIGHT
        assert all(status.startswith(b"HTTP/1.1 200") for status in statuses)
        assert (overflowed, failed_open) == (0, 0)
        assert not any(b"x-envoy-attempt-count" in head for head in upstream.heads)

    async def _hold(
        self, upstream: HeldUpstream, upstream_port: int
    ) -> tuple[int, list[bytes], int, int]:
        """Hold IN_FLIGHT requests upstream through the rendered Envoy, then release them:
        (ext_proc streams open while held, status lines, overflows, fail-opens)."""
        # The server admits them all: this test is about Envoy's breakers, not the door's.
        processor, server = grpc_server(POLICY, limits=StreamLimits(max_streams=2 * self.IN_FLIGHT))
        with server:
            bootstrap = rendered_envoy("grpc", f"127.0.0.1:{server.port}", upstream_port)
            # The test's own upstream cluster must not be the one that overflows.
            (target,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] != NAME]
            target["circuit_breakers"] = copy.deepcopy(CIRCUIT_BREAKERS)
            # A burst on two shared cores can keep the server past message_timeout: this
            # test is about the breakers, so the test's Envoy waits as long as it takes.
            for ext_proc in _http_filters(bootstrap):
                if ext_proc["name"] == EXT_PROC_FILTER:
                    ext_proc["typed_config"]["message_timeout"] = "60s"
            with EnvoyProcess(bootstrap) as envoy:
                front = Front(envoy, processor.seen)
                requests: list[asyncio.Future[bytes]] = []
                for _ in range(self.IN_FLIGHT // self.BATCH):
                    requests += [
                        asyncio.ensure_future(_request(front.port)) for _ in range(self.BATCH)
                    ]
                    await upstream.holding(len(requests))
                open_streams = front.gauge(f"cluster.{NAME}.upstream_rq_active")
                upstream.release.set()
                statuses = await asyncio.gather(*requests)
                overflowed = front.stats(f"cluster.{NAME}.upstream_rq_pending_overflow")
                failed_open = front.stats("failure_mode_allowed")
        return open_streams, statuses, overflowed, failed_open
