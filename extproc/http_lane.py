"""The HTTP adapter: ext_proc's `http_service` protocol, JSON in, JSON out.

Envoy POSTs each `ProcessingRequest` as proto3 JSON (snake_case field names, header
values as base64 `raw_value`) over pooled HTTP/1.1 connections, on whatever path its
`http_uri` names, and reads a JSON `ProcessingResponse` back. The two header phases
come from two single-phase filters (one filter with both loses the second answer), so
what the response needs from the request travels in our metadata namespace
(`core.Carried`, forwarded back by the response filter's `forwarding_namespaces`).

Three layers, as in the gRPC adapter: `HttpProcessor.answer` is bytes in, bytes out
(parse with orjson, read the fields the core needs straight from the dicts, call the
core, serialise); `_Connection` only frames HTTP/1.1 with httptools, one message at a
time, and keeps a connection's limits (head, URL, headers, body, back-pressure);
`HttpLane` owns the listener, the lane-wide limits (connections, buffered bodies), the
readiness endpoint (`GET /ready`), the timeouts' sweep and the drain. A bad envelope
(not JSON, too large, no message kind) or a peer past a limit gets an HTTP error and a
counter before the core runs; an exception in the core becomes a continue and
`processing_failed`, in one place. The limits are the constants below.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import math
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, cast

import httptools
import orjson
import structlog

from extproc import core
from extproc.config import Direction, Policy
from extproc.core import Answer
from extproc.envoy_admin import ClusterTlsCache
from extproc.failures import (
    NO_REQUEST,
    Failures,
    RequestFields,
    attribute_fields,
    carried_fields,
    carry,
    request_fields,
)
from extproc.filter_config import DIRECTION_METADATA, METADATA_NAMESPACE
from extproc.metrics import MESSAGE_KINDS, Metrics

log = structlog.get_logger("extproc")

TRANSPORT = "http"

# ---- Limits: every input the lane reads has one; each is driven past by a hostile peer in
# tests/grpc/test_http_lane.py (docs/deploy/http-lane.md, docs/threat-model.md T12/T17).
#
# The request head (request line and headers), measured as it is fed to the parser, so
# httptools never holds more. Envoy 1.40's POST head is about 210 bytes (seven headers,
# measured); 16 KiB is also h11's default (`max_incomplete_event_size`). Over it: 431.
MAX_HEAD = 16 * 1024
MAX_URL = 8 * 1024  # Envoy POSTs to its `http_uri`'s path (`/process`); over it: 414
MAX_HEADERS = 64  # header lines in one head; over it: 431
# The body: the largest ProcessingRequest Envoy can send. Headers dominate it: Envoy caps a
# request's header block at `max_request_headers_kb`, at most 8192 KiB (its own ceiling),
# counted on the wire (names, values, ": " and CRLF). The JSON carries each value as
# base64 (4/3) plus `{"key":"","raw_value":""},` (26 bytes) around each header, and a
# small envelope (attributes, metadata). Measured with Envoy 1.40, 8 MiB less 1 KiB of
# headers made an 11,185,587-byte POST in 95 headers, 11,380,477 in 10,000
# (tests/deploy/test_http_lane_limits_e2e.py). So the cap covers 8 MiB of headers in up
# to 10,000 headers (Envoy's `max_headers_count` is 100 by default), plus 1 MiB for the
# envelope: 12,503,386 bytes. Over it: 413, and Envoy fails open for that one message.
ENVOY_MAX_HEADER_BYTES = 8192 * 1024
ENVOY_MAX_HEADERS_COUNT = 10_000
JSON_BYTES_PER_HEADER = 27  # 26, and one for base64's rounding
ENVELOPE_BYTES = 1024 * 1024
MAX_BODY = (
    ENVOY_MAX_HEADER_BYTES * 4 // 3
    + JSON_BYTES_PER_HEADER * ENVOY_MAX_HEADERS_COUNT
    + ENVELOPE_BYTES
)
# Bodies buffered at once over all connections: five of the largest, or about 800 of
# what Envoy's default 60 KiB header limit allows (83 KB each, measured), in a pod whose
# memory limit is 256 MiB (deploy/k8s). Over it: 503 for that message, and Envoy fails open.
MAX_BUFFERED = 64 * 1024 * 1024
# Connections at once (`serve --http-max-connections`): Envoy opens one per request in
# flight to the cluster (HTTP/1.1, no pipelining), up to its circuit breaker's default
# of 1024 per Envoy. Beyond it a connection gets 503 and is closed at once.
MAX_CONNECTIONS = 1000
# Answers waiting to be sent: above this the connection stops reading (back-pressure),
# so a peer that pipelines requests and never reads the answers holds at most this much.
WRITE_HIGH_WATER = 64 * 1024
# A message must arrive whole this soon after its first byte (a bare CRLF counts, so a
# trickle of them cannot hold a connection), and a connection with no message in it is
# closed after this long; only a complete message restarts the idle clock. The rendered
# cluster closes its own idle connections sooner (`filter_config.HTTP_IDLE_TIMEOUT`), so
# Envoy never sends into a connection the server is closing.
MESSAGE_SECONDS = 10.0
IDLE_SECONDS = 300.0
SWEEP_SECONDS = 1.0  # how often connections are checked against the two
WARN_SECONDS = 10.0  # at most one warning per kind of error this often; the rest are counted
READY_PATH = b"/ready"


@dataclass(frozen=True, slots=True)
class Limits:
    """The lane's bounds that an operator (`--http-max-connections`) or a test changes."""

    max_connections: int = MAX_CONNECTIONS
    max_body: int = MAX_BODY
    max_buffered: int = MAX_BUFFERED
    message_seconds: float = MESSAGE_SECONDS
    idle_seconds: float = IDLE_SECONDS
    sweep_seconds: float = SWEEP_SECONDS

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(
                f"the HTTP lane needs at least 1 connection, got {self.max_connections}"
            )


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


def _namespace(doc: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """What the request-phase filter wrote into our namespace, forwarded back by Envoy."""
    context = doc.get("metadata_context")
    namespaces = context.get("filter_metadata") if context else None
    fields = namespaces.get(METADATA_NAMESPACE) if namespaces else None
    return fields if isinstance(fields, dict) else None


def _sample(namespace: Mapping[str, Any] | None, fields: Mapping[str, Any] | None) -> RequestFields:
    """The failing request's fields for the live page: carried by the request phase (our
    namespace), else asked of Envoy by a response-only filter (gated mode's attributes)."""
    carried = carried_fields(namespace)
    if carried == NO_REQUEST and fields is not None:
        return attribute_fields(_JsonAttributes(fields).text)
    return carried


def _with_sample(answer: Answer | None, fields: RequestFields) -> Answer | None:
    """The request phase's answer, also carrying the sample's fields for the live page."""
    sample = carry(fields)
    if not sample:
        return answer
    if answer is None:
        return Answer(metadata=sample)
    return replace(answer, metadata={**(answer.metadata or {}), **sample})


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
        # The live page's table (`serve --ui-listen`); None: off. The request phase is a
        # separate POST here: while the page is on it carries the sample's request fields
        # (method, path, request id, trace id) in our namespace for the response phase.
        self.failures: Failures | None = None
        self.tallies = self.metrics.tallies[TRANSPORT]
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
        self.tallies[kind].observe(time.perf_counter() - started)
        return response

    def _handle(self, kind: str, doc: dict[str, Any], declared: Direction | None) -> bytes:
        policy = self.policy
        if kind == "request_headers":
            listener = _number(_attributes(doc), core.LISTENER_ATTRIBUTE, 2)
            pairs = header_pairs(doc[kind])
            outcome = core.on_request(policy, pairs, listener, declared)
            self.metrics.count_request(outcome.decision.applied)
            answer = outcome.answer
            if self.failures is not None:  # the page is on: any response may fail
                answer = _with_sample(answer, request_fields(pairs))
            if answer is None:
                return CONTINUE[kind]
            return _http(200, "OK", encode(kind, answer))
        if kind != "response_headers":
            return CONTINUE[kind]
        # Only the few response headers that decide triage are read.
        signs = {
            h["key"]: _value(h) for h in _headers(doc[kind]) if h["key"] in core.RESPONSE_SIGNS
        }
        fields = _attributes(doc)
        namespace = _namespace(doc)
        carried = core.carried_from(namespace)
        result = core.response_phase(
            policy, signs, None if fields is None else _JsonAttributes(fields), carried,
            declared=declared, cluster_tls=self.cluster_tls,
        )  # fmt: skip
        if result is None:
            return CONTINUE[kind]
        self.metrics.count_response(result.diagnosis, TRANSPORT)
        if result.diagnosis is not None and self.failures is not None:
            self.failures.record(result.diagnosis, time.time(), _sample(namespace, fields),
                                 direction=str(result.direction or ""))  # fmt: skip
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
    return _json_error(exc.status, exc.error, str(exc))


_REASONS = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def _json_error(status: int, error: str, problem: str, *, close: bool = False) -> bytes:
    body = orjson.dumps({"error": error, "problem": problem})
    return _http(status, _REASONS[status], body, close=close)


_NOT_FOUND = _json_error(404, "not_found", "GET serves only /ready")
_READY = _http(200, "OK", b"ready\n", b"text/plain")
_DRAINING = _http(503, "Service Unavailable", b"draining\n", b"text/plain")


class _Refused(Exception):
    """Raised from a parser callback, after the answer went out, to stop parsing."""


class _Warnings:
    """At most one warning per kind of error every WARN_SECONDS; the next says how many were skipped.

    A hostile peer can make every message an error; the counter counts them all, the log
    must not grow as fast.
    """

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.skipped: dict[str, int] = {}

    def warn(self, error: str, problem: str, peer: object) -> None:
        now = time.monotonic()
        if now - self.last.get(error, -math.inf) < WARN_SECONDS:
            self.skipped[error] = self.skipped.get(error, 0) + 1
            return
        self.last[error] = now
        log.warning("bad_http_request", transport=TRANSPORT, error=error, problem=problem,
                    peer=peer, skipped=self.skipped.pop(error, 0))  # fmt: skip


class _Connection(asyncio.Protocol):
    """One client connection: frames HTTP/1.1 with httptools and answers each message in turn.

    Strategy: llhttp keeps no limits of its own, and httptools buffers a header line whole
    before it calls back; so the head is fed in steps no longer than what it may still
    take (MAX_HEAD), and the body at most MAX_HEAD at a time. A message is answered as soon
    as it is complete. While answers wait to be sent above WRITE_HIGH_WATER (the peer does
    not read them), the transport pauses writing: the connection then stops reading and
    keeps the rest of what it read unparsed until the peer catches up. So a pipelining
    peer holds at most one read and the high-water mark in the server.
    """

    def __init__(self, lane: HttpLane) -> None:
        self.lane = lane
        self.limits = lane.limits
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.unparsed: bytes | memoryview = b""  # read, not parsed: only while writing is paused
        self.paused = False  # the peer is not reading our answers
        self.in_head = True  # the next bytes belong to a head
        self.head_size = 0  # bytes of the current head fed so far
        self.completed = 0  # messages read whole
        self.headers = 0
        self.body: list[bytes] = []
        self.size = 0  # body bytes buffered (and reserved in the lane's budget)
        self.url = b""
        self.declared: Direction | None = None
        self.started: float | None = None  # the first byte of the message being read
        self.idle_since = 0.0  # the connection opened, or the last message was complete
        self.closed_at: float | None = None  # closed by us; the last answer may still be flushing

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self.idle_since = time.monotonic()
        limit = self.limits.max_connections
        if len(self.lane.connections) >= limit:
            # Not kept to linger: a connection past the cap must cost nothing after this.
            self._refuse(
                503, "too_many_connections", f"the lane serves {limit} connections at most"
            )
            self.transport.close()
            return
        self.lane.connections.add(self)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lane.connections.discard(self)
        self._drop_body()
        self.transport = None

    def pause_writing(self) -> None:
        self.paused = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
            self._parse()

    def data_received(self, data: bytes) -> None:
        if self.closed_at is not None:  # answered and closing: what follows is not read
            return
        if self.started is None:  # a bare CRLF starts the clock too
            self.started = time.monotonic()
        self.unparsed = bytes(self.unparsed) + data if self.unparsed else data
        self._parse()

    def _parse(self) -> None:
        while self.unparsed and not self.paused and self.closed_at is None:
            step = MAX_HEAD - self.head_size + 1 if self.in_head else MAX_HEAD
            piece = self.unparsed
            if len(piece) > step:  # zero-copy slices of a read too long for one step
                view = memoryview(piece)
                piece, self.unparsed = view[:step], view[step:]
            else:
                self.unparsed = b""
            completed = self.completed
            try:
                self.parser.feed_data(piece)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade):
                if self.closed_at is None:  # not one of our own refusals
                    self._refuse(400, "bad_request", "not HTTP/1.1")
                return
            # A head that began inside this piece, after a message ended in it, is not
            # counted here: the cap may be passed by one piece (MAX_HEAD) before it is seen.
            if self.in_head and self.completed == completed:
                self.head_size += len(piece)
                if self.head_size > MAX_HEAD:
                    self._refuse(431, "headers_too_large", f"the head exceeds {MAX_HEAD} bytes")
        if self.unparsed and self.started is None:
            self.started = time.monotonic()  # the next message is waiting for the peer to read

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.body.clear()
        self.headers = 0
        self.url = b""
        self.declared = None
        if self.started is None:
            self.started = time.monotonic()

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_URL:
            raise self._refuse(414, "uri_too_long", f"the request target exceeds {MAX_URL} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers += 1
        if self.headers > MAX_HEADERS:
            raise self._refuse(431, "headers_too_large", f"more than {MAX_HEADERS} header lines")
        if len(name) == len(_DIRECTION_HEADER) and name.lower() == _DIRECTION_HEADER:
            self.declared = core.declared_direction(value)

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.parser.should_upgrade():  # Upgrade (websocket, h2c) or CONNECT
            raise self._refuse(
                400, "upgrade_refused", "this lane speaks HTTP/1.1 only: no Upgrade or CONNECT"
            )

    def on_body(self, body: bytes) -> None:
        if self.size + len(body) > self.limits.max_body:
            raise self._refuse(
                413, "too_large", f"the message exceeds {self.limits.max_body} bytes"
            )
        if not self.lane.reserve(len(body)):
            raise self._refuse(503, "overloaded",
                               f"the lane buffers {self.limits.max_buffered} bytes of messages at most")  # fmt: skip
        self.size += len(body)
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.completed += 1
        self.in_head = True
        self.head_size = 0
        self.started = None
        self.idle_since = time.monotonic()
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
            self.lane.count("bad_request", f"{method.decode()} is not POST or GET", self._peer())
            response = _json_error(405, "bad_request", "ext_proc messages are POSTed", close=True)
        self._reply(response, close=self.lane.draining or not self.parser.should_keep_alive())

    def _process(self) -> bytes:
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self._drop_body()
        try:
            return self.lane.processor.answer(body, self.declared)
        except BadEnvelope as exc:
            self.lane.count(exc.error, str(exc), self._peer())
            return _error(exc)

    def _drop_body(self) -> None:
        self.body.clear()
        self.lane.release(self.size)
        self.size = 0

    def _peer(self) -> object:
        return self.transport.get_extra_info("peername") if self.transport is not None else None

    def _refuse(self, status: int, error: str, problem: str) -> _Refused:
        """Count, warn, answer and close; parser callbacks raise what it returns."""
        self.lane.count(error, problem, self._peer())
        self._drop_body()
        self._reply(_json_error(status, error, problem, close=True), close=True)
        return _Refused(error)

    def _reply(self, response: bytes, *, close: bool = False) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.closed_at is not None:
            return
        if close and b"connection: close" not in response[:256]:
            response = response.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)
        transport.write(response)
        if close:
            self._close()

    def _close(self) -> None:
        """Close after the last answer. Over TCP only our side is shut (a lingering close, as
        nginx does): a peer still sending would otherwise get a reset that destroys the
        answer before it reads it. What it sends is dropped; the sweep aborts the connection
        if the peer has not closed its side within the message deadline."""
        transport = self.transport
        if transport is None:
            return
        self.closed_at = time.monotonic()
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def check(self, now: float) -> None:
        """Close a connection whose message is too slow, that sat idle too long, or whose
        peer does not read the last answer before the close."""
        if self.transport is None:
            return
        limits = self.limits
        if self.closed_at is not None:
            if now - self.closed_at > limits.message_seconds:
                self.transport.abort()
        elif self.started is not None and now - self.started > limits.message_seconds:
            self._refuse(
                408, "timeout", f"a message took over {limits.message_seconds:g}s to arrive"
            )
        elif self.started is None and now - self.idle_since > limits.idle_seconds:
            self._close()

    def close_if_idle(self) -> None:
        if self.started is None and self.closed_at is None:
            self._close()


class HttpLane:
    """The HTTP listener on the running event loop. An async context manager."""

    def __init__(
        self,
        processor: HttpProcessor,
        listen: str = "127.0.0.1:0",
        grace: float = 10.0,
        *,
        ssl_context: ssl.SSLContext | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.processor = processor
        self.listen = listen
        self.grace = grace
        self.ssl_context = ssl_context
        self.limits = limits or Limits()
        self.errors = processor.errors
        self.connections: set[_Connection] = set()
        self.buffered = 0  # body bytes held by all connections (Limits.max_buffered)
        self.warnings = _Warnings()
        self.draining = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def count(self, error: str, problem: str, peer: object = None) -> None:
        """One refused or bad message: always counted, logged at most every WARN_SECONDS."""
        self.errors[error].inc()
        self.warnings.warn(error, problem, peer)

    def reserve(self, size: int) -> bool:
        if self.buffered + size > self.limits.max_buffered:
            return False
        self.buffered += size
        return True

    def release(self, size: int) -> None:
        self.buffered -= size

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
            await asyncio.sleep(self.limits.sweep_seconds)
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
