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

import http.client
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc import core
from extproc.config import Exposure, Policy, TlsFiles
from extproc.filter_config import EXT_PROC_FILTER, EXT_PROC_RESPONSE_FILTER, UNLIMITED
from extproc.http_lane import HttpLane, HttpProcessor
from extproc.lab import BackgroundServer, EnvoyProcess, HttpUpstream
from extproc.lab.certs import CertificateAuthority
from extproc.render import RenderMode, RenderOptions, render
from extproc.render.envoy_bootstrap import LISTENER
from extproc.render.options import NAME
from extproc.server import ExternalProcessor, ExtProcServer
from extproc.tls import ReloadingSslContext

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

    def __init__(self, policy: Policy) -> None:
        super().__init__(policy)
        self.seen = Witness()

    def _answer(self, policy: Policy, request: Any, state: Any) -> Any:
        kind = request.WhichOneof("request")
        if kind in ("request_headers", "response_headers"):
            headers = getattr(request, kind).headers.headers
            self.seen.header_names.append({h.key for h in headers})
        self.seen.attribute_keys.update(request.attributes.keys())
        self.seen.raw.append(request.SerializeToString())
        return super()._answer(policy, request, state)


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


def grpc_server(policy: Policy, tls: TlsFiles | None = None) -> tuple[Any, BackgroundServer]:
    processor = GrpcWitness(policy)
    return processor, BackgroundServer(ExtProcServer(policy, servicer=processor, tls=tls))


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
    from contextlib import contextmanager

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
            status, _, received = running.get(HYGIENE_NAMES)
            assert status == 200
            assert "x-envoy-attempt-count" not in received
            assert running.seen.header_names

    def test_refused_without_a_client_certificate(self, transport, pki):
        """--extproc-tls-ca alone: Envoy verifies the server but presents nothing; the server
        refuses, Envoy fails open, and nothing was processed."""
        _, tls, ca_file = pki
        with envoy_front(transport, tls, extproc_tls_ca=str(ca_file)) as running:
            status, _, received = running.get(HYGIENE_NAMES)
            assert status == 200
            assert received.get("x-envoy-attempt-count") == "3"  # not cleaned: failed open
            assert running.seen.raw == []
            assert running.stats("failure_mode_allowed") >= 1
