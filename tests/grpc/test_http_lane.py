"""The HTTP lane over real sockets: bad input gets an HTTP error and a counter, never a crash.

The messages' meaning is tested through both adapters in test_adapters.py; here only the
envelope: framing, errors, limits, timeouts, readiness, TLS and the drain. Each limit of
`extproc/http_lane.py` has a hostile peer below that drives past it; the times are
shortened through `Limits`, never waited out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import orjson
import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from extproc import http_lane
from extproc.config import Policy, TlsFiles
from extproc.http_lane import HttpLane, HttpProcessor, Limits
from extproc.lab.certs import CertificateAuthority
from extproc.lab.envoy import free_port
from extproc.tls import ReloadingSslContext

pytestmark = pytest.mark.asyncio

CLEAN = orjson.dumps({"request_headers": {"headers": {"headers": [
    {"key": ":authority", "raw_value": "YQ=="}]}}})  # fmt: skip


def post(body: bytes, path: bytes = b"/process", extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n%s\r\n%s" % (path, len(body), extra, body))  # fmt: skip


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:] if line)
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


def errors(lane: HttpLane, error: str) -> float:
    value = lane.processor.metrics.registry.get_sample_value(
        "extproc_errors_total", {"error": error, "transport": "http"}
    )
    return value or 0.0


@contextlib.asynccontextmanager
async def lane_with(**limits: float) -> AsyncIterator[HttpLane]:
    """A lane on a free port with some limits changed (the times shortened for a test)."""
    lane = HttpLane(HttpProcessor(Policy()), "127.0.0.1:0", grace=1.0, limits=Limits(**limits))  # type: ignore[arg-type]
    async with lane:
        yield lane


@pytest_asyncio.fixture
async def lane():
    async with lane_with() as running:
        yield running


# Deadlines a test can reach quickly; the sweep checks them often enough to see it.
FAST = {"message_seconds": 0.3, "idle_seconds": 0.6, "sweep_seconds": 0.05}

T = TypeVar("T")


async def until(condition: Callable[[], T]) -> T:
    """Wait for a condition of the server's state to hold; the limit only ends a hung test."""
    async with asyncio.timeout(30):
        while not (value := condition()):  # noqa: ASYNC110 - the server's state has no event
            await asyncio.sleep(0.01)
    return value


async def closed(reader: asyncio.StreamReader) -> bool:
    """The server closed the connection: end of stream, or a reset for bytes it never read."""
    try:
        return await asyncio.wait_for(reader.read(), 10) == b""
    except ConnectionResetError:
        return True


async def connect(lane: HttpLane):
    return await asyncio.open_connection("127.0.0.1", lane.port)


async def test_continue_on_any_path_and_keep_alive(lane):
    reader, writer = await connect(lane)
    for path in (b"/process", b"/", b"/some/other/path"):
        writer.write(post(CLEAN, path))
        status, headers, body = await read_response(reader)
        assert (status, orjson.loads(body)) == (200, {"request_headers": {}})
        assert headers["content-type"] == "application/json"
    writer.close()


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{not json", "bad_json"),
        (b"[1, 2]", "bad_json"),
        (b'{"attributes": {}}', "bad_message"),
        (b'{"request_headers": {}, "response_headers": {}}', "bad_message"),
    ],
)
async def test_bad_message_gets_400_and_a_counter_and_the_connection_goes_on(lane, body, error):
    reader, writer = await connect(lane)
    writer.write(post(body))
    status, _, answer = await read_response(reader)
    assert status == 400
    assert orjson.loads(answer)["error"] == error
    assert errors(lane, error) == 1
    writer.write(post(CLEAN))
    assert (await read_response(reader))[0] == 200
    writer.close()


async def test_wrong_types_inside_a_message_continue_and_count(lane):
    """A ProcessingRequest of the right kind with nonsense inside: a continue, processing_failed."""
    reader, writer = await connect(lane)
    writer.write(post(b'{"request_headers": {"headers": {"headers": [{"key": 5}]}}}'))
    status, _, body = await read_response(reader)
    assert (status, orjson.loads(body)) == (200, {"request_headers": {}})
    assert errors(lane, "processing_failed") == 1
    writer.close()


async def test_body_over_the_limit_gets_413_and_a_close():
    """A body past `max_body` is answered 413 and the connection closed; nothing more is kept."""
    async with lane_with(max_body=1000) as lane:
        reader, writer = await connect(lane)
        writer.write(post(b"x" * 5000)[:1800])  # the rest would still be in flight at the close
        status, headers, _ = await read_response(reader)
        assert status == 413
        assert headers["connection"] == "close"
        assert await reader.read() == b""
        assert errors(lane, "too_large") == 1
        assert lane.buffered == 0
        writer.close()


async def test_not_http_gets_400_and_a_close(lane):
    reader, writer = await connect(lane)
    writer.write(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
    status, _, _ = await read_response(reader)
    assert status == 400
    assert await reader.read() == b""
    assert errors(lane, "bad_request") == 1
    writer.close()


async def test_readiness_and_other_methods(lane):
    reader, writer = await connect(lane)
    writer.write(b"GET /ready HTTP/1.1\r\nhost: x\r\n\r\n")
    assert (await read_response(reader))[:1] == (200,)
    writer.write(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
    assert (await read_response(reader))[0] == 404
    writer.write(b"PUT /process HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
    assert (await read_response(reader))[0] == 405
    writer.close()


async def test_slow_message_gets_408_and_idle_connection_closes():
    """Half a request gets 408 at the message deadline; a silent connection closes at the idle one."""
    async with lane_with(**FAST) as lane:
        slow_reader, slow = await connect(lane)
        slow.write(post(CLEAN)[:30])  # half a request, then nothing
        status, _, _ = await read_response(slow_reader)
        assert status == 408
        assert errors(lane, "timeout") == 1
        idle_reader, idle = await connect(lane)
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""
        slow.close()
        idle.close()


async def test_drain_answers_in_flight_then_closes(lane):
    reader, writer = await connect(lane)
    writer.write(post(CLEAN)[:40])
    await asyncio.sleep(0.1)  # the message has begun
    stopping = asyncio.create_task(lane.stop())
    await asyncio.sleep(0.1)
    assert lane.draining
    writer.write(post(CLEAN)[40:])
    status, headers, _ = await read_response(reader)
    assert status == 200
    assert headers["connection"] == "close"
    await stopping
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", lane.port)


async def test_tls_with_client_certificates(tmp_path):
    ca = CertificateAuthority.create("lane")
    server = ca.issue(dns_names=["localhost"]).write(tmp_path, "server")
    client = ca.issue(dns_names=["client"]).write(tmp_path, "client")
    files = TlsFiles(server.cert_chain, server.private_key, server.trusted_ca)
    context = ReloadingSslContext(files).context
    async with HttpLane(HttpProcessor(Policy()), "127.0.0.1:0", ssl_context=context) as lane:
        trusted = ssl.create_default_context(cafile=str(server.trusted_ca))
        trusted.load_cert_chain(client.cert_chain, client.private_key)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", lane.port, ssl=trusted, server_hostname="localhost"
        )
        writer.write(post(CLEAN))
        assert (await read_response(reader))[0] == 200
        writer.close()
        anonymous = ssl.create_default_context(cafile=str(server.trusted_ca))
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", lane.port, ssl=anonymous, server_hostname="localhost"
            )
            writer.write(post(CLEAN))
            await read_response(reader)


async def refused(lane: HttpLane, request: bytes) -> tuple[int, dict[str, str], dict[str, str]]:
    """Send one request on a new connection: the status, headers and JSON of the answer; the
    connection must then be closed by the server."""
    reader, writer = await connect(lane)
    writer.write(request)
    status, headers, body = await read_response(reader)
    assert await closed(reader)
    writer.close()
    return status, headers, orjson.loads(body)


async def still_serves(lane: HttpLane) -> None:
    reader, writer = await connect(lane)
    writer.write(post(CLEAN))
    assert (await read_response(reader))[0] == 200
    writer.close()


class TestHead:
    """The request line and headers are capped as they arrive: 414 or 431, then a close."""

    async def test_long_url_gets_414_and_a_close(self, lane):
        """A request target 8x the cap, never finished, is answered 414 without waiting for its end."""
        target = b"/" + b"a" * (8 * http_lane.MAX_URL)
        status, headers, body = await refused(lane, b"POST " + target)
        assert (status, body["error"], headers["connection"]) == (414, "uri_too_long", "close")
        assert errors(lane, "uri_too_long") == 1
        await still_serves(lane)

    async def test_big_header_block_gets_431_and_a_close(self, lane):
        """One header value 8x the head cap, never finished, is answered 431."""
        head = b"POST /process HTTP/1.1\r\nhost: x\r\nx-big: " + b"v" * (8 * http_lane.MAX_HEAD)
        status, _, body = await refused(lane, head)
        assert (status, body["error"]) == (431, "headers_too_large")
        assert errors(lane, "headers_too_large") == 1
        await still_serves(lane)

    async def test_many_small_headers_get_431(self, lane):
        """More header lines than MAX_HEADERS, though the head is small, are answered 431."""
        lines = b"".join(b"x-%d: v\r\n" % i for i in range(http_lane.MAX_HEADERS + 1))
        assert len(lines) < http_lane.MAX_HEAD
        status, _, body = await refused(lane, post(CLEAN, extra=lines))
        assert (status, body["error"]) == (431, "headers_too_large")
        assert errors(lane, "headers_too_large") == 1

    async def test_envoy_sized_head_is_served(self, lane):
        """A head as big as the cap allows (minus one feeding step's slack) is served."""
        filler = b"x-pad: " + b"v" * (http_lane.MAX_HEAD - 400) + b"\r\n"
        reader, writer = await connect(lane)
        writer.write(post(CLEAN, extra=filler))
        assert (await read_response(reader))[0] == 200
        writer.close()

    async def test_a_refused_peer_that_never_closes_is_dropped(self):
        """After a refusal the lane half-closes and drops what follows; a peer that keeps its
        side open is aborted at the message deadline, so it holds nothing for long."""
        async with lane_with(**FAST) as lane:
            reader, writer = await connect(lane)
            writer.write(b"POST /" + b"a" * (2 * http_lane.MAX_URL))
            assert (await read_response(reader))[0] == 414
            await until(lambda: not lane.connections)
            writer.close()


class TestSlowPeers:
    """Only a complete message restarts the clocks: bytes that complete nothing cannot hold a connection."""

    async def test_crlf_trickle_is_closed_at_the_message_deadline(self):
        """A bare CRLF sent faster than the idle timeout no longer keeps the connection: 408, closed."""
        async with lane_with(**FAST) as lane:
            reader, writer = await connect(lane)

            async def trickle() -> None:
                while True:
                    writer.write(b"\r\n")
                    await asyncio.sleep(FAST["sweep_seconds"])

            task = asyncio.create_task(trickle())
            try:
                status, _, body = await read_response(reader)
                assert (status, orjson.loads(body)["error"]) == (408, "timeout")
                assert await closed(reader)
            finally:
                task.cancel()
                writer.close()
            assert errors(lane, "timeout") == 1

    async def test_head_trickled_byte_by_byte_gets_408(self):
        """Slowloris: a header value that never ends, a byte at a time, meets the message
        deadline counted from its first byte."""
        async with lane_with(**FAST) as lane:
            reader, writer = await connect(lane)

            async def trickle() -> None:
                for byte in b"POST /process HTTP/1.1\r\nx-slow: ":
                    writer.write(bytes([byte]))
                    await asyncio.sleep(0)
                while True:
                    writer.write(b"v")
                    await asyncio.sleep(FAST["sweep_seconds"] / 5)

            task = asyncio.create_task(trickle())
            try:
                assert (await read_response(reader))[0] == 408
            finally:
                task.cancel()
                writer.close()
            assert errors(lane, "timeout") == 1


@contextlib.asynccontextmanager
async def flood(lane: HttpLane, requests: int) -> AsyncIterator[asyncio.Transport]:
    """Pipeline `requests` requests and never read an answer; yields the server's transport.
    Small kernel buffers on both sides, so the answers pile up in the server, not the kernel."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", lane.port))
    connection = await until(lambda: next(iter(lane.connections), None))
    transport = connection.transport
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sender = asyncio.create_task(loop.sock_sendall(sock, post(CLEAN) * requests))
    try:
        yield transport
    finally:
        sender.cancel()
        sock.close()


class TestPipelinedFlood:
    """A peer that pipelines requests and never reads the answers holds a bounded buffer."""

    @staticmethod
    async def held_after_flood(requests: int) -> tuple[int, int]:
        """(bytes the server holds for the connection, messages answered) once it stops reading
        or has answered them all."""
        async with lane_with() as lane, flood(lane, requests) as transport:
            connection = next(iter(lane.connections))
            answered = lane.processor.tallies["request_headers"]
            await until(lambda: not transport.is_reading() or answered.count == requests)
            held = transport.get_write_buffer_size() + len(getattr(connection, "unparsed", b""))
            return held, answered.count

    async def test_unread_answers_hold_a_bounded_buffer(self):
        """n and 8n pipelined requests: the server holds about the same, not 8x (was: 104 MB for 14 MB)."""
        n = 3000
        held_n, _ = await self.held_after_flood(n)
        held_8n, answered_8n = await self.held_after_flood(8 * n)
        assert answered_8n < 8 * n  # it stopped reading ...
        assert held_8n < 2 * held_n  # ... and held no more for a longer flood
        # What the connection may hold: the high-water mark, the answers to one feeding step
        # of requests, and one read of the event loop (256 KiB for asyncio's selector loop).
        assert held_8n <= http_lane.WRITE_HIGH_WATER + 2 * http_lane.MAX_HEAD + 256 * 1024

    async def test_a_peer_that_never_reads_is_dropped_at_the_message_deadline(self):
        """The unparsed rest of a flood starts the message clock: 408, then the connection is
        aborted, since the peer neither reads the answer nor closes."""
        async with lane_with(**FAST) as lane, flood(lane, 20_000) as transport:
            await until(lambda: not transport.is_reading())
            await until(lambda: not lane.connections)
            assert errors(lane, "timeout") == 1


class ScriptedTransport:
    """A transport whose peer reads nothing: every answer stays buffered, and the first one
    already passes the high-water mark (so the protocol is told to pause at once)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.reading = True
        self.closing = False
        self.protocol: asyncio.Protocol | None = None

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written.append(data)
        assert self.protocol is not None
        self.protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return sum(map(len, self.written))

    def pause_reading(self) -> None:
        self.reading = False

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str) -> object:
        return None


class TestScriptedFraming:
    """The connection over a scripted transport: exact boundaries a socket cannot promise."""

    async def test_a_waiting_message_cut_at_a_boundary_still_starts_the_clock(self):
        """A pause that falls exactly between two messages leaves the second one unparsed: its
        bytes arrived, so the message deadline runs for it (408), not the idle timeout."""
        async with lane_with(**FAST) as lane:
            connection = http_lane._Connection(lane)
            transport = ScriptedTransport()
            transport.protocol = connection
            connection.connection_made(transport)  # type: ignore[arg-type]
            # One piece of the head-reading step is exactly the first message.
            step = http_lane.MAX_HEAD + 1
            first = post(CLEAN + b" " * (step - len(post(CLEAN + b" " * 10_000)) + 10_000))
            assert len(first) == step
            connection.data_received(first + post(CLEAN))
            assert not transport.reading and len(transport.written) == 1
            connection.check(connection.idle_since + FAST["message_seconds"] + 0.01)
            assert transport.written[-1].startswith(b"HTTP/1.1 408")
            assert errors(lane, "timeout") == 1
            connection.connection_lost(None)


class TestConnectionCap:
    async def test_connections_beyond_the_cap_get_503_and_a_close(self):
        """Past max_connections a connection is answered 503 and closed; a freed place is used again."""
        async with lane_with(max_connections=2) as lane:
            first, second = [await connect(lane) for _ in range(2)]
            await until(lambda: len(lane.connections) == 2)
            reader, writer = await connect(lane)
            status, _, body = await read_response(reader)
            assert (status, orjson.loads(body)["error"]) == (503, "too_many_connections")
            assert await closed(reader)
            writer.close()
            assert errors(lane, "too_many_connections") == 1
            assert len(lane.connections) == 2
            first[1].close()
            await until(lambda: len(lane.connections) == 1)
            await still_serves(lane)
            second[1].close()


class TestBufferedBudget:
    async def test_bodies_over_the_lanes_budget_get_503_and_the_budget_is_released(self):
        """The lane buffers at most max_buffered body bytes over all connections; 503 past it."""
        body = CLEAN + b" " * 3000
        async with lane_with(max_buffered=len(body) + 1000) as lane:
            reader, writer = await connect(lane)
            request = post(body)
            writer.write(request[:-500])  # most of one body, held by the lane
            await until(lambda: lane.buffered > 0)
            status, _, answer = await refused(lane, post(body))
            assert (status, answer["error"]) == (503, "overloaded")
            assert errors(lane, "overloaded") == 1
            writer.write(request[-500:])  # the first message completes within the budget
            assert (await read_response(reader))[0] == 200
            assert lane.buffered == 0
            await still_serves(lane)
            writer.close()


class TestUpgrade:
    """This lane speaks plain HTTP/1.1: a protocol switch is refused with 400, never a traceback."""

    @pytest.mark.parametrize(
        "request_bytes",
        [
            b"GET / HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n"
            b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
            post(
                CLEAN,
                extra=b"connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n"
                b"http2-settings: AAMAAABkAAQAAP__\r\n",
            ),
            b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n",
        ],
        ids=["websocket", "h2c", "connect"],
    )
    async def test_upgrade_and_connect_get_400_and_a_counter(self, lane, request_bytes, caplog):
        """Upgrade or CONNECT: 400 upgrade_refused, closed, no message processed, the lane still serves."""
        caplog.set_level(logging.ERROR, logger="asyncio")
        status, _, body = await refused(lane, request_bytes)
        assert (status, body["error"]) == (400, "upgrade_refused")
        assert errors(lane, "upgrade_refused") == 1
        assert lane.processor.tallies["request_headers"].count == 0
        await still_serves(lane)
        assert not [r for r in caplog.records if r.name == "asyncio"]  # no "Fatal error"

    async def test_http2_preface_gets_400(self, lane):
        """HTTP/2 with prior knowledge is not HTTP/1.1: 400 bad_request and a close."""
        status, _, body = await refused(lane, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        assert (status, body["error"]) == (400, "bad_request")


class TestWarnings:
    async def test_refusals_are_all_counted_but_logged_at_most_once_a_period(self, lane):
        """A peer that makes every message an error gets every one counted, and one log line."""
        with capture_logs() as logs:
            reader, writer = await connect(lane)
            for _ in range(5):
                writer.write(post(b"{not json"))
                assert (await read_response(reader))[0] == 400
            writer.close()
        assert errors(lane, "bad_json") == 5
        assert [entry["error"] for entry in logs if entry["event"] == "bad_http_request"] == [
            "bad_json"
        ]


class TestServeOption:
    async def test_http_max_connections_reaches_the_lane(self):
        """`serve --http-max-connections 1`: a second connection to the running server gets 503."""
        port = free_port()
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "extproc", "serve", "--listen", "none",
            "--http-listen", f"127.0.0.1:{port}", "--http-max-connections", "1",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            await until(lambda: _accepts(port))
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post(CLEAN))
            assert (await read_response(reader))[0] == 200  # the one place is taken
            second_reader, second = await asyncio.open_connection("127.0.0.1", port)
            status, _, body = await read_response(second_reader)
            assert (status, orjson.loads(body)["error"]) == (503, "too_many_connections")
            writer.close()
            second.close()
        finally:
            server.terminate()
            assert await server.wait() == 0

    async def test_default_is_the_lanes_constant(self):
        """The option's default is the lane's MAX_CONNECTIONS; zero is refused by name."""
        from extproc.cli import ConfigError, build_parser, serve_config

        parse = build_parser().parse_args
        assert serve_config(parse(["serve"])).http_max_connections == http_lane.MAX_CONNECTIONS
        with pytest.raises(ConfigError, match="--http-max-connections must be at least 1"):
            serve_config(parse(["serve", "--http-max-connections", "0"]))


def _accepts(port: int) -> bool:
    """The server answers GET /ready on a connection it then closes (so the place is free again)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            return conn.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False
