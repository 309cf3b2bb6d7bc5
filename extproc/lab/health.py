"""Waiting for a server process to answer the standard gRPC health check."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class NotServing(RuntimeError):
    """The server exited, or did not answer SERVING in time; the message carries its log."""


def wait_serving(
    target: str, process: subprocess.Popen[bytes], log: Callable[[], str], timeout: float = 15.0
) -> None:
    """Until `target` (HOST:PORT or unix:PATH) answers SERVING; fails at once if `process` exits."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise NotServing(f"{process.args!r} exited {process.returncode}:\n{log()}")
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=0.5
                )
            except grpc.RpcError:
                continue
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
    raise NotServing(f"{target} not SERVING within {timeout:g}s:\n{log()}")
