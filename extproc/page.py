"""The live page (`serve --ui-listen`): what fails right now, why, and since when.

A third door on the lanes' event loop, never on their ports: `GET /` (the page), its
script and style (shipped in the package, `extproc/ui/`), `GET /api/failures` (a JSON
snapshot of `extproc.failures.Failures`) and `GET /api/events` (Server-Sent Events).
HTTP/1.1 is framed by httptools, as in the HTTP lane, one request per connection: a
page makes few.

Events: at most one `update` a second (`TICK_SECONDS`), holding the rows changed since
the last, with `id:` the table's sequence number; a browser reconnecting with
`Last-Event-ID` gets the rows changed since, or a `resync` (the whole table) when rows
were evicted meanwhile. Each client has a bounded queue; a client too slow to take its
events is dropped to one `resync` instead of queueing more.

Security (docs/threat-model.md T37-T44): loopback by default, and a token
(`--ui-token-file`) for any other address; the Host must be a loopback name unless a
token is set (DNS rebinding); an Origin must be the page's own; GET only; a strict
Content-Security-Policy; the script renders every string with textContent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import httptools
import orjson
import structlog

from extproc.failures import Failures
from extproc.mesh_view import MeshView
from extproc.metrics import Metrics

log = structlog.get_logger("extproc")

# ---- Limits (docs/page.md, "Limits"; each driven past in tests/page/test_door.py).
MAX_CONNECTIONS = 64  # connections at once; beyond it 503 and a close
MAX_EVENT_CLIENTS = 8  # event streams at once (a browser keeps one per tab); beyond it 503
QUEUE = 8  # events waiting for one client; past it the client gets one resync instead
MAX_HEAD = 8 * 1024  # the request head; over it 431
MAX_HEADERS = 64  # header lines; over it 431
HEAD_SECONDS = 10.0  # the head must arrive whole this soon; then 408
WRITE_SECONDS = 10.0  # a client must take an event this soon, or is disconnected
TICK_SECONDS = 1.0  # updates are coalesced to at most one per tick
HEARTBEAT_SECONDS = 15.0  # a comment line keeps an idle stream open through proxies
MAX_UI_URL = 1024  # --ui-trace-url and --ui-docs-url, in characters: links, not documents

COOKIE = "extproc_ui"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
SECURITY_HEADERS = (
    b"content-security-policy: default-src 'self'; frame-ancestors 'none'\r\n"
    b"x-content-type-options: nosniff\r\n"
    b"cache-control: no-store\r\n"
    b"referrer-policy: no-referrer\r\n"
)
_STATIC = {
    b"/": ("index.html", b"text/html; charset=utf-8"),
    b"/page.js": ("page.js", b"text/javascript; charset=utf-8"),
    b"/page.css": ("page.css", b"text/css; charset=utf-8"),
}
_REASONS = {200: "OK", 303: "See Other", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}  # fmt: skip


class PageError(ValueError):
    """The page cannot start as configured (the message says why)."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int = MAX_CONNECTIONS
    max_event_clients: int = MAX_EVENT_CLIENTS
    queue: int = QUEUE
    tick_seconds: float = TICK_SECONDS


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(listen: str, token: bytes) -> tuple[str, int]:
    """(host, port) of `--ui-listen`; PageError for a non-loopback address without a token."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise PageError(f"--ui-listen must be HOST:PORT (127.0.0.1:9902), got {listen!r}")
    if not is_loopback(host) and not token:
        raise PageError(
            f"--ui-listen {listen} is not a loopback address: the page shows the mesh's "
            "failures, so another address needs --ui-token-file (or use 127.0.0.1 and "
            "kubectl port-forward)"
        )
    return host.strip("[]"), int(port)


def response(status: int, body: bytes, content_type: bytes = b"text/plain; charset=utf-8",
             extra: bytes = b"") -> bytes:  # fmt: skip
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s%sconnection: close\r\n\r\n"
        % (status, _REASONS[status].encode(), content_type, len(body), SECURITY_HEADERS, extra)
    ) + body  # fmt: skip


def _event(name: str, seq: int, data: dict[str, Any]) -> bytes:
    return b"event: %s\nid: %d\ndata: %s\n\n" % (name.encode(), seq, orjson.dumps(data))


class _Head:
    """httptools callbacks for one request head, with its caps."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.count = 0
        self.done = False
        self.too_large = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.count += 1
        if self.count > MAX_HEADERS:
            self.too_large = True
            raise httptools.HttpParserError("too many headers")
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.done = True


class _Client:
    """One event stream: a bounded queue of events, or one pending resync."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(size)  # None: resync
        self.resync_pending = False  # the resync, built when sent, covers later updates

    def offer(self, event: bytes) -> None:
        """Queue `event`; when the queue is full it is replaced by one resync."""
        if self.resync_pending:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)
            self.resync_pending = True

    async def next(self) -> bytes | None:
        event = await self.queue.get()
        if event is None:
            self.resync_pending = False
        return event


class Page:
    """The page's listener on the running loop. An async context manager."""

    def __init__(
        self,
        failures: Failures,
        listen: str = "127.0.0.1:0",
        *,
        token: bytes = b"",
        metrics: Metrics | None = None,
        limits: Limits | None = None,
        mesh: MeshView | None = None,
    ) -> None:
        self.host, self.requested_port = check_listen(listen, token)
        self.mesh = mesh  # the mesh-wide view from Prometheus (`--ui-prometheus`), if any
        self.failures = failures
        self.metrics = metrics or Metrics()
        self.limits = limits or Limits()
        # The cookie holds a digest of the token, not the token: the token may hold bytes a
        # cookie may not (`;`, `,`), and neither ever reaches a log.
        self._cookie = hashlib.sha256(token).hexdigest().encode() if token else b""
        self._token = token
        self.files = {
            path: (resources.files("extproc").joinpath("ui", name).read_bytes(), kind)
            for path, (name, kind) in _STATIC.items()
        }
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()  # open connections, closed at stop
        self.clients: set[_Client] = set()
        self.sent_seq = 0  # the table's sequence number at the last update
        self.port = 0
        self._server: asyncio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None

    # ---- the door
    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.requested_port)
        except OSError as exc:
            raise OSError(f"cannot listen on {self.host}:{self.requested_port}: {exc}") from None
        self.port = self._server.sockets[0].getsockname()[1]
        self.sent_seq = self.failures.seq
        self._ticker = asyncio.create_task(self._tick())
        if self.mesh is not None:
            self._poller = asyncio.create_task(self.mesh.run(self._mesh_changed))

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in (self._ticker, self._poller):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for client in list(self.clients):
            with contextlib.suppress(asyncio.QueueFull):  # a full queue wakes it anyway
                client.queue.put_nowait(b"")  # wakes the writer, which sees the page closed
        for writer in list(self._writers):  # event streams never end by themselves
            writer.close()
        self._server = None

    async def __aenter__(self) -> Page:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.limits.max_connections:
            await self._send(writer, response(503, b"too many connections to the page\n"))
            writer.close()
            return
        self.connections += 1
        self._writers.add(writer)
        try:
            head = await self._read_head(reader, writer)
            if head is not None:
                await self._answer(head, writer)
        finally:
            self.connections -= 1
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_head(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[bytes, _Head] | None:
        head = _Head()
        parser = httptools.HttpRequestParser(head)
        size = 0
        try:
            async with asyncio.timeout(HEAD_SECONDS):
                while not head.done:
                    data = await reader.read(MAX_HEAD + 1 - size)
                    if not data:
                        return None
                    size += len(data)
                    if size > MAX_HEAD:
                        await self._send(writer, response(431, b"the head is too large\n"))
                        return None
                    parser.feed_data(data)
        except TimeoutError:
            await self._send(writer, response(408, b"the head took too long\n"))
            return None
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            status = 431 if head.too_large else 400
            await self._send(writer, response(status, b"not an HTTP/1.1 request the page serves\n"))
            return None
        return parser.get_method(), head

    async def _answer(self, request: tuple[bytes, _Head], writer: asyncio.StreamWriter) -> None:
        method, head = request
        if method != b"GET":
            await self._send(writer, response(405, b"the page answers GET only\n",
                                              extra=b"allow: GET\r\n"))  # fmt: skip
            return
        refusal = self._refusal(head)
        if refusal is not None:
            await self._send(writer, refusal)
            return
        url = httptools.parse_url(head.url)
        path = url.path or b"/"
        if path == b"/api/events":
            await self._events(head, writer)
        elif path == b"/api/failures":
            body = orjson.dumps(self._snapshot())
            await self._send(writer, response(200, body, b"application/json"))
        elif path in self.files:
            body, kind = self.files[path]
            await self._send(writer, response(200, body, kind))
        else:
            await self._send(writer, response(404, b"not found\n"))

    def _refusal(self, head: _Head) -> bytes | None:
        """Why this request is refused (a whole response), or None: Host, Origin, token."""
        host = head.headers.get(b"host", b"").decode("latin-1")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if not self._token and not (is_loopback(name) or name.strip("[]") == self.host):
            return response(403, b"the Host must name the page's loopback address\n")
        origin = head.headers.get(b"origin")
        if origin is not None and origin.decode("latin-1") != f"http://{host}":
            return response(403, b"requests from another origin are refused\n")
        if not self._token or self._authorized(head):
            return None
        url = httptools.parse_url(head.url)
        if url.path in (None, b"/") and url.query and url.query.startswith(b"token="):
            offered = url.query[len(b"token=") :].split(b"&", 1)[0]
            if hmac.compare_digest(offered, self._token):
                cookie = b"%s=%s; Path=/; HttpOnly; SameSite=Strict" % (
                    COOKIE.encode(),
                    self._cookie,
                )
                return response(303, b"", extra=b"location: /\r\nset-cookie: %s\r\n" % cookie)
        return response(401, b"a token is needed: open /?token=... once, or send "
                        b"Authorization: Bearer ...\n")  # fmt: skip

    def _authorized(self, head: _Head) -> bool:
        bearer = head.headers.get(b"authorization", b"")
        if bearer.startswith(b"Bearer ") and hmac.compare_digest(bearer[7:].strip(), self._token):
            return True
        for part in head.headers.get(b"cookie", b"").split(b";"):
            name, _, value = part.strip().partition(b"=")
            if name == COOKIE.encode() and hmac.compare_digest(value, self._cookie):
                return True
        return False

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(WRITE_SECONDS):
                await writer.drain()

    # ---- events
    async def _events(self, head: _Head, writer: asyncio.StreamWriter) -> None:
        if len(self.clients) >= self.limits.max_event_clients:
            self.metrics.page_clients["refused"].inc()
            await self._send(writer, response(503, b"too many event streams open\n"))
            return
        client = _Client(self.limits.queue)
        self.clients.add(client)
        try:
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n%s\r\n" % SECURITY_HEADERS
            )
            writer.write(self._catch_up(head.headers.get(b"last-event-id")))
            if self.mesh is not None:
                writer.write(self._mesh_event())
            while self._server is not None:
                try:
                    async with asyncio.timeout(HEARTBEAT_SECONDS):
                        event = await client.next()
                except TimeoutError:
                    event = b": keep-alive\n\n"
                if event is None:
                    self.metrics.page_clients["resynced"].inc()
                    event = self._resync()
                    if self.mesh is not None:
                        event += self._mesh_event()
                writer.write(event)
                async with asyncio.timeout(WRITE_SECONDS):
                    await writer.drain()
        except (TimeoutError, ConnectionError):
            pass  # a client that does not read or went away: its slot is freed
        finally:
            self.clients.discard(client)

    def _catch_up(self, last_event_id: bytes | None) -> bytes:
        """A reconnecting browser's missed rows, or the whole table."""
        failures = self.failures
        if last_event_id is not None and last_event_id.isdigit() and len(last_event_id) < 20:
            seq = int(last_event_id)
            if failures.resumable(seq):
                return self._update(seq)
        return self._resync()

    def _snapshot(self) -> dict[str, Any]:
        snapshot = self.failures.snapshot(time.time())
        if self.mesh is not None:
            snapshot["mesh"] = self.mesh.view()
        return snapshot

    def _resync(self) -> bytes:
        snapshot = self.failures.snapshot(time.time())
        return _event("resync", snapshot["seq"], snapshot)

    def _mesh_event(self) -> bytes:
        # The mesh view is not part of the table's sequence: it carries the table's id,
        # so a reconnect still resumes the table.
        assert self.mesh is not None
        return _event("mesh", self.failures.seq, self.mesh.view())

    def _mesh_changed(self) -> None:
        event = self._mesh_event()
        for client in self.clients:
            client.offer(event)

    def _update(self, since: int) -> bytes:
        failures, now = self.failures, time.time()
        rows = [failures.row_view(row, now) for row in failures.changed_since(since)]
        return _event("update", failures.seq, {"seq": failures.seq, "now": now, "rows": rows,
                                               "recovered_after": failures.recovered_after,
                                               "trace_url": failures.trace_url,
                                               "docs_url": failures.docs_url})  # fmt: skip

    def broadcast(self) -> None:
        """One update with the rows changed since the last, to every client (each tick)."""
        if self.failures.seq == self.sent_seq:
            return
        if not self.failures.resumable(self.sent_seq):
            event = self._resync()
        else:
            event = self._update(self.sent_seq)
        self.sent_seq = self.failures.seq
        for client in self.clients:
            client.offer(event)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.limits.tick_seconds)
            self.broadcast()
