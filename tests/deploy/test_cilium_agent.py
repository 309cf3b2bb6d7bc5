"""The rendered CiliumEnvoyConfig as cilium-agent would serve it: endpoints, redirects, a real Envoy.

The stand-in (cilium_agent.py) is first checked against Cilium's own recorded results;
then it says what a node would publish for the rendered CEC, and a real Envoy is fed
exactly that (EDS from files, cluster names untouched) with the Service's ports backed by
local upstreams and the doctor's Service backed by the real server.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config import Policy
from extproc.filter_config import GRPC, TRANSPORTS
from extproc.lab import BackgroundServer, EnvoyProcess, HttpUpstream
from extproc.render import RenderMode, RenderOptions, cilium
from extproc.render.options import GRPC_PORT, HTTP_PORT, NAME
from extproc.server import ExtProcServer

from .cilium_agent import Service, eds_resource_name, load_assignments, redirected_ports
from .placement import cilium_bootstrap
from .test_placed_e2e import ECHOED, ForgingEcho, get

CASES = yaml.safe_load((Path(__file__).parent / "data" / "cilium_agent_cases.yaml").read_text())
TARGET = "default/my-service:8080"
# The Service's other port, which must keep Cilium's own load balancing.
OTHER_PORT = 9901


def services(http_backend: int, other_backend: int, server: int) -> dict[str, Service]:
    """The target Service (two ports) and the doctor's (gRPC and HTTP lane) on 127.0.0.1."""
    target = Service(
        "default",
        "my-service",
        {"http": 8080, "admin": OTHER_PORT},
        (("http", http_backend), ("admin", other_backend)),
        ("127.0.0.1",),
    )
    doctor = Service(
        NAME,
        NAME,
        {"grpc": GRPC_PORT, "http": HTTP_PORT},
        (("grpc", server), ("http", server)),
        ("127.0.0.1",),
    )
    return {s.key: s for s in (target, doctor)}


def rendered(clusterwide: bool, transport: str = GRPC) -> dict[str, Any]:
    options = RenderOptions(mode=RenderMode.ALWAYS, cilium_service=TARGET, transport=transport)
    return cilium.render_envoy_config(options, clusterwide=clusterwide)


def eds_clusters(cec: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in cec["spec"]["resources"] if r.get("type") == "EDS"]


def case_services(case: dict[str, Any]) -> dict[str, Service]:
    out = {}
    for s in case["services"]:
        ports = tuple((name, port) for name, port in s["slice_ports"])
        service = Service(s["namespace"], s["name"], s["ports"], ports, tuple(s["addresses"]))
        out[service.key] = service
    return out


class TestStandInMatchesCilium:
    @pytest.mark.parametrize(
        "case", [c for c in CASES["cases"] if c["assignments"]], ids=lambda c: c["file"]
    )
    def test_published_assignments(self, case):
        """The stand-in publishes the assignments Cilium's own test recorded."""
        published = load_assignments(case["cec"], case_services(case))
        as_text = {name: [f"{a}:{p}" for a, p in eps] for name, eps in published.items()}
        assert as_text == case["assignments"]

    @pytest.mark.parametrize("case", CASES["cases"], ids=lambda c: c["file"])
    def test_redirected_ports(self, case):
        """The stand-in redirects the ports Cilium's own test recorded."""
        redirected = redirected_ports(case["cec"], case_services(case))
        assert redirected == {k: set(v) for k, v in case["redirected"].items()}


class TestRenderedCecOnANode:
    @pytest.mark.parametrize("clusterwide", [False, True])
    @pytest.mark.parametrize("transport", TRANSPORTS)
    def test_every_eds_cluster_gets_endpoints(self, clusterwide, transport):
        """Each EDS cluster of the CEC (the Service's and the doctor's) is published by the agent."""
        cec = rendered(clusterwide, transport)
        published = load_assignments(cec, services(1, 2, 3))
        wanted = {eds_resource_name(c) for c in eds_clusters(cec)}
        assert wanted - set(published) == set()
        assert len(wanted) == 2

    def test_the_route_gets_only_its_port(self):
        """The route's cluster holds the backends of the Service's own port, not every port's."""
        cec = rendered(False)
        published = load_assignments(cec, services(1111, 2222, 3333))
        assert published[TARGET] == [("127.0.0.1", 1111)]

    def test_the_doctor_is_reached_by_its_service(self):
        """The ext_proc cluster is EDS from the doctor's Service, not a DNS name cilium-envoy may not resolve."""
        cec = rendered(False)
        (server,) = [c for c in eds_clusters(cec) if c["name"].endswith(f"/{NAME}")]
        published = load_assignments(cec, services(1, 2, 3333))
        assert published[eds_resource_name(server)] == [("127.0.0.1", 3333)]

    def test_only_the_named_port_is_redirected(self):
        """Only the Service's own port enters the listener; its other ports keep Cilium's LB."""
        redirected = redirected_ports(rendered(False), services(1, 2, 3))
        assert redirected == {"default/my-service": {8080}}


class OtherPort(BaseHTTPRequestHandler):
    """The Service's other port: answers 418, which the listener must never reach."""

    def do_GET(self) -> None:
        self.send_response(418)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """A real Envoy with the rendered CEC, fed what the agent publishes; listener ports by name."""
    with ExitStack() as stack:
        http = stack.enter_context(HttpUpstream(ForgingEcho))
        other = stack.enter_context(HttpUpstream(OtherPort))
        server = stack.enter_context(BackgroundServer(ExtProcServer(Policy())))
        where = tmp_path_factory.mktemp("eds")
        cluster = services(http.port, other.port, server.port)
        bootstrap = cilium_bootstrap(rendered(False), cluster, where)
        yield stack.enter_context(EnvoyProcess(bootstrap)).listener_ports()


@pytest.mark.envoy
class TestRealEnvoyOnTheNode:
    def test_request_reaches_the_backend_through_the_doctor(self, node):
        """A request reaches the http port's backend, and the doctor acted on it on the way."""
        (port,) = node.values()
        status, _, received = get(port, ECHOED)
        assert status == 200
        # The outbound rules strip an echoed x-envoy-* header: only the doctor does that here.
        assert "x-envoy-attempt-count" not in received
