"""TLS for the gRPC and HTTP listeners, with certificates re-read when their files change.

gRPC asks `_fetch` before each new connection's handshake; it answers None (no change)
after one `stat` per file, so connections keep their cost and a rotated certificate
(cert-manager, an SDS-written file, a Kubernetes Secret update) is served without a
restart. New files are checked with Python's ssl module before gRPC sees them: a
half-written or mismatched pair keeps the old one serving and is logged.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc
import structlog

from extproc.config import TlsFiles

log = structlog.get_logger("extproc")


class TlsError(ValueError):
    """The TLS files cannot be used; the message names the file."""


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_mtime_ns, st.st_ino, st.st_size)


def _read(files: TlsFiles) -> tuple[bytes, bytes, bytes | None]:
    """Read and check the files: the key matches the certificate, the CA parses."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(
            f"{files.cert} / {files.key}: not a usable certificate and key: {exc}"
        ) from None
    if files.client_ca is not None:
        try:
            context.load_verify_locations(files.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"{files.client_ca}: not a usable CA bundle: {exc}") from None
    ca = files.client_ca.read_bytes() if files.client_ca else None
    return files.cert.read_bytes(), files.key.read_bytes(), ca


class ReloadingCredentials:
    """Server credentials that follow the files. Raises TlsError at start if they are unusable."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._paths = [p for p in (files.cert, files.key, files.client_ca) if p is not None]
        self._stamps = self._current_stamps()
        self._initial = self._configuration(*_read(files))
        self.reloads = 0

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial,
            self._fetch,
            require_client_authentication=self.files.client_ca is not None,
        )

    def _current_stamps(self) -> list[tuple[int, int, int]]:
        return [_stamp(p) for p in self._paths]

    @staticmethod
    def _configuration(
        cert: bytes, key: bytes, ca: bytes | None
    ) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            stamps = self._current_stamps()
            if stamps == self._stamps:
                return None
            config = self._configuration(*_read(self.files))
        except (OSError, TlsError) as exc:
            log.error("tls_reload_failed", problem=str(exc))
            return None
        self._stamps = stamps
        self.reloads += 1
        log.info("tls_reloaded", cert=str(self.files.cert))
        return config


class ReloadingSslContext:
    """The HTTP lane's TLS: an `ssl.SSLContext` that follows the files, as the gRPC one does.

    Before each handshake (`sni_callback`, called for every ClientHello) one `stat` per
    file tells whether they changed; new files are checked, then the handshake switches
    to a context built from them. Raises TlsError at start if they are unusable.
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._paths = [p for p in (files.cert, files.key, files.client_ca) if p is not None]
        self._stamps = [_stamp(p) for p in self._paths]
        self._current = self._build()
        self.context = self._build()
        self.context.sni_callback = self._choose
        self.reloads = 0

    def _build(self) -> ssl.SSLContext:
        _read(self.files)  # names the file that is wrong
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.files.cert, self.files.key)
        if self.files.client_ca is not None:
            context.load_verify_locations(self.files.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _choose(self, sock: ssl.SSLObject, _name: str | None, _context: ssl.SSLContext) -> None:
        try:
            stamps = [_stamp(p) for p in self._paths]
            if stamps != self._stamps:
                self._current = self._build()
                self._stamps = stamps
                self.reloads += 1
                log.info("tls_reloaded", cert=str(self.files.cert))
        except (OSError, ssl.SSLError, TlsError) as exc:
            log.error("tls_reload_failed", problem=str(exc))
        sock.context = self._current
