"""Peak RSS of `extproc serve --ui-listen` while many distinct clusters fail.

Not a test: it prints numbers. A real `extproc serve` process gets, over gRPC, one
failing request per cluster (Envoy 1.40's attributes for a refused upstream, with the
cluster name changed each time) for N distinct clusters, several times each, with the
page on and, for comparison, off. Its peak RSS (VmHWM from /proc) is read before and
after, and the page's /api/failures is read once at the end (the snapshot costs too):

    .venv/bin/python -m bench.page_memory 10000
"""

from __future__ import annotations

import asyncio
import http.client
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

from extproc.core import ATTRIBUTES_KEY
from extproc.lab.envoy import free_port

# What Envoy 1.40 sends for a refused mesh upstream (tests/conftest.py REFUSED_MESH).
REFUSED = {
    "response.code": 503,
    "response.flags": 32,
    "response.code_details": "upstream_reset_before_response_started"
    "{remote_connection_failure|delayed_connect_error:_Connection_refused}",
    "upstream.transport_failure_reason": "delayed connect error: Connection refused",
    "upstream.address": "10.244.1.17:9080",
}
ROUNDS = 3  # failures per cluster
CONCURRENCY = 64


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1)) / 1024


def messages(cluster: str) -> list[pb.ProcessingRequest]:
    headers = pb.HttpHeaders()
    for key, value in ((":method", "GET"), (":path", "/cart?x=1"), (":authority", "shop"),
                       ("x-request-id", "0f4c2a")):  # fmt: skip
        headers.headers.headers.add(key=key, raw_value=value.encode())
    request = pb.ProcessingRequest(request_headers=headers)
    status = pb.HttpHeaders()
    status.headers.headers.add(key=":status", raw_value=b"503")
    response = pb.ProcessingRequest(response_headers=status)
    attributes = struct_pb2.Struct()
    attributes.update({**REFUSED, "xds.cluster_name": cluster})
    response.attributes[ATTRIBUTES_KEY].CopyFrom(attributes)
    return [request, response]


async def fail(port: int, clusters: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(cluster: str) -> None:
            async with gate:
                call = stub.Process()
                for message in messages(cluster):
                    await call.write(message)
                    await call.read()
                await call.done_writing()

        for _ in range(ROUNDS):
            await asyncio.gather(
                *(
                    one(f"outbound|8080||svc-{i}.ns-{i % 50}.svc.cluster.local")
                    for i in range(clusters)
                )
            )


def wait_ready(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                grpc.channel_ready_future(channel).result(timeout=1)
                return
        except grpc.FutureTimeoutError:
            continue
    raise RuntimeError("the server did not start")


def measure(clusters: int, page: bool) -> tuple[float, float, float]:
    """(peak RSS MB at start, after the failures, after one /api/failures) of one server."""
    port, ui = free_port(), free_port()
    command = [sys.executable, "-m", "extproc", "--log-level", "error", "serve",
               "--listen", f"127.0.0.1:{port}"]  # fmt: skip
    if page:
        command += ["--ui-listen", f"127.0.0.1:{ui}"]
    server = subprocess.Popen(command)
    try:
        wait_ready(port)
        start = peak_rss_mb(server.pid)
        asyncio.run(fail(port, clusters))
        after = peak_rss_mb(server.pid)
        if page:
            connection = http.client.HTTPConnection("127.0.0.1", ui, timeout=60)
            connection.request("GET", "/api/failures")
            connection.getresponse().read()
        return start, after, peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(sizes: list[int]) -> None:
    print(f"{'clusters':>9} {'page':>5} {'start MB':>9} {'failures MB':>12} {'snapshot MB':>12}")
    for clusters in sizes:
        for page in (False, True):
            start, after, snap = measure(clusters, page)
            print(f"{clusters:>9} {'on' if page else 'off':>5} {start:>9.1f} {after:>12.1f} "
                  f"{snap:>12.1f}")  # fmt: skip


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [10_000])
