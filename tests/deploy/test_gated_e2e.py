"""The rendered standalone bootstrap, run by a real Envoy with the real server: gated mode at work."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
import yaml

from extproc.config import Exposure, Policy
from extproc.lab import BackgroundServer, EnvoyProcess, HttpUpstream
from extproc.render import RenderMode, RenderOptions, render
from extproc.render.envoy_bootstrap import LISTENER
from extproc.server import ExternalProcessor, ExtProcServer

pytestmark = pytest.mark.envoy


class StatusByPath(BaseHTTPRequestHandler):
    """Answers GET /<status> with that status and, as JSON, the headers it received."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps(dict(self.headers.items())).encode()
        self.send_response(int(self.path.strip("/")))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


class CountingProcessor(ExternalProcessor):
    """The real processor, counting the streams Envoy opens."""

    streams = 0

    async def Process(self, request_iterator: Any, context: Any) -> None:
        self.streams += 1
        await super().Process(request_iterator, context)


class Gated:
    def __init__(self, envoy: EnvoyProcess, processor: CountingProcessor) -> None:
        self.port = envoy.listener_ports()[LISTENER]
        self.processor = processor

    def get(
        self, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def gated() -> Iterator[Gated]:
    """Envoy from `extproc render envoy --mode gated`, pointed at a test upstream and the real server."""
    policy = Policy(response_annotations=Exposure.ON)  # the rendered Envoy is the edge
    processor = CountingProcessor(policy)
    with (
        HttpUpstream(StatusByPath) as upstream,
        BackgroundServer(ExtProcServer(policy, servicer=processor)) as server,
    ):
        options = RenderOptions(
            mode=RenderMode.GATED,
            extproc_address=f"127.0.0.1:{server.port}",
            envoy_listen="127.0.0.1:0",
            upstream=f"127.0.0.1:{upstream.port}",
        )
        bootstrap = yaml.safe_load(render("envoy", options)["envoy/gated.yaml"])
        with EnvoyProcess(bootstrap) as envoy:
            yield Gated(envoy, processor)


class TestGatedMode:
    def test_success_never_reaches_the_server(self, gated):
        """A 200 and the upstream's own 404 pass through Envoy without an ext_proc stream."""
        before = gated.processor.streams
        for path in ("/200", "/404", "/200"):
            status, headers, _ = gated.get(path)
            assert status == int(path[1:])
            assert not any(name.startswith("x-extproc-") for name in headers)
        assert gated.processor.streams == before

    def test_failure_reaches_the_server_and_is_annotated(self, gated):
        """A 503 opens one stream and comes back with the diagnosis and the hint."""
        before = gated.processor.streams
        status, headers, _ = gated.get("/503")
        assert status == 503
        assert headers["x-extproc-diagnosis"].startswith("upstream_app_error;status=503")
        # The response-only call never saw the request: the Host comes from request.host.
        assert ';host="' in headers["x-extproc-diagnosis"]
        assert "x-extproc-hint" in headers
        assert gated.processor.streams == before + 1

    def test_request_hygiene_is_gated_by_header_presence(self, gated):
        """A request carrying an echoed x-envoy header is sent, cleaned, and says so."""
        before = gated.processor.streams
        status, headers, body = gated.get("/200", {"x-envoy-attempt-count": "3"})
        assert status == 200
        assert "x-envoy-attempt-count" not in {k.lower() for k in json.loads(body)}
        assert headers["x-extproc-actions"].startswith("strip-echoed-envoy-headers")
        assert gated.processor.streams == before + 1
