"""Policy reload in a running `extproc serve`: SIGHUP applies a good file and refuses a broken one."""

from __future__ import annotations

import signal

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from tests.conftest import mutated, request_headers

from .conftest import ServerProcess, log_events, wait_until


def authority_after(server: ServerProcess, host: str) -> str | None:
    """What the server rewrites `host` to, over a real Process stream (None: unchanged)."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process(
            iter([request_headers([(":authority", host)])])
        )
        (answer,) = list(call)
    return mutated(answer, "request_headers").get(":authority")


def reloads(server: ServerProcess) -> list[dict]:
    return [e for e in log_events(server.log()) if e["event"].startswith("policy_reload")]


def test_sighup_reload_good_then_broken(server_process: ServerProcess, tmp_path) -> None:
    """A good file is applied on SIGHUP; a broken one is logged with file, line and key and changes nothing."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("mode: enforce\n")
    server_process.args = ("--config", str(policy))
    server_process.start()
    assert authority_after(server_process, "shop.example.com") is None

    policy.write_text("host_rewrites:\n  shop.example.com: shop.default.svc.cluster.local\n")
    server_process.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: len(reloads(server_process)) == 1)
    assert authority_after(server_process, "shop.example.com") == "shop.default.svc.cluster.local"

    policy.write_text(
        "host_rewrites:\n  shop.example.com: shop.default.svc.cluster.local\nmode: sometimes\n"
    )
    server_process.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: len(reloads(server_process)) == 2)
    failed = reloads(server_process)[-1]
    assert failed["event"] == "policy_reload_failed"
    assert f"{policy}:3: mode: expected one of enforce, report" in failed["problem"]
    assert authority_after(server_process, "shop.example.com") == "shop.default.svc.cluster.local"
