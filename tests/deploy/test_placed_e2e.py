"""Every rendered target, placed as its control plane places it, run by a real Envoy with the real server.

What the upstream receives at each Istio context (the edge rules at the gateway only,
though Istio marks the gateway's listener OUTBOUND like a sidecar's); that an upstream
cannot forge the doctor's annotations (`x-extproc-*` sent by the upstream never reach the
client, also on responses the server never sees); and what holds with the server down:
Envoy itself removes the reveal token everywhere and, where the rendered policy enforces
a strip rule on fixed names, those names (threat-model T23, T24).
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

from extproc.config import Policy, policy_from_mapping
from extproc.filter_config import ANNOTATION_HEADERS
from extproc.lab import BackgroundServer, EnvoyProcess, HttpUpstream
from extproc.lab.envoy import free_port
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
    target: str,
    mode: RenderMode,
    server: int,
    upstream: int,
    where: Path,
    policy: Policy | None = None,
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
        policy=policy or Policy(),
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
def started(
    target: str, mode: RenderMode, *, policy: Policy | None = None, server_up: bool = True
) -> Iterator[dict[str, int]]:
    """Envoy with the placed config (rendered with `policy`), the real server serving it
    (or, without `server_up`, nothing where the server should be) and the upstream:
    listener ports by name."""
    policy = policy or Policy()
    with ExitStack() as stack:
        upstream = stack.enter_context(HttpUpstream(ForgingEcho))
        if server_up:
            server = stack.enter_context(BackgroundServer(ExtProcServer(policy))).port
        else:
            server = free_port()
        where = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        bootstrap = placed(target, mode, server, upstream.port, where, policy)
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


REVEAL = {"x-extproc-reveal": "op3rator-reveal-token-2026"}
REPORTING = policy_from_mapping({"mode": "report"})


def place_of(listener: str) -> str:
    """Where a placed listener sits: Istio's contexts by name; Cilium's (by default) and the
    plain Envoy's are the edge."""
    return {"sidecar_outbound": "outbound", "sidecar_inbound": "inbound"}.get(listener, "edge")


# What the upstream must receive at each place when Envoy itself removes what the policy
# strips by a fixed name (enforce, the defaults).
KEPT_WHEN_DOWN = {
    "edge": {"forwarding": False, "echoed": False},
    "outbound": {"forwarding": True, "echoed": False},
    "inbound": {"forwarding": True, "echoed": True},
}


@pytest.fixture(scope="module", params=TARGET_MODES, ids=lambda p: f"{p[0]}-{p[1]}")
def server_down(request: pytest.FixtureRequest) -> Iterator[dict[str, int]]:
    """Each target in each of its modes, with nothing where the server should be."""
    with started(*request.param, server_up=False) as ports:
        yield ports


class TestWithTheServerDown:
    """T23, T24: what the policy strips by a fixed name holds while Envoy fails open."""

    def test_fixed_names_removed_by_envoy(self, server_down):
        """Every target's rendered config removes, with the server down, the reveal
        header everywhere, echoed x-envoy-* at the edge and outbound, and the edge's
        forwarding headers; what a place keeps is kept."""
        for name, port in server_down.items():
            status, _, received = get(port, FORWARDING | ECHOED | REVEAL)
            assert status == 200, name
            kept = KEPT_WHEN_DOWN[place_of(name)]
            assert "x-extproc-reveal" not in received, name
            for header, value in FORWARDING.items():
                assert (received.get(header) == value) is kept["forwarding"], (name, header)
            assert ("x-envoy-attempt-count" in received) is kept["echoed"], name

    @pytest.mark.parametrize(("target", "mode"), TARGET_MODES, ids=str)
    def test_report_mode_renders_no_removal_but_the_token(self, target, mode):
        """Rendered with mode: report, Envoy removes nothing the server would only report,
        with the server down: only the reveal header, which never goes upstream."""
        with started(target, mode, policy=REPORTING, server_up=False) as ports:
            for name, port in ports.items():
                _, _, received = get(port, FORWARDING | ECHOED | REVEAL)
                assert "x-extproc-reveal" not in received, name
                assert {**FORWARDING, **ECHOED}.items() <= received.items(), name


class TestTheRevealToken:
    def test_never_reaches_the_upstream(self, running):
        """The reveal header never reaches an upstream, also in gated mode, where the
        policy has no token and the gate never sends the request to the server."""
        for name, port in running.items():
            _, _, received = get(port, REVEAL)
            assert "x-extproc-reveal" not in received, name


class TestReportModeStillReports:
    def test_outbound_reports_what_it_keeps(self):
        """mode: report at an Istio outbound sidecar (server up): the echoed header reaches
        the upstream and x-extproc-actions reports it."""
        with started("istio", RenderMode.ALWAYS, policy=REPORTING) as ports:
            _, headers, received = get(ports["sidecar_outbound"], ECHOED)
        assert received.get("x-envoy-attempt-count") == "3"
        assert "strip-echoed-envoy-headers" in headers["x-extproc-actions"]
        assert ";report" in headers["x-extproc-actions"]
