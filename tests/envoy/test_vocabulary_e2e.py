"""Envoy 1.40's words for a header overflow and a refused upgrade, and the reasons they get.

Neither fits the lab's scenario table: Envoy refuses both before the HTTP filters run a
request phase. A WebSocket upgrade on a connection manager without `upgrade_configs` is
answered 403 `upgrade_failed`, and the ext_proc filter sees that response alone. A
request whose headers pass 60 KiB (`max_request_headers_kb`' default) is logged `431 DPE
http1.headers_too_large`, and the client gets the connection closed, no answer: the
access log is where a user finds it (`extproc diagnose`).
"""

from __future__ import annotations

import json
import socket

import pytest

from extproc import flags as F
from extproc.accesslog import parse_access_log_line
from extproc.diagnosis import Evidence, classify
from extproc.lab import Lab

from .recording_server import RecordingServer

pytestmark = pytest.mark.envoy

# Envoy's default max_request_headers_kb is 60: a cookie of 61 KiB passes it.
OVERFLOW_COOKIE = b"a" * 61 * 1024


def exchange_raw(lab: Lab, request: bytes) -> bytes:
    """Send raw bytes to the client sidecar; what came back before it closed."""
    with socket.create_connection(("127.0.0.1", lab.port), timeout=10) as conn:
        conn.sendall(request)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
            if b"\r\n\r\n" in received:
                break
    return received


def last_log_entry(lab: Lab, before: int) -> dict[str, object]:
    return lab.access_log_entries(at_least=before + 1)[-1]


class TestUpgradeRefused:
    def test_signature_and_reason(self, recording_lab: Lab, recorder: RecordingServer) -> None:
        """403 `upgrade_failed` reaches the ext_proc server's response phase and the access
        log; both read as upgrade_rejected."""
        before = len(recording_lab.access_log_entries())
        seen = len(recorder.processor.exchanges())
        answer = exchange_raw(
            recording_lab,
            b"GET / HTTP/1.1\r\nhost: echo.demo\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 403 ")
        entry = last_log_entry(recording_lab, before)
        assert entry["response_code_details"] == "upgrade_failed"
        diagnosis = classify(parse_access_log_line(json.dumps(entry)))
        assert diagnosis is not None and diagnosis.reason == "upgrade_rejected"
        attributes = [e.response_attributes for e in recorder.processor.exchanges()[seen:]]
        assert any(a.get("response.code_details") == "upgrade_failed" for a in attributes)
        live = classify(Evidence(status=403, code_details="upgrade_failed", has_attributes=True))
        assert live is not None and live.reason == "upgrade_rejected"


class TestHeaderOverflow:
    def test_signature_and_reason(self, recording_lab: Lab) -> None:
        """431 DPE `http1.headers_too_large` in the access log reads as request_too_large,
        not a protocol error and not a circuit breaker."""
        before = len(recording_lab.access_log_entries())
        exchange_raw(
            recording_lab,
            b"GET / HTTP/1.1\r\nhost: echo.demo\r\ncookie: " + OVERFLOW_COOKIE + b"\r\n\r\n",
        )
        entry = last_log_entry(recording_lab, before)
        assert (entry["response_code"], entry["response_flags"]) == (431, "DPE")
        assert entry["response_code_details"] == "http1.headers_too_large"
        evidence = parse_access_log_line(json.dumps(entry))
        assert evidence.flags & F.DPE
        diagnosis = classify(evidence)
        assert diagnosis is not None and diagnosis.reason == "request_too_large"
