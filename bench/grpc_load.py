"""Direct gRPC load on an ext_proc server, without Envoy.

Opens `--concurrency` bidirectional Process streams at a time for `--duration` seconds.
Each stream sends exactly the messages of `bench/ghz/process.json` (the ghz data file: a
clean request's headers, then a refused-port 503's headers with Envoy's attributes),
waiting for each answer before the next message, as Envoy does. So a run here and
`ghz --config bench/ghz/ghz.json --data-file bench/ghz/process.json` send the same
traffic. The messages are serialized once; the first stream's answers are parsed and
checked, the rest are counted.

    python -m bench.grpc_load --target 127.0.0.1:50051 --concurrency 32 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.json_format import ParseDict

from bench.loadgen import percentiles

DATA_FILE = Path(__file__).resolve().parent / "ghz" / "process.json"
METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


class GrpcLoadError(RuntimeError):
    """The server answered the stream with something other than one response per message."""


@dataclass(frozen=True, slots=True)
class GrpcLoadResult:
    target: str
    concurrency: int
    connections: int
    seconds: float
    streams: int
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def streams_per_second(self) -> float:
        return self.streams / self.seconds if self.seconds > 0 else 0.0


def load_messages(path: Path = DATA_FILE) -> list[pb.ProcessingRequest]:
    """The data file's messages, parsed as ghz parses them (protobuf JSON)."""
    return [ParseDict(item, pb.ProcessingRequest()) for item in json.loads(path.read_text())]


def clean_messages() -> list[pb.ProcessingRequest]:
    """The data file's request headers, then a clean 200 as Envoy 1.40 sends it to an
    always-on filter (its attributes included): the clean path, nothing to diagnose."""
    request = load_messages()[0]
    response = pb.ProcessingRequest()
    for key, value in ((":status", b"200"), ("content-type", b"application/json"),
                       ("content-length", b"120"), ("date", b"Wed, 02 Dec 2026 11:00:00 GMT"),
                       ("x-envoy-upstream-service-time", b"2"), ("server", b"envoy")):  # fmt: skip
        response.response_headers.headers.headers.add(key=key, raw_value=value)
    response.attributes["envoy.filters.http.ext_proc"].update({
        "response.flags": 0, "response.code": 200, "response.code_details": "via_upstream",
        "xds.listener_direction": 2,
    })  # fmt: skip
    return [request, response]


def check_answers(sent: list[pb.ProcessingRequest], answers: list[bytes]) -> None:
    """Each message got one answer for the same phase, or GrpcLoadError says what came back."""
    kinds = [m.WhichOneof("request") for m in sent]
    got = [pb.ProcessingResponse.FromString(a).WhichOneof("response") for a in answers]
    if got != kinds:
        raise GrpcLoadError(f"sent {kinds}, the server answered {got}")


async def run(
    target: str, concurrency: int, duration: float, connections: int = 1, *, clean: bool = False
) -> GrpcLoadResult:
    """Keep `concurrency` streams busy on `connections` channels for `duration` seconds;
    `clean`: a clean 200 instead of the data file's 503."""
    messages = clean_messages() if clean else load_messages()
    payloads = [m.SerializeToString() for m in messages]
    # A local subchannel pool gives each channel its own connection, as ghz's --connections.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(connections)]
    try:
        calls = [channel.stream_stream(METHOD) for channel in channels]
        check_answers(messages, await _stream(calls[0], payloads))
        latencies: list[float] = []
        started = time.perf_counter()
        deadline = started + duration
        errors = await asyncio.gather(
            *(
                _worker(calls[i % connections], payloads, deadline, latencies)
                for i in range(concurrency)
            )
        )
        seconds = time.perf_counter() - started
    finally:
        for channel in channels:
            await channel.close()
    if not latencies:
        raise GrpcLoadError(f"no stream to {target} completed in {duration:g}s")
    p50, p99 = percentiles(latencies)
    return GrpcLoadResult(
        target, concurrency, connections, seconds, len(latencies), sum(errors), p50, p99
    )


async def _worker(
    call: grpc.aio.StreamStreamMultiCallable,
    payloads: list[bytes],
    deadline: float,
    latencies: list[float],
) -> int:
    """Streams one after another until the deadline; returns how many failed."""
    errors = 0
    while (started := time.perf_counter()) < deadline:
        try:
            await _stream(call, payloads)
        except (grpc.RpcError, GrpcLoadError):
            errors += 1
            continue
        latencies.append((time.perf_counter() - started) * 1e3)
    return errors


async def _stream(call: grpc.aio.StreamStreamMultiCallable, payloads: list[bytes]) -> list[bytes]:
    """One Process stream: each message, then its answer; then close and await the status."""
    stream = call()
    answers: list[bytes] = []
    for payload in payloads:
        await stream.write(payload)
        answer = await stream.read()
        if answer is grpc.aio.EOF:
            raise GrpcLoadError(f"the stream ended after {len(answers)} answers")
        answers.append(answer)
    await stream.done_writing()
    if (code := await stream.code()) != grpc.StatusCode.OK:
        raise GrpcLoadError(f"the stream ended with {code}")
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT or unix:PATH")
    parser.add_argument("--concurrency", type=int, default=32, help="streams open at a time")
    parser.add_argument("--connections", type=int, default=1, help="HTTP/2 connections")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--clean", action="store_true",
                        help="answer a clean 200 instead of the data file's refused 503")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        result = asyncio.run(
            run(args.target, args.concurrency, args.duration, args.connections, clean=args.clean)
        )
    except (GrpcLoadError, grpc.RpcError) as exc:
        print(f"grpc_load: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**asdict(result), "streams_per_second": result.streams_per_second}))
    else:
        print(
            f"{result.streams} streams in {result.seconds:.2f}s: "
            f"{result.streams_per_second:.0f} streams/s, p50 {result.p50_ms:.3f} ms, "
            f"p99 {result.p99_ms:.3f} ms, {result.errors} errors "
            f"({args.concurrency} concurrent on {args.connections} connection(s) to {args.target})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
