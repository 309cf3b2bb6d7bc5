"""The HTTP lane's floor: an ext_proc `http_service` server that does nothing.

uvloop, httptools and orjson, as the real lane uses: each POSTed ProcessingRequest is
parsed only far enough to find its kind, and answered with that kind's continue, built
once. No rules, no diagnosis, no metrics. "Ours over HTTP vs this" is the core's cost.
`GET` answers 200 (the bench waits for it).

    python -m bench.naive_http --listen 127.0.0.1:50080
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast

import httptools
import orjson

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]

KINDS = ("request_headers", "response_headers", "request_body", "response_body",
         "request_trailers", "response_trailers")  # fmt: skip


def _http(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


CONTINUE = {kind: _http(orjson.dumps({kind: {}})) for kind in KINDS}
READY = _http(b"{}")


class Naive(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.body.clear()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        if self.parser.get_method() != b"POST":
            self.transport.write(READY)
            return
        doc = orjson.loads(b"".join(self.body))
        kind = next(k for k in doc if k in CONTINUE)
        self.transport.write(CONTINUE[kind])


async def serve(listen: str) -> None:
    host, _, port = listen.rpartition(":")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Naive, host or None, int(port))
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_http", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:50080", help="HOST:PORT")
    listen = parser.parse_args().listen
    if uvloop is None:
        asyncio.run(serve(listen))
    else:
        uvloop.run(serve(listen))


if __name__ == "__main__":
    main()
