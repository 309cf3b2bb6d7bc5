"""The HTTP lane's limits against what a real Envoy 1.40 sends: its largest legal request fits.

The lane's body cap (`http_lane.MAX_BODY`) is sized from Envoy's own ceiling for a request's
header block (`max_request_headers_kb` at most 8192 KiB): the rendered `--transport http`
bootstrap, with the header limit raised to that ceiling and `max_headers_count` to the
10,000 headers the cap allows for, must carry a request with headers up to the limit
through both filters, the lane processing each message (no 413, no failing open). The
head Envoy POSTs must sit far inside the lane's head caps.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from extproc import http_lane
from extproc.config import policy_from_mapping
from extproc.http_lane import HttpLane, HttpProcessor
from extproc.lab import BackgroundServer, EnvoyProcess
from extproc.lab.envoy import EnvoyError, free_port, validate
from extproc.render import RenderMode, RenderOptions, render
from extproc.render.envoy_bootstrap import LISTENER

pytestmark = pytest.mark.envoy

# The lane answers 8 MiB messages well within this on a loaded machine; the rendered 0.5 s
# is for ordinary ones. The test is about size, not time.
SLOW_ENOUGH = "20s"
POLICY = policy_from_mapping({"response_annotations": "on"})


class Sizes(HttpProcessor):
    """The real processor, keeping the size of every body Envoy POSTs."""

    def __init__(self) -> None:
        super().__init__(POLICY)
        self.sizes: list[int] = []

    def answer(self, body: bytes, declared: Any = None) -> bytes:
        self.sizes.append(len(body))
        return super().answer(body, declared)


def _at_the_ceiling(node: Any) -> None:
    """Raise every header limit to Envoy's ceiling and every ext_proc timeout to SLOW_ENOUGH."""
    if isinstance(node, dict):
        if "stat_prefix" in node and "http_filters" in node:  # the HCM
            node["max_request_headers_kb"] = http_lane.ENVOY_MAX_HEADER_BYTES // 1024
            options = node.setdefault("common_http_protocol_options", {})
            options["max_headers_count"] = http_lane.ENVOY_MAX_HEADERS_COUNT + 50
        if "message_timeout" in node:
            node["message_timeout"] = SLOW_ENOUGH
        if "http_uri" in node:
            node["http_uri"]["timeout"] = SLOW_ENOUGH
        for value in node.values():
            _at_the_ceiling(value)
    elif isinstance(node, list):
        for value in node:
            _at_the_ceiling(value)


class Lane:
    def __init__(self, envoy: EnvoyProcess, processor: Sizes, heads: list[bytes]) -> None:
        self.envoy = envoy
        self.processor = processor
        self.heads = heads

    def send(self, headers: list[tuple[str, str]]) -> bytes:
        """One request with these headers, raw (http.client would take long to build 8 MiB)."""
        lines = b"".join(b"%s: %s\r\n" % (n.encode(), v.encode()) for n, v in headers)
        port = self.envoy.listener_ports()[LISTENER]
        with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
            conn.sendall(b"GET /x HTTP/1.1\r\nhost: shop\r\n%sconnection: close\r\n\r\n" % lines)
            received = b""
            while chunk := conn.recv(65536):
                received += chunk
        return received.split(b"\r\n\r\n", 1)[0]


@pytest.fixture(scope="module")
def lane() -> Iterator[Lane]:
    processor = Sizes()
    heads: list[bytes] = []
    original = http_lane._Connection.data_received

    def recording(self: Any, data: bytes) -> None:
        if b"\r\n\r\n" in data[:4096]:
            heads.append(data[: data.index(b"\r\n\r\n") + 4])
        original(self, data)

    with (
        pytest.MonkeyPatch.context() as patch,
        BackgroundServer(HttpLane(processor, "127.0.0.1:0")) as server,
    ):
        patch.setattr(http_lane._Connection, "data_received", recording)
        options = RenderOptions(
            mode=RenderMode.ALWAYS,
            transport="http",
            policy=POLICY,
            extproc_address=f"127.0.0.1:{server.port}",
            envoy_listen="127.0.0.1:0",
            upstream=f"127.0.0.1:{free_port()}",  # refused: both phases have work to do
        )
        bootstrap = yaml.safe_load(render("envoy", options)["envoy/always-http.yaml"])
        _at_the_ceiling(bootstrap)
        with EnvoyProcess(bootstrap) as envoy:
            yield Lane(envoy, processor, heads)


def headers_filling(budget: int, count: int) -> list[tuple[str, str]]:
    """`count` headers whose wire size (name, ": ", value, CRLF) adds up to `budget` bytes."""
    per_header = budget // count
    return [(f"x-h{i:05d}", "v" * (per_header - 12)) for i in range(count)]


class TestEnvoysLargestRequest:
    @pytest.mark.parametrize("count", [95, http_lane.ENVOY_MAX_HEADERS_COUNT])
    def test_headers_at_envoys_ceiling_are_processed(self, lane, count):
        """8 MiB of headers (Envoy's ceiling, less the request line) in `count` headers reach the
        lane and are answered: the request phase's message is near the cap's size yet under it."""
        before = len(lane.processor.sizes)
        # The request line, host and connection lines take about 50 bytes of the ceiling;
        # Envoy 1.40 refused a head 58 bytes under it (431, http1.headers_too_large): leave 1 KiB.
        head = lane.send(headers_filling(http_lane.ENVOY_MAX_HEADER_BYTES - 1024, count))
        assert head.startswith(b"HTTP/1.1 503"), (head[:200], lane.envoy.log_tail(20))
        assert b"x-extproc-diagnosis: upstream_refused" in head  # both phases were answered
        request_phase, _response_phase = lane.processor.sizes[before:]
        assert request_phase > http_lane.ENVOY_MAX_HEADER_BYTES * 4 // 3 * 0.99
        assert request_phase <= http_lane.MAX_BODY
        for error in ("too_large", "overloaded", "headers_too_large", "timeout"):
            assert lane.processor.errors[error]._value.get() == 0

    def test_envoys_post_head_is_far_inside_the_head_caps(self, lane):
        """What Envoy puts before the JSON: a few hundred bytes, a handful of headers."""
        lane.send([("x-small", "1")])
        head = lane.heads[-1]
        assert len(head) < http_lane.MAX_HEAD // 16
        assert head.count(b"\r\n") - 2 < http_lane.MAX_HEADERS // 4
        target = head.split(b" ")[1]
        assert len(target) < http_lane.MAX_URL // 64


class TestEnvoysCeiling:
    def test_envoy_refuses_a_header_limit_above_the_one_the_cap_is_sized_for(self):
        """Envoy 1.40 loads `max_request_headers_kb: 8192` and rejects 8193: the cap's premise."""
        bootstrap = yaml.safe_load(
            render("envoy", RenderOptions(mode=RenderMode.ALWAYS, transport="http"))[
                "envoy/always-http.yaml"
            ]
        )
        _at_the_ceiling(bootstrap)
        validate(bootstrap)
        hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        hcm["typed_config"]["max_request_headers_kb"] += 1
        with pytest.raises(EnvoyError, match="max_request_headers_kb"):
            validate(bootstrap)
