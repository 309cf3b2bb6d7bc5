"""The HTTP adapter: ext_proc's `http_service` protocol, JSON in, JSON out.

Envoy POSTs each `ProcessingRequest` as proto3 JSON (snake_case field names, header
values as base64 `raw_value`) over pooled HTTP/1.1 connections, on whatever path its
`http_uri` names, and reads a JSON `ProcessingResponse` back. The two header phases
come from two single-phase filters (one filter with both loses the second answer), so
what the response needs from the request travels in our metadata namespace
(`core.Carried`, forwarded back by the response filter's `forwarding_namespaces`).

Three layers, as in the gRPC adapter: `HttpProcessor.answer` is bytes in, bytes out
(parse with orjson, read the fields the core needs straight from the dicts, call the
core, serialise); `_Connection` only frames HTTP/1.1 with httptools; `HttpLane` owns the
listener, the readiness endpoint (`GET /ready`), timeouts and the drain. A bad envelope
(not JSON, too large, no message kind) gets an HTTP error and a counter before the core
runs; an exception in the core becomes a continue and `processing_failed`, in one place.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import math
import ssl
import time
from collections.abc import Mapping
from typing import Any, cast

import httptools
import orjson
import structlog

from extproc import core
from extproc.config import Direction, Policy
from extproc.core import Answer
from extproc.envoy_admin import ClusterTlsCache
from extproc.filter_config import DIRECTION_METADATA, METADATA_NAMESPACE
from extproc.metrics import MESSAGE_KINDS, Metrics

log = structlog.get_logger("extproc")

TRANSPORT = "http"
# A ProcessingRequest with headers only; Envoy's own header limit (max_request_headers_kb)
# is at most 8 MiB, which base64 and JSON make about 11 MiB.
MAX_BODY = 16 * 1024 * 1024
# A message must arrive whole this soon after its first byte (a slow client), and an
# idle connection is closed after this long (a half-open one). The rendered cluster
# closes its own idle connections sooner (`filter_config.HTTP_IDLE_TIMEOUT`), so Envoy
# never sends into a connection the server is closing.
MESSAGE_SECONDS = 10.0
IDLE_SECONDS = 300.0
SWEEP_SECONDS = 1.0  # how often connections are checked against the two limits
READY_PATH = b"/ready"

_KINDS = frozenset(MESSAGE_KINDS)
_DIRECTION_HEADER = DIRECTION_METADATA.encode()
_OVERWRITE = "OVERWRITE_IF_EXISTS_OR_ADD"
_APPEND = "APPEND_IF_EXISTS_OR_ADD"


class BadEnvelope(ValueError):
    """A request the core never sees: the HTTP status, the error counter, and the problem."""

    def __init__(self, status: int, error: str, problem: str) -> None:
        super().__init__(problem)
        self.status = status
        self.error = error


def _http(status: int, reason: str, body: bytes, content_type: bytes = b"application/json",
          close: bool = False) -> bytes:  # fmt: skip
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n"
        % (status, reason.encode(), content_type, len(body), b"connection: close\r\n" if close else b"")
    )  # fmt: skip
    return head + body


# Whole HTTP responses that change nothing, one per message kind, built once.
CONTINUE_JSON = {kind: orjson.dumps({kind: {}}) for kind in MESSAGE_KINDS}
CONTINUE = {kind: _http(200, "OK", body) for kind, body in CONTINUE_JSON.items()}


def _headers(part: Any) -> list[Any]:
    """The `headers.headers` list of a HttpHeaders message (absent: none)."""
    if not part:
        return []
    headers = part["headers"]
    return headers.get("headers", []) if headers else []


def _value(header: Mapping[str, Any]) -> bytes:
    raw = header.get("raw_value")
    if raw is not None:
        return binascii.a2b_base64(raw, strict_mode=True)
    value: str = header.get("value", "")
    return value.encode()


def header_pairs(part: Any) -> list[tuple[str, str]]:
    """(name, value) pairs; undecodable bytes survive as surrogate escapes, as over gRPC."""
    return [(h["key"], _value(h).decode("utf-8", "surrogateescape")) for h in _headers(part)]


def _number(fields: Mapping[str, Any] | None, key: str, limit: int) -> int | None:
    """A whole number attribute in [0, limit], or None: a peer could send anything."""
    value = fields.get(key) if fields is not None else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if 0 <= value <= limit else None


def _text(fields: Mapping[str, Any], key: str) -> str:
    value = fields.get(key)
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    return str(int(value)) if math.isfinite(value) else ""


def _attributes(doc: Mapping[str, Any]) -> Mapping[str, Any] | None:
    attributes = doc.get("attributes")
    fields = attributes.get(core.ATTRIBUTES_KEY) if attributes else None
    return fields if isinstance(fields, dict) else None


class _JsonAttributes:
    """`core.Attributes` over the attributes of a ProcessingRequest in proto3 JSON."""

    __slots__ = ("fields",)

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self.fields = fields

    def number(self, key: str, limit: int) -> int | None:
        return _number(self.fields, key, limit)

    def text(self, key: str) -> str:
        return _text(self.fields, key)


def _carried(doc: Mapping[str, Any]) -> core.Carried:
    """What the request-phase filter wrote into our namespace, forwarded back by Envoy."""
    context = doc.get("metadata_context")
    namespaces = context.get("filter_metadata") if context else None
    fields = namespaces.get(METADATA_NAMESPACE) if namespaces else None
    return core.carried_from(fields if isinstance(fields, dict) else None)


def _option(name: str, value: str, action: str) -> dict[str, Any]:
    raw = binascii.b2a_base64(value.encode("utf-8", "surrogateescape"), newline=False)
    return {"header": {"key": name, "raw_value": raw.decode()}, "append_action": action}


def encode(kind: str, answer: Answer) -> bytes:
    """The core's answer to a headers message as ProcessingResponse JSON."""
    common: dict[str, Any] = {}
    if answer.clear_route_cache:
        common["clear_route_cache"] = True
    if answer.mutates or kind == "response_headers":
        options = [_option(n, v, _OVERWRITE) for n, v in answer.overwrite]
        options += [_option(n, v, _APPEND) for n, v in answer.append]
        common["header_mutation"] = {"set_headers": options, "remove_headers": list(answer.remove)}
    out: dict[str, Any] = {kind: {"response": common}}
    if answer.metadata is not None:
        out["dynamic_metadata"] = {METADATA_NAMESPACE: dict(answer.metadata)}
    return orjson.dumps(out)


def parse(body: bytes) -> tuple[str, dict[str, Any]]:
    """The message kind and the document; BadEnvelope when it is not a ProcessingRequest."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadEnvelope(400, "bad_json", f"not JSON: {exc.msg} at byte {exc.pos}") from None
    if not isinstance(doc, dict):
        raise BadEnvelope(400, "bad_json", "not a JSON object")
    kinds = [key for key in doc if key in _KINDS]
    if len(kinds) != 1:
        problem = "sets none of the message kinds" if not kinds else f"sets {len(kinds)} kinds"
        raise BadEnvelope(400, "bad_message", f"the ProcessingRequest {problem}")
    return kinds[0], doc


class HttpProcessor:
    """ProcessingRequest JSON in, ProcessingResponse JSON out; `policy` may be replaced (reload)."""

    def __init__(self, policy: Policy, metrics: Metrics | None = None) -> None:
        self.policy = policy
        self.metrics = metrics or Metrics()
        self.cluster_tls: ClusterTlsCache | None = None
        self.messages, self.seconds = self.metrics.by_transport[TRANSPORT]
        self.errors = self.metrics.errors_by_transport[TRANSPORT]

    def answer(self, body: bytes, declared: Direction | None = None) -> bytes:
        """A whole HTTP response. Raises BadEnvelope before the core runs."""
        started = time.perf_counter()
        kind, doc = parse(body)
        try:
            response = self._handle(kind, doc, declared)
        except Exception as exc:  # one bad message must not end the connection or the server
            self.errors["processing_failed"].inc()
            log.error("processing_failed", kind=kind, transport=TRANSPORT,
                      **core.error_fields(exc, _values(doc)))  # fmt: skip
            response = CONTINUE[kind]
        self.messages[kind].inc()
        self.seconds[kind].observe(time.perf_counter() - started)
        return response

    def _handle(self, kind: str, doc: dict[str, Any], declared: Direction | None) -> bytes:
        policy = self.policy
        if kind == "request_headers":
            listener = _number(_attributes(doc), core.LISTENER_ATTRIBUTE, 2)
            outcome = core.on_request(policy, header_pairs(doc[kind]), listener, declared)
            self.metrics.count_request(outcome.decision.applied)
            if outcome.answer is None:
                return CONTINUE[kind]
            return _http(200, "OK", encode(kind, outcome.answer))
        if kind != "response_headers":
            return CONTINUE[kind]
        # Only the few response headers that decide triage are read.
        signs = {
            h["key"]: _value(h) for h in _headers(doc[kind]) if h["key"] in core.RESPONSE_SIGNS
        }
        fields = _attributes(doc)
        result = core.response_phase(
            policy, signs, None if fields is None else _JsonAttributes(fields), _carried(doc),
            declared=declared, cluster_tls=self.cluster_tls,
        )  # fmt: skip
        if result is None:
            return CONTINUE[kind]
        self.metrics.count_response(result.diagnosis, TRANSPORT)
        if result.answer is None:
            return CONTINUE[kind]
        return _http(200, "OK", encode(kind, result.answer))


def _values(doc: Mapping[str, Any]) -> list[str]:
    """Every header value of the message, to cut out of an error message; best effort."""
    values: list[str] = []
    for part in ("request_headers", "response_headers"):
        with contextlib.suppress(Exception):
            values += [v for _, v in header_pairs(doc.get(part))]
            values += [h.get("value", "") for h in _headers(doc.get(part))]
            values += [h.get("raw_value", "") for h in _headers(doc.get(part))]
    return [v for v in values if isinstance(v, str)]


def _error(exc: BadEnvelope) -> bytes:
    reason = {400: "Bad Request", 413: "Content Too Large"}.get(exc.status, "Error")
    body = orjson.dumps({"error": exc.error, "problem": str(exc)})
    return _http(exc.status, reason, body, close=exc.status == 413)


_NOT_FOUND = _http(404, "Not Found", b'{"error":"not_found","problem":"GET serves only /ready"}')
_NOT_ALLOWED = _http(405, "Method Not Allowed",
                     b'{"error":"bad_request","problem":"ext_proc messages are POSTed"}', close=True)  # fmt: skip
_READY = _http(200, "OK", b"ready\n", b"text/plain")
_DRAINING = _http(503, "Service Unavailable", b"draining\n", b"text/plain")
_TIMEOUT = _http(408, "Request Timeout", b'{"error":"timeout","problem":"message too slow"}', close=True)  # fmt: skip
_BAD_HTTP = _http(400, "Bad Request", b'{"error":"bad_request","problem":"not HTTP/1.1"}', close=True)  # fmt: skip
_TOO_LARGE = _error(BadEnvelope(413, "too_large", f"the message exceeds {MAX_BODY} bytes"))


class _Connection(asyncio.Protocol):
    """One client connection: frames HTTP/1.1 requests with httptools, answers each in turn."""

    def __init__(self, lane: HttpLane) -> None:
        self.lane = lane
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.body: list[bytes] = []
        self.size = 0
        self.url = b""
        self.declared: Direction | None = None
        self.started: float | None = None  # when the message being read began
        self.active = 0.0  # the last time anything happened
        self.refused = False  # the body went over the limit: answered, closing

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self.active = time.monotonic()
        self.lane.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lane.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.active = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:  # also an Upgrade: this lane speaks plain HTTP/1.1
            if not self.refused:
                self.lane.errors["bad_request"].inc()
                self._reply(_BAD_HTTP, close=True)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.body.clear()
        self.size = 0
        self.url = b""
        self.declared = None
        self.started = self.active

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == len(_DIRECTION_HEADER) and name.lower() == _DIRECTION_HEADER:
            self.declared = core.declared_direction(value)

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > MAX_BODY:
            if not self.refused:
                self.refused = True
                self.lane.errors["too_large"].inc()
                log.warning("bad_http_request", transport=TRANSPORT, error="too_large",
                            problem=f"the message exceeds {MAX_BODY} bytes")  # fmt: skip
                self._reply(_TOO_LARGE, close=True)
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.started = None
        if self.refused:
            return
        method = self.parser.get_method()
        if method == b"POST":
            response = self._process()
        elif method == b"GET":
            path = self.url.split(b"?", 1)[0]
            if path != READY_PATH:
                response = _NOT_FOUND
            else:
                response = _DRAINING if self.lane.draining else _READY
        else:
            self.lane.errors["bad_request"].inc()
            response = _NOT_ALLOWED
        self._reply(response, close=self.lane.draining or not self.parser.should_keep_alive())

    def _process(self) -> bytes:
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        try:
            return self.lane.processor.answer(body, self.declared)
        except BadEnvelope as exc:
            self.lane.errors[exc.error].inc()
            log.warning("bad_http_request", transport=TRANSPORT, error=exc.error, problem=str(exc))
            return _error(exc)

    # (the 413 and 408 answers close the connection: what follows in it is not framed)

    def _reply(self, response: bytes, *, close: bool = False) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if close and b"connection: close" not in response[:256]:
            response = response.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)
        transport.write(response)
        if close:
            transport.close()

    def check(self, now: float) -> None:
        """Close a connection whose message is too slow, or that sat idle too long."""
        transport = self.transport
        if transport is None:
            return
        if self.started is not None and now - self.started > MESSAGE_SECONDS:
            self.lane.errors["timeout"].inc()
            log.warning("bad_http_request", transport=TRANSPORT, error="timeout",
                        problem=f"a message took over {MESSAGE_SECONDS:g}s to arrive")  # fmt: skip
            self._reply(_TIMEOUT, close=True)
        elif self.started is None and now - self.active > IDLE_SECONDS:
            transport.close()

    def close_if_idle(self) -> None:
        if self.started is None and self.transport is not None:
            self.transport.close()


class HttpLane:
    """The HTTP listener on the running event loop. An async context manager."""

    def __init__(
        self,
        processor: HttpProcessor,
        listen: str = "127.0.0.1:0",
        grace: float = 10.0,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.processor = processor
        self.listen = listen
        self.grace = grace
        self.ssl_context = ssl_context
        self.errors = processor.errors
        self.connections: set[_Connection] = set()
        self.draining = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.listen.startswith("unix:"):
                server = await loop.create_unix_server(
                    lambda: _Connection(self), self.listen[5:], ssl=self.ssl_context
                )
            else:
                host, _, port = self.listen.rpartition(":")
                server = await loop.create_server(
                    lambda: _Connection(self), host.strip("[]") or None, int(port),
                    ssl=self.ssl_context, reuse_port=True,  # as gRPC does: --workers share it
                )  # fmt: skip
        except (OSError, ValueError) as exc:
            raise OSError(f"cannot listen on {self.listen}: {exc}") from None
        self._server = server
        if not self.listen.startswith("unix:"):
            self.port = server.sockets[0].getsockname()[1]
        self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            now = time.monotonic()
            for connection in list(self.connections):
                connection.check(now)

    async def stop(self) -> None:
        """Answer /ready with 503, refuse new connections, finish messages in flight within the grace."""
        if self._server is None:
            return
        self.draining = True
        self._server.close()
        for connection in list(self.connections):
            connection.close_if_idle()
        deadline = time.monotonic() + self.grace
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            for connection in list(self.connections):
                connection.close_if_idle()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> HttpLane:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
