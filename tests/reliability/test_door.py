"""A hostile peer holds the gRPC door full; a real Envoy's requests are still processed."""

from __future__ import annotations

import asyncio
import http.client
import http.server
import json
import re
import threading
from pathlib import Path
from typing import Any, Self

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.lab.envoy import EnvoyProcess, free_port
from tests.conftest import request_headers

from .conftest import LOOPBACK, ServerProcess, bootstrap, metrics_text, wait_until

pytestmark = pytest.mark.envoy

MAX_STREAMS = 4
# Envoy connects from another loopback address, as an Envoy in another pod would.
ENVOY_SOURCE = "127.0.0.2"


class Hostile:
    """Keeps `streams` ext_proc streams open, each silent or idle after one message,
    opening a new one whenever the server ends one: an attacker that does not give up."""

    def __init__(self, target: str, streams: int, *, speak: bool) -> None:
        self.target = target
        self.streams = streams
        self.speak = speak
        self.ended = 0
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the hostile client did not stop"
        self._loop.close()

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)
            holders = [asyncio.create_task(self._hold(stub)) for _ in range(self.streams)]
            await self._stop.wait()
            for task in holders:
                task.cancel()
            # Bounded: whatever a holder waits on, leaving the channel cancels its call.
            await asyncio.wait(holders, timeout=10)

    async def _hold(self, stub: pb_grpc.ExternalProcessorStub) -> None:
        # Checked each time round: grpc.aio may turn the task's cancellation into an
        # AioRpcError(CANCELLED), which the loop catches, so cancelling alone could leave
        # it running and `__exit__` waiting (seen once in a fresh-clone run).
        while not self._stop.is_set():
            call = stub.Process()
            try:
                if self.speak:
                    await call.write(request_headers([(":authority", "a")]))
                    await call.read()
                await call.code()  # until the server ends it
            except grpc.aio.AioRpcError:
                pass
            finally:
                call.cancel()
            self.ended += 1
            await asyncio.sleep(0.05)  # the attacker's pace, so a refused loop does not spin


def ext_proc_stats(envoy: EnvoyProcess) -> dict[str, int]:
    _, body = envoy.admin_get("/stats?format=json&filter=ext_proc")
    return {
        s["name"].rsplit(".", 1)[1]: int(s.get("value", 0))
        for s in json.loads(body).get("stats", [])
        if "value" in s
    }


def active_streams(metrics_port: int) -> float:
    match = re.search(r"^extproc_streams_active (\S+)$", metrics_text(metrics_port), re.M)
    return float(match.group(1)) if match else 0.0


@pytest.mark.parametrize("speak", [False, True], ids=["silent", "idle-after-one-message"])
def test_hostile_idle_streams_do_not_lock_envoy_out(
    server_process: ServerProcess, tmp_path: Path, speak: bool
) -> None:
    """With twice --max-streams hostile streams held open, Envoy's requests are processed, none fails open."""
    metrics_port = free_port()
    server_process.args = (
        "--max-streams", str(MAX_STREAMS), "--metrics-listen", f"{LOOPBACK}:{metrics_port}",
    )  # fmt: skip
    server_process.start()
    config = bootstrap(server_process.port)
    (extproc_cluster,) = (
        c for c in config["static_resources"]["clusters"] if c["name"] != "refused"
    )
    extproc_cluster["upstream_bind_config"] = {
        "source_address": {"address": ENVOY_SOURCE, "port_value": 0}
    }
    with Hostile(server_process.listen, 2 * MAX_STREAMS, speak=speak) as hostile:
        assert wait_until(lambda: active_streams(metrics_port) == MAX_STREAMS)
        (tmp_path / "envoy").mkdir()
        with EnvoyProcess(config, workdir=tmp_path / "envoy") as envoy:
            port = envoy.listener_ports()["ingress"]
            annotated = [_annotated(port) for _ in range(20)]
            stats = ext_proc_stats(envoy)
        # Envoy's places were taken from the hostile streams, not found free.
        assert wait_until(lambda: hostile.ended > 0)
    assert annotated == [True] * 20, stats
    assert stats["failure_mode_allowed"] == 0
    assert stats["streams_started"] >= 20


def _annotated(port: int) -> bool:
    """One request to the refused route: did the server's diagnosis reach the client?"""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
    try:
        conn.request("GET", "/fail")
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    return response.status == 503 and response.getheader("x-extproc-diagnosis") is not None


class _SlowUpstream(http.server.BaseHTTPRequestHandler):
    """Answers 200 after the server's idle timeout has closed the request's stream."""

    delay = threading.Event()

    def do_GET(self) -> None:
        self.delay.wait(timeout=30)
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


def test_a_stream_closed_for_idling_serves_the_request(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    """A response slower than --stream-idle-timeout is served unannotated; Envoy counts no failure."""
    metrics_port = free_port()
    server_process.args = (
        "--stream-idle-timeout", "2", "--metrics-listen", f"{LOOPBACK}:{metrics_port}",
    )  # fmt: skip
    server_process.start()
    _SlowUpstream.delay.clear()
    upstream = http.server.ThreadingHTTPServer((LOOPBACK, 0), _SlowUpstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    config = _with_route(bootstrap(server_process.port), "/slow", upstream.server_address[1])
    (tmp_path / "envoy").mkdir()
    try:
        with EnvoyProcess(config, workdir=tmp_path / "envoy") as envoy:
            port = envoy.listener_ports()["ingress"]
            conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
            conn.request("GET", "/slow")
            # The upstream answers once the server has closed the idle stream.
            assert wait_until(lambda: _closed_idle(metrics_port) == 1, timeout=20)
            _SlowUpstream.delay.set()
            response = conn.getresponse()
            response.read()
            conn.close()
            stats = ext_proc_stats(envoy)
    finally:
        upstream.shutdown()
        upstream.server_close()
    assert response.status == 200
    assert stats["failure_mode_allowed"] == 0, stats


def _closed_idle(metrics_port: int) -> float:
    pattern = r'^extproc_streams_closed_total\{limit="idle_timeout"\} (\S+)$'
    match = re.search(pattern, metrics_text(metrics_port), re.M)
    return float(match.group(1)) if match else 0.0


def _with_route(config: dict[str, Any], prefix: str, port: int) -> dict[str, Any]:
    """`config` with `prefix` routed to a plain HTTP upstream on `port`."""
    resources = config["static_resources"]
    hcm = resources["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    routes.insert(0, {"match": {"prefix": prefix}, "route": {"cluster": "slow", "timeout": "30s"}})
    resources["clusters"].append({
        "name": "slow", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "slow", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": LOOPBACK, "port_value": port}}}}]}]},
    })  # fmt: skip
    return config
