"""The adapter's own CPU per stream, without gRPC: what the rules, the diagnosis and the metrics cost.

The Envoy rows measure whole streams, where grpc.aio's machinery dominates. This
measures only what runs between a parsed message and the response built from it, with
and without the metrics, on the ghz data's two streams: the clean request with a 200,
and the same request with Envoy 1.40's refused-port 503. CPU time, best of several
repeats (the machine is shared), so it shows the cost, not the noise.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import json_format

from extproc.config import Policy
from extproc.headers import names_first
from extproc.server import ExternalProcessor, StreamState, handle

DATA = Path(__file__).resolve().parent / "ghz" / "process.json"
STREAMS = 2000
REPEATS = 5


def _messages() -> tuple[pb.ProcessingRequest, pb.ProcessingRequest, pb.ProcessingRequest]:
    request, failing = (
        json_format.ParseDict(m, pb.ProcessingRequest()) for m in json.loads(DATA.read_text())
    )
    clean = pb.ProcessingRequest()
    clean.response_headers.headers.headers.add(key=":status", raw_value=b"200")
    clean.response_headers.headers.headers.add(key="x-envoy-upstream-service-time", raw_value=b"2")
    attributes = clean.attributes["envoy.filters.http.ext_proc"]
    attributes.update({"response.flags": 0, "response.code_details": "via_upstream"})
    return request, clean, failing


def _best_us_per_stream(stream: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        start = time.process_time()
        for _ in range(STREAMS):
            stream()
        best = min(best, time.process_time() - start)
    return best / STREAMS * 1e6


def measure() -> dict[str, float]:
    """µs of CPU per stream: clean and failing, the bare adapter and with metrics."""
    structlog.configure(processors=[], logger_factory=structlog.ReturnLoggerFactory())
    policy = Policy()
    servicer = ExternalProcessor(policy)
    first = names_first(policy)
    request, clean, failing = _messages()

    def bare(response: pb.ProcessingRequest) -> Callable[[], None]:
        def stream() -> None:
            state = StreamState()
            handle(policy, request, state, first)
            handle(policy, response, state, first)

        return stream

    def metered(response: pb.ProcessingRequest) -> Callable[[], None]:
        def stream() -> None:
            state = StreamState()
            servicer._answer("request_headers", policy, first, request, state)
            servicer._answer("response_headers", policy, first, response, state)

        return stream

    return {
        "clean": _best_us_per_stream(bare(clean)),
        "clean_with_metrics": _best_us_per_stream(metered(clean)),
        "failing": _best_us_per_stream(bare(failing)),
        "failing_with_metrics": _best_us_per_stream(metered(failing)),
    }


def markdown(result: dict[str, float]) -> str:
    return "\n".join([
        "The adapter alone, no gRPC (`bench/adapter.py`): CPU µs per stream, best of "
        f"{REPEATS} runs of {STREAMS} streams; the log call is made, nothing is written.",
        "",
        "| stream | rules + diagnosis | with metrics | metrics' share |",
        "|---|---|---|---|",
        *(
            f"| {name} | {result[name]:.0f} | {result[name + '_with_metrics']:.0f} | "
            f"{result[name + '_with_metrics'] - result[name]:.0f} |"
            for name in ("clean", "failing")
        ),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.adapter", description=__doc__)
    parser.parse_args(argv)
    print(markdown(measure()))


if __name__ == "__main__":
    main()
