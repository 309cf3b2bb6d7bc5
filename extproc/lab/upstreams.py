"""Tiny upstreams on 127.0.0.1:0, each served from a background thread.

The echo upstream answers with what reached it, so a test can see which request headers
survived Envoy and the ext_proc server: names exactly as sent, duplicates kept, values
decoded as latin-1 (as HTTP/1.1 octets map to characters). The status upstream answers
one fixed status, standing in for an application that fails on its own.

The others fail the way real servers do, to give Envoy's own evidence for it: a TLS app
that closes a kept-alive connection as the next request arrives on it (the keep-alive
race), a TLS front door that refuses a ClientHello without SNI (a CDN), and a gRPC
server whose every call ends UNAVAILABLE.
"""

from __future__ import annotations

import json
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

import grpc

from extproc.lab.certs import CertFiles


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


class _KeepAliveCloseHandler(_EchoHandler):
    """Answers the first request on a connection and keeps it open; closes it, unanswered,
    when the next request arrives: what Envoy sees when an upstream's idle timeout fires
    just as it reuses the connection."""

    def setup(self) -> None:
        super().setup()
        self._answered = False

    def handle_one_request(self) -> None:
        if self._answered:
            self.rfile.readline(65537)  # the next request line arrives...
            self.close_connection = True  # ...and the connection closes unanswered
            return
        self._answered = True
        super().handle_one_request()


def _server_context(cert: CertFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.cert_chain, cert.private_key)
    return context


def _refuse_without_sni(sock: ssl.SSLObject, server_name: str, _: ssl.SSLContext) -> int | None:
    """The SNI callback of a front door that routes by server name (a CDN): no name, no hello.

    Python passes None for a hello without SNI (typeshed says str).
    """
    return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE if not server_name else None


class HttpUpstream:
    """An HTTP server on 127.0.0.1 for the duration of a `with` block; over TLS with `tls`.

    The TLS handshake runs as the server accepts; a failed one only drops that connection.
    """

    def __init__(
        self, handler: type[BaseHTTPRequestHandler], *, tls: ssl.SSLContext | None = None
    ) -> None:
        self._handler = handler
        self._tls = tls
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
        if self._tls is not None:
            self._server.socket = self._tls.wrap_socket(self._server.socket, server_side=True)
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


def keepalive_close_upstream(cert: CertFiles | None) -> HttpUpstream:
    """An echo app that closes each kept-alive connection when a second request arrives on it.

    With `cert`, it speaks TLS and asks for a client certificate from `cert`'s CA, as a
    STRICT mesh server does; without, it is a plaintext app behind its sidecar.
    """
    if cert is None:
        return HttpUpstream(_KeepAliveCloseHandler)
    context = _server_context(cert)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cert.trusted_ca)
    return HttpUpstream(_KeepAliveCloseHandler, tls=context)


def sni_required_upstream(cert: CertFiles) -> HttpUpstream:
    """A TLS echo app that answers a ClientHello without SNI with a handshake_failure alert."""
    context = _server_context(cert)
    context.sni_callback = _refuse_without_sni
    return HttpUpstream(_EchoHandler, tls=context)


class _Unavailable:
    """Every method of every service ends UNAVAILABLE before any message: a trailers-only answer.

    A generic RPC handler: grpc asks only for its `service` method.
    """

    def service(self, handler_call_details: Any) -> Any:
        def abort(requests: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the app is unavailable")

        return grpc.stream_stream_rpc_method_handler(abort)


class GrpcUnavailableUpstream:
    """A plaintext HTTP/2 gRPC server on 127.0.0.1 for the duration of a `with` block."""

    def __init__(self) -> None:
        self._server: grpc.Server | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the upstream is not running")
        return self._port

    def __enter__(self) -> Self:
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4))
        self._server.add_generic_rpc_handlers((_Unavailable(),))
        self._port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
        self._server = self._port = None
