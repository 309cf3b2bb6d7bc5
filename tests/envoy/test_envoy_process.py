"""Tests for extproc.lab.envoy and the lab's plumbing against the real Envoy binary."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from extproc.lab import EnvoyError, EnvoyProcess, Lab, validate

pytestmark = pytest.mark.envoy

BAD_BOOTSTRAP = {
    "static_resources": {"clusters": [{"name": "x", "type": "STATIC", "connect_timeout": "soon"}]}
}


class TestEnvoyProcess:
    def test_start_failure_carries_envoys_complaint(self, tmp_path: Path) -> None:
        """When Envoy exits during start-up, the error quotes the end of its log."""
        complaint = r"(?s)exited with status 1.*connect_timeout"
        with (
            pytest.raises(EnvoyError, match=complaint),
            EnvoyProcess(BAD_BOOTSTRAP, workdir=tmp_path),
        ):
            pass

    def test_validate_rejects_a_bad_bootstrap(self) -> None:
        """`validate` raises with Envoy's own message."""
        with pytest.raises(EnvoyError, match="Duration"):
            validate(BAD_BOOTSTRAP)

    def test_live_inside_the_block_and_gone_after(self, tmp_path: Path) -> None:
        """Inside the block admin answers LIVE; after it, nothing listens on its port."""
        with EnvoyProcess({}, workdir=tmp_path) as envoy:
            assert envoy.admin_get("/ready") == (200, "LIVE\n")
            port = envoy.admin_port
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()


class TestLab:
    def test_request_headers_reach_the_echo_upstream(self, recording_lab: Lab) -> None:
        """Repeated request headers arrive at the upstream, in order."""
        response = recording_lab.request("echo.demo", "/x?y=1", [("x-dup", "a"), ("x-dup", "b")])
        echoed = json.loads(response.body)
        assert response.status == 200
        assert echoed["path"] == "/x?y=1"
        assert [v for k, v in echoed["headers"] if k == "x-dup"] == ["a", "b"]

    def test_access_log_records_the_request(self, recording_lab: Lab) -> None:
        """The response's x-request-id finds the request's JSON access log entry."""
        host = "orders.default.svc.cluster.local"
        response = recording_lab.request(host)
        request_id = response.header("x-request-id")
        assert request_id is not None
        entry = recording_lab.access_log_entry(request_id)
        assert (entry["response_code"], entry["response_flags"]) == (503, "UF")
        assert entry["authority"] == host
