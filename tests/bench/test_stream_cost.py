"""bench/stream_cost.py: the recorded stream is Envoy's, and both servers run it whole."""

from __future__ import annotations

import asyncio
import json

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from bench import stream_cost
from extproc.server import ExternalProcessor


def test_the_recorded_stream_is_a_clean_exchange_from_envoy_1_40():
    """Request headers, then a clean 200's response headers with Envoy's attributes."""
    document = json.loads(stream_cost.DATA.read_text(encoding="utf-8"))
    assert "/1.40." in document["envoy"]
    request, response = (pb.ProcessingRequest.FromString(raw) for raw in stream_cost.recorded())
    assert request.WhichOneof("request") == "request_headers"
    assert response.WhichOneof("request") == "response_headers"
    fields = response.attributes["envoy.filters.http.ext_proc"].fields
    assert fields["response.flags"].number_value == 0
    assert response.response_headers.headers.headers[0].raw_value == b"200"


def test_ours_answers_both_messages_of_every_stream(monkeypatch):
    """What callgrind counts is the real work: each stream's two messages answered."""
    servers: list[ExternalProcessor] = []
    original = ExternalProcessor.__init__

    def keep(self, *args, **kwargs):
        original(self, *args, **kwargs)
        servers.append(self)

    monkeypatch.setattr(ExternalProcessor, "__init__", keep)
    asyncio.run(stream_cost.run("ours", 3))
    (server,) = servers
    assert server.tallies["request_headers"].count == 3
    assert server.tallies["response_headers"].count == 3
    assert server.metrics.stream_count.opened == 3 and server.metrics.stream_count.active == 0


def test_the_naive_servicer_runs_the_same_stream(monkeypatch):
    """The yardstick answers each message with a continue of its kind."""
    answered: list[str] = []
    real = pb.ProcessingResponse.SerializeToString

    def note(self):
        answered.append(self.WhichOneof("response"))
        return real(self)

    monkeypatch.setattr(pb.ProcessingResponse, "SerializeToString", note)
    asyncio.run(stream_cost.run("naive", 2))
    assert answered == ["request_headers", "response_headers"] * 2
