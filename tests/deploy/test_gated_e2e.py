"""The rendered standalone bootstrap, run by a real Envoy with the real server: gated mode at work."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
import structlog
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

    def status_line(self, path: str) -> bytes:
        """The response's status line, raw: http.client refuses a status that is not 3 digits."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as conn:
            conn.sendall(
                f"GET {path} HTTP/1.1\r\nhost: gated\r\nconnection: close\r\n\r\n".encode()
            )
            received = b""
            while b"\r\n" not in received and (chunk := conn.recv(4096)):
                received += chunk
        return received.split(b"\r\n", 1)[0]


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

    def test_header_present_with_an_empty_value_opens_the_gate(self, gated):
        """Presence is presence: an empty x-envoy-attempt-count is sent and stripped too."""
        before = gated.processor.streams
        status, headers, body = gated.get("/200", {"x-envoy-attempt-count": ""})
        assert status == 200
        assert "x-envoy-attempt-count" not in {k.lower() for k in json.loads(body)}
        assert headers["x-extproc-actions"].startswith("strip-echoed-envoy-headers")
        assert gated.processor.streams == before + 1

    def test_a_status_that_only_starts_with_5_is_not_a_5xx(self, gated):
        """Envoy passes an upstream's 4-digit status through; the 5xx test is `5[0-9][0-9]`,
        not the cheaper prefix "5", so such a response is not sent."""
        before = gated.processor.streams
        assert gated.status_line("/5000").split(b" ")[1] == b"5000"
        assert gated.processor.streams == before

    def test_a_failure_the_hygiene_gate_also_matched_counts_once(self, gated):
        """A 503 to a request carrying x-real-ip and x-envoy-attempt-count (both gated
        filters see the response): one diagnosis counted, one log line, the actions kept."""
        registry = gated.processor.metrics.registry

        def diagnosed() -> float:
            return (
                registry.get_sample_value(
                    "extproc_diagnoses_total", {"reason": "upstream_app_error"}
                )
                or 0.0
            )

        before = diagnosed()
        with structlog.testing.capture_logs() as logs:
            status, headers, _ = gated.get(
                "/503", {"x-real-ip": "203.0.113.7", "x-envoy-attempt-count": "3"}
            )
        assert status == 503
        assert headers["x-extproc-diagnosis"].startswith("upstream_app_error;status=503")
        assert "strip-echoed-envoy-headers" in headers["x-extproc-actions"]
        assert diagnosed() == before + 1
        assert [e["event"] for e in logs].count("upstream_failure") == 1
