"""Span receivers for the real-Envoy trace tests: Zipkin JSON v2 over HTTP, and OTLP/gRPC.

Each keeps what it received as `Span`s (a name and string tags) and lets a test wait, with
a deadline, until a span that satisfies a condition has arrived. Envoy's Zipkin tracer
POSTs with chunked transfer encoding, so the Zipkin receiver reads chunks (http.server
does not decode them). The OTLP receiver is a real gRPC TraceService over the OTLP
messages xds-protos ships (Envoy's API imports them), served by a generic handler.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any, Self

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2

from extproc.lab import HttpUpstream

ZIPKIN_PATH = "/api/v2/spans"


@dataclass(frozen=True)
class Span:
    """A finished span as a backend stores it: its name, its tags, and the raw record."""

    name: str
    tags: dict[str, str]
    raw: dict[str, Any]


class _Spans:
    """The spans received so far, and a wait on a condition over them."""

    def __init__(self) -> None:
        self._spans: list[Span] = []
        self._changed = threading.Condition()

    def add(self, spans: list[Span]) -> None:
        with self._changed:
            self._spans.extend(spans)
            self._changed.notify_all()

    def wait_for(self, condition: Callable[[Span], bool], timeout: float = 20.0) -> Span:
        """The first span satisfying `condition`, waiting for it until `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for span in self._spans:
                    if condition(span):
                        return span
                left = deadline - time.monotonic()
                if left <= 0:
                    names = [(s.name, sorted(s.tags)) for s in self._spans]
                    raise TimeoutError(f"no such span within {timeout}s; received {names}")
                self._changed.wait(left)


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The request body, whole: Content-Length or chunked (RFC 9112 section 7.1)."""
    length = handler.headers.get("Content-Length")
    if length is not None:
        return handler.rfile.read(int(length))
    assert handler.headers.get("Transfer-Encoding", "").lower() == "chunked"
    body = b""
    while True:
        size = int(handler.rfile.readline().split(b";")[0], 16)
        if size == 0:
            while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return body
        body += handler.rfile.read(size)
        handler.rfile.readline()  # the chunk's CRLF


class ZipkinReceiver(_Spans):
    """A Zipkin collector on 127.0.0.1: `POST /api/v2/spans` with a JSON list of spans."""

    def __init__(self) -> None:
        super().__init__()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = _read_body(self)
                if self.path == ZIPKIN_PATH:
                    receiver.add([_zipkin_span(s) for s in json.loads(body)])
                self.send_response(202 if self.path == ZIPKIN_PATH else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                """Quiet."""

        self._server = HttpUpstream(Handler)

    @property
    def port(self) -> int:
        return self._server.port

    def __enter__(self) -> Self:
        self._server.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.__exit__(kind, exc, tb)


def _zipkin_span(record: dict[str, Any]) -> Span:
    return Span(record.get("name", ""), dict(record.get("tags", {})), record)


TRACE_SERVICE = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name


class OtlpReceiver(_Spans):
    """An OpenTelemetry collector on 127.0.0.1: the OTLP/gRPC TraceService's Export."""

    def __init__(self) -> None:
        super().__init__()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        export = grpc.unary_unary_rpc_method_handler(
            self.Export,
            request_deserializer=trace_service_pb2.ExportTraceServiceRequest.FromString,
            response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
        )
        handler = grpc.method_handlers_generic_handler(TRACE_SERVICE, {"Export": export})
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.add(
            [
                Span(span.name, {a.key: _text(a.value) for a in span.attributes}, {})
                for resource in request.resource_spans
                for scope in _scopes(resource)
                for span in scope.spans
            ]
        )
        return trace_service_pb2.ExportTraceServiceResponse()

    def __enter__(self) -> Self:
        self._server.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.stop(grace=None)


def _scopes(resource: Any) -> Any:
    """ResourceSpans field 2: `scope_spans` since OTLP 0.15, `instrumentation_library_spans`
    before, the same wire shape. xds-protos ships the older copy; an installed
    opentelemetry-proto overwrites the same files, so which one is there depends on the
    install order: read the field by its number."""
    return getattr(resource, resource.DESCRIPTOR.fields_by_number[2].name)


def _text(value: common_pb2.AnyValue) -> str:
    """An attribute's value as the string Envoy set (custom tags are strings)."""
    kind = value.WhichOneof("value")
    return "" if kind is None else str(getattr(value, kind))
