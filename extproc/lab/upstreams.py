"""Tiny HTTP/1.1 upstreams on 127.0.0.1:0, each served from a background thread.

The echo upstream answers with what reached it, so a test can see which request headers
survived Envoy and the ext_proc server: names exactly as sent, duplicates kept, values
decoded as latin-1 (as HTTP/1.1 octets map to characters). The status upstream answers
one fixed status, standing in for an application that fails on its own.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self


class _Handler(BaseHTTPRequestHandler):
    """Keep-alive HTTP/1.1 with Content-Length on every answer; subclasses pick the answer."""

    protocol_version = "HTTP/1.1"

    def answer(self) -> tuple[int, str, bytes]:
        """(status, content type, body) for the request just read."""
        raise NotImplementedError

    def handle_request(self) -> None:
        """Drain the request body, then send `answer()`."""
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        status, content_type, body = self.answer()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = handle_request

    def log_message(self, format: str, *args: object) -> None:
        """Silence the per-request stderr line."""


class _EchoHandler(_Handler):
    def answer(self) -> tuple[int, str, bytes]:
        received = {
            "method": self.command,
            "path": self.path,
            "headers": [[name, value] for name, value in self.headers.raw_items()],
        }
        return 200, "application/json", json.dumps(received).encode()


def _status_handler(status: int, body: bytes) -> type[_Handler]:
    class StatusHandler(_Handler):
        def answer(self) -> tuple[int, str, bytes]:
            return status, "text/plain", body

    return StatusHandler


class HttpUpstream:
    """An HTTP server on 127.0.0.1 for the duration of a `with` block."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._handler = handler
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port."""
        if self._server is None:
            raise RuntimeError("the upstream is not running")
        return self._server.server_port

    def __enter__(self) -> Self:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None


def echo_upstream() -> HttpUpstream:
    """Answers 200 with JSON `{"method", "path", "headers": [[name, value], ...]}`."""
    return HttpUpstream(_EchoHandler)


def status_upstream(status: int = 503, body: bytes = b"app says no") -> HttpUpstream:
    """Answers every request with `status` and `body`: an application failing on its own."""
    return HttpUpstream(_status_handler(status, body))
