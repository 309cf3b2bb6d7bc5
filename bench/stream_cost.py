"""Instructions per whole clean gRPC stream, ours against the naive servicer.

On a shared 2-core machine req/s ratios of identical code move by 2x between rounds;
the instructions the interpreter executes do not. This counts them with valgrind's
callgrind for each server's `Process` over one clean stream, fed the two messages a real
Envoy 1.40 sends for the `always` bench row (recorded with `--record`, kept in
`bench/data/`): everything our servicer runs per stream (the door, the state, both
phases, the metrics) and what grpc.aio does for both alike (parsing each message,
serializing each answer). grpc's C core and the event loop are left out: they are the
same for both servers.

    python -m bench.stream_cost            # both servers, 1 and 1001 streams each: ~1 minute
    python -m bench.stream_cost --record   # re-record the messages from the installed Envoy
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from bench.configs import CONFIGS, bootstrap
from bench.naive_servicer import NaiveProcessor
from extproc.config import Policy
from extproc.lab.envoy import EnvoyProcess, free_ports
from extproc.server import CONTINUE, SERVICE_NAME, ExternalProcessor
from extproc.wire import parse as parse_request

DATA = Path(__file__).resolve().parent / "data" / "envoy-clean-stream.json"
SERVERS = ("naive", "ours")
_COLLECTED = re.compile(r"Collected : (\d+)")


def recorded() -> list[bytes]:
    """The clean stream's messages, as Envoy serialized them."""
    document = json.loads(DATA.read_text(encoding="utf-8"))
    return [base64.b64decode(m) for m in document["messages"]]


class _Context:
    """What `Process` asks of grpc's servicer context, answering from the recorded bytes."""

    def __init__(self, payloads: Sequence[bytes]) -> None:
        self._payloads = iter(payloads)

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-extproc-direction", "edge"),)

    async def read(self) -> Any:
        payload = next(self._payloads, None)
        return grpc.aio.EOF if payload is None else parse_request(payload)  # as the door reads

    async def write(self, response: pb.ProcessingResponse) -> None:
        response.SerializeToString()


async def _naive_requests(payloads: Sequence[bytes]) -> AsyncIterator[pb.ProcessingRequest]:
    for payload in payloads:
        yield pb.ProcessingRequest.FromString(payload)


async def run(server: str, streams: int) -> None:
    """`streams` clean streams through `server`'s Process, one after another."""
    payloads = recorded()
    if server == "ours":
        ours = ExternalProcessor(Policy())
        for _ in range(streams):
            await ours.Process(None, _Context(payloads))
        return
    naive = NaiveProcessor()
    for _ in range(streams):
        async for response in naive.Process(_naive_requests(payloads), None):
            response.SerializeToString()


def instructions(server: str, streams: int) -> int:
    """What callgrind counts for a whole run of `streams` streams (start-up included)."""
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
               "-m", "bench.stream_cost", "--run", server, "--streams", str(streams)]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    match = _COLLECTED.search(output)
    if match is None:
        raise RuntimeError(f"no instruction count in callgrind's output: {output[-500:]}")
    return int(match.group(1))


def per_stream(server: str) -> int:
    """Instructions per clean stream: 1001 streams minus 1, over 1000."""
    return (instructions(server, 1001) - instructions(server, 1)) // 1000


async def record() -> None:
    """Run the `always` row's Envoy in front of a servicer that keeps what it receives."""
    received: list[bytes] = []

    async def process(requests: AsyncIterator[bytes], _: Any) -> AsyncIterator[bytes]:
        async for raw in requests:
            received.append(raw)
            kind = pb.ProcessingRequest.FromString(raw).WhichOneof("request")
            yield CONTINUE[kind or "request_headers"].SerializeToString()

    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME, {"Process": grpc.stream_stream_rpc_method_handler(process)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        config = next(c for c in CONFIGS if c.name == "always")
        (refused,) = free_ports(1)
        with EnvoyProcess(
            bootstrap(config, extproc=f"127.0.0.1:{port}", refused_port=refused)
        ) as envoy:
            (listener,) = envoy.listener_ports().values()
            url = f"http://127.0.0.1:{listener}/"
            await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
            version = json.loads(envoy.admin_get("/server_info")[1])["version"]
    finally:
        await server.stop(None)
    DATA.parent.mkdir(exist_ok=True)
    document = {
        "envoy": version,
        "row": "always (bench/configs.py): a direct 200, the rendered always-on filter",
        "messages": [base64.b64encode(raw).decode() for raw in received],
    }
    DATA.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stream_cost", description=__doc__)
    parser.add_argument("--record", action="store_true", help="re-record the messages")
    parser.add_argument("--run", choices=SERVERS, help="run streams only (under callgrind)")
    parser.add_argument("--streams", type=int, default=1)
    args = parser.parse_args(argv)
    structlog.configure(processors=[], logger_factory=structlog.ReturnLoggerFactory())
    if args.record:
        asyncio.run(record())
        return
    if args.run:
        asyncio.run(run(args.run, args.streams))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("bench.stream_cost: valgrind is not installed (apt-get install valgrind)")
    counts = {server: per_stream(server) for server in SERVERS}
    print("| server | instructions per clean stream | vs naive |\n|---|---|---|")
    for server, count in counts.items():
        print(f"| {server} | {count:,} | {count / counts['naive']:.2f}x |")


if __name__ == "__main__":
    main()
