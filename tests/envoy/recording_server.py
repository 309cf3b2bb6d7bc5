"""A recording ext_proc server: lets the lab run end-to-end without the real server.

The project's own server with a recording servicer, on its own event loop in a
background thread, so the lab and the tests can stay synchronous while it answers Envoy. It changes nothing: every message gets an empty continue of the matching
kind, and what Envoy sent is kept as plain data.

Kept out of `conftest.py` so that tests can import its types.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf.json_format import MessageToDict

from extproc.config import Policy
from extproc.lab.background import BackgroundServer
from extproc.server import CONTINUE, ExtProcServer

ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"
# Tests tag each request with this header to find its exchange again.
TAG_HEADER = "x-lab-tag"


@dataclass
class Exchange:
    """What Envoy sent over one ext_proc stream (one HTTP request)."""

    request_headers: dict[str, str] = field(default_factory=dict)
    request_attributes: dict[str, Any] = field(default_factory=dict)
    response_headers: dict[str, str] = field(default_factory=dict)
    response_attributes: dict[str, Any] = field(default_factory=dict)

    def record(self, message: pb.ProcessingRequest) -> None:
        """Keep the headers and attributes of a headers message."""
        kind = message.WhichOneof("request")
        if kind not in ("request_headers", "response_headers"):
            return
        headers = _headers(getattr(message, kind).headers)
        attributes = _attributes(message)
        if kind == "request_headers":
            self.request_headers, self.request_attributes = headers, attributes
        else:
            self.response_headers, self.response_attributes = headers, attributes


def _headers(headers: Any) -> dict[str, str]:
    # Envoy 1.40 fills raw_value; `value` is read too for older Envoy.
    return {h.key: h.raw_value.decode("latin-1") or h.value for h in headers.headers}


def _attributes(message: pb.ProcessingRequest) -> dict[str, Any]:
    if ATTRIBUTES_KEY not in message.attributes:
        return {}
    attributes: dict[str, Any] = MessageToDict(message.attributes[ATTRIBUTES_KEY])
    return attributes


class RecordingProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """An ext_proc servicer that lets everything through and remembers what it saw."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._exchanges: list[Exchange] = []

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[pb.ProcessingResponse]:
        """Record each message, then answer it with an empty continue."""
        exchange = Exchange()
        with self._lock:
            self._exchanges.append(exchange)
        async for message in request_iterator:
            exchange.record(message)
            yield CONTINUE[message.WhichOneof("request")]

    def exchanges(self) -> list[Exchange]:
        """Every exchange so far, oldest first."""
        with self._lock:
            return list(self._exchanges)

    def exchange(self, tag: str) -> Exchange:
        """The exchange of the request sent with `TAG_HEADER: tag`."""
        with self._lock:
            found = [e for e in self._exchanges if e.request_headers.get(TAG_HEADER) == tag]
        assert len(found) == 1, f"{len(found)} ext_proc exchanges tagged {tag!r}"
        return found[0]


class RecordingServer(BackgroundServer):
    """A `RecordingProcessor` behind the real server's gRPC stack, from a background thread."""

    def __init__(self) -> None:
        self.processor = RecordingProcessor()
        super().__init__(ExtProcServer(Policy(), servicer=self.processor))
