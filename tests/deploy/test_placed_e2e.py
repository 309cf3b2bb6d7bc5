"""Every rendered target, placed as its control plane places it, run by a real Envoy with the real server.

Two behaviours: what the upstream receives at each Istio context (the edge rules at the
gateway only, though Istio marks the gateway's listener OUTBOUND like a sidecar's), and
that an upstream cannot forge the doctor's annotations (`x-extproc-*` sent by the
upstream never reach the client, also on responses the server never sees).
"""

from __future__ import annotations

import http.client
import json
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config import Policy
from extproc.filter_config import ANNOTATION_HEADERS
from extproc.lab import BackgroundServer, EnvoyProcess, HttpUpstream
from extproc.render import RenderMode, RenderOptions, render
from extproc.render.options import GRPC_PORT, NAME
from extproc.server import ExtProcServer

from .cilium_agent import Service
from .placement import apply_envoy_filter, cilium_bootstrap

pytestmark = pytest.mark.envoy

FORGED = "upstream_app_error;forged=?1"
CILIUM_SERVICE = "default/my-service:8080"
# A client's headers that the edge rules remove and a sidecar keeps (forwarding), and one
# that the echoed-headers rule removes at the edge and outbound, not inbound.
FORWARDING = {
    "x-real-ip": "6.6.6.6",
    "forwarded": "for=6.6.6.6",
    "x-forwarded-host": "evil.example",
}
ECHOED = {"x-envoy-attempt-count": "3"}


class ForgingEcho(BaseHTTPRequestHandler):
    """Answers 200 with the request headers it received (JSON), and forged annotations."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        for name in ANNOTATION_HEADERS:
            self.send_header(name, FORGED)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


def get(port: int, headers: dict[str, str]) -> tuple[int, dict[str, str], dict[str, str]]:
    """(status, response headers, the request headers the upstream received)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/", headers=headers)
        response = conn.getresponse()
        received = json.loads(response.read())
        return response.status, {k.lower(): v for k, v in response.getheaders()}, received
    finally:
        conn.close()


def placed(
    target: str, mode: RenderMode, server: int, upstream: int, where: Path
) -> dict[str, Any]:
    """The target's rendered config as one bootstrap whose listeners route to `upstream`.

    Cilium's clusters (the Service's and the doctor's) get their endpoints as cilium-agent
    would publish them from the two Services, each backed on 127.0.0.1.
    """
    options = RenderOptions(
        mode=mode,
        # Cilium reaches the doctor through its Service; the others at a fixed address.
        extproc_address=None if target == "cilium" else f"127.0.0.1:{server}",
        envoy_listen="127.0.0.1:0",
        upstream=f"127.0.0.1:{upstream}",
        cilium_service=CILIUM_SERVICE,
    )
    (text, *_) = render(target, options).values()
    documents = list(yaml.safe_load_all(text))
    match target:
        case "istio":
            return apply_envoy_filter(documents, upstream)
        case "cilium":
            return cilium_bootstrap(documents[0], cilium_services(server, upstream), where)
    return documents[0]


def cilium_services(server: int, upstream: int) -> dict[str, Service]:
    """The Service the CEC is for, and the doctor's, as EndpointSlices on 127.0.0.1."""
    namespace, name_port = CILIUM_SERVICE.split("/")
    name, port = name_port.split(":")
    target = Service(namespace, name, {"http": int(port)}, (("http", upstream),), ("127.0.0.1",))
    doctor = Service(NAME, NAME, {"grpc": GRPC_PORT}, (("grpc", server),), ("127.0.0.1",))
    return {s.key: s for s in (target, doctor)}


TARGET_MODES = [("istio", RenderMode.GATED), ("istio", RenderMode.ALWAYS)]
TARGET_MODES += [("cilium", RenderMode.ALWAYS)]
TARGET_MODES += [("envoy", RenderMode.GATED), ("envoy", RenderMode.ALWAYS)]


@contextmanager
def started(target: str, mode: RenderMode) -> Iterator[dict[str, int]]:
    """Envoy with the placed config, the real server and the upstream: listener ports by name."""
    with ExitStack() as stack:
        upstream = stack.enter_context(HttpUpstream(ForgingEcho))
        server = stack.enter_context(BackgroundServer(ExtProcServer(Policy())))
        where = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        bootstrap = placed(target, mode, server.port, upstream.port, where)
        yield stack.enter_context(EnvoyProcess(bootstrap)).listener_ports()


@pytest.fixture(scope="module", params=TARGET_MODES, ids=lambda p: f"{p[0]}-{p[1]}")
def running(request: pytest.FixtureRequest) -> Iterator[dict[str, int]]:
    """Each target in each of its modes, running."""
    with started(*request.param) as ports:
        yield ports


@pytest.fixture(scope="module", params=list(RenderMode))
def istio(request: pytest.FixtureRequest) -> Iterator[dict[str, int]]:
    """The EnvoyFilter applied to one listener per Istio context, running."""
    with started("istio", request.param) as ports:
        yield ports


class TestAnnotationsCannotBeForged:
    def test_upstream_annotations_never_reach_the_client(self, running):
        """On a 200 the upstream's own x-extproc-* headers are removed, at every listener."""
        for name, port in running.items():
            status, headers, _ = get(port, {})
            assert status == 200, name
            forged = {h: headers[h] for h in ANNOTATION_HEADERS if h in headers}
            assert forged == {}, name

    def test_with_the_server_involved_too(self, running):
        """A request the server does see (an echoed header) is answered with no forged annotation."""
        for name, port in running.items():
            _, headers, _ = get(port, ECHOED)
            assert FORGED not in headers.values(), name


# The Istio contexts' listeners by name, and what their upstream must receive.
KEPT_AT = {
    "gateway": {"forwarding": False, "echoed": False},
    "sidecar_outbound": {"forwarding": True, "echoed": False},
    "sidecar_inbound": {"forwarding": True, "echoed": True},
}


class TestIstioContexts:
    @pytest.mark.parametrize("listener", list(KEPT_AT))
    def test_what_the_upstream_receives(self, istio, listener):
        """The edge rules apply at the gateway only; echoed x-envoy-* go at the gateway and outbound.

        Istio marks the gateway's listener OUTBOUND, as a sidecar's: only the filter's
        `x-extproc-direction` metadata tells the server it is the edge.
        """
        _, _, received = get(istio[listener], FORWARDING | ECHOED)
        kept = KEPT_AT[listener]
        for name, value in FORWARDING.items():
            assert (received.get(name) == value) is kept["forwarding"], (listener, name)
        assert ("x-envoy-attempt-count" in received) is kept["echoed"], listener
