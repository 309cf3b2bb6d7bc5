"""The HTTP lane over real sockets: bad input gets an HTTP error and a counter, never a crash.

The messages' meaning is tested through both adapters in test_adapters.py; here only the
envelope: framing, errors, limits, timeouts, readiness, TLS and the drain.
"""

from __future__ import annotations

import asyncio
import ssl

import orjson
import pytest
import pytest_asyncio

from extproc import http_lane
from extproc.config import Policy, TlsFiles
from extproc.http_lane import HttpLane, HttpProcessor
from extproc.lab.certs import CertificateAuthority
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


@pytest_asyncio.fixture
async def lane():
    async with HttpLane(HttpProcessor(Policy()), "127.0.0.1:0", grace=1.0) as running:
        yield running


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


async def test_body_over_the_limit_gets_413_and_a_close(lane, monkeypatch):
    monkeypatch.setattr(http_lane, "MAX_BODY", 1000)
    reader, writer = await connect(lane)
    writer.write(post(b"x" * 5000)[:1800])  # the rest would still be in flight at the close
    status, headers, _ = await read_response(reader)
    assert status == 413
    assert headers["connection"] == "close"
    assert await reader.read() == b""
    assert errors(lane, "too_large") == 1
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


async def test_slow_message_gets_408_and_idle_connection_closes(lane, monkeypatch):
    monkeypatch.setattr(http_lane, "MESSAGE_SECONDS", 0.2)
    monkeypatch.setattr(http_lane, "IDLE_SECONDS", 0.3)
    monkeypatch.setattr(http_lane, "SWEEP_SECONDS", 0.05)
    lane._sweeper.cancel()
    lane._sweeper = asyncio.create_task(lane._sweep())
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
