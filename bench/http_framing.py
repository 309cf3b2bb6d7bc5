"""HTTP/1.1 framing for the HTTP lane: httptools (llhttp, C) against h11, side by side.

Issue 17 asked whether a maintained HTTP/1.1 implementation with its limits built in
(h11's state machine: one request at a time, `max_incomplete_event_size`) should frame
the lane instead of our httptools protocol. This measures what framing costs per
message, in one loop, on the bytes Envoy 1.40 really sends: the head it POSTs (recorded
from a real Envoy, `tests/deploy/test_http_lane_limits_e2e.py` prints it) with a
chunked body holding the ghz data's two messages as proto3 JSON. Each framing reads
the request, collects the body and writes a whole response (the processor's answer is
left out; it is the same for all); "the lane's _Connection" is the lane's own protocol
with all its limits, in front of a processor that only continues. CPU time, best of
several repeats; the processor's own cost is printed beside it, for scale.

    .venv/bin/pip install h11 h11-mypyc   # not project dependencies: only for this comparison
    .venv/bin/python -m bench.http_framing
"""

from __future__ import annotations

import functools
import importlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httptools
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import json_format

from extproc import http_lane
from extproc.config import Policy
from extproc.http_lane import CONTINUE, HttpProcessor

DATA = Path(__file__).resolve().parent / "ghz" / "process.json"
MESSAGES = 20_000
REPEATS = 5
# What Envoy 1.40 POSTs before the body (rendered `--transport http` filter).
ENVOY_HEAD = (
    b"POST /process HTTP/1.1\r\nhost: extproc-doctor\r\ncontent-type: application/json\r\n"
    b"x-request-id: 1910028687804764375\r\nx-extproc-direction: edge\r\n"
    b"x-envoy-expected-rq-timeout-ms: 500\r\ntransfer-encoding: chunked\r\n\r\n"
)
RESPONSE = CONTINUE["request_headers"]


def envoy_posts() -> list[bytes]:
    """The ghz data's request and failing response as Envoy POSTs them: chunked JSON."""
    posts = []
    for message in json.loads(DATA.read_text()):
        request = json_format.ParseDict(message, pb.ProcessingRequest())
        body = json_format.MessageToJson(
            request, preserving_proto_field_name=True, indent=None
        ).encode()
        posts.append(ENVOY_HEAD + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    return posts


class _HttptoolsFraming:
    """The lane's framing, reduced to what every message pays: feed, collect, answer."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.out = b""

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        b"".join(self.body)
        self.body.clear()
        self.out = RESPONSE

    def frame(self, data: bytes) -> bytes:
        self.parser.feed_data(data)
        return self.out


class _H11Framing:
    """The same with an h11 `Connection` (server role), as uvicorn's h11 protocol drives it."""

    def __init__(self, h11: Any) -> None:
        self.h11 = h11
        self.conn = h11.Connection(h11.SERVER)
        self.head, _, self.json = RESPONSE.partition(b"\r\n\r\n")

    def frame(self, data: bytes) -> bytes:
        h11, conn = self.h11, self.conn
        conn.receive_data(data)
        body = []
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Data):
                body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
        b"".join(body)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(self.json)),
        ]
        out = conn.send(h11.Response(status_code=200, headers=headers))
        out += conn.send(h11.Data(data=self.json)) + conn.send(h11.EndOfMessage())
        conn.start_next_cycle()
        return bytes(out)


class _NullTransport:
    """Takes the lane's answers and drops them: the peer reads at once."""

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> object:
        return None


class _LaneFraming:
    """The lane's own `_Connection`, limits and all, in front of a processor that only continues."""

    def __init__(self) -> None:
        processor = HttpProcessor(Policy())
        processor.answer = lambda body, declared=None: RESPONSE  # type: ignore[method-assign]
        self.connection = http_lane._Connection(http_lane.HttpLane(processor))
        self.connection.connection_made(_NullTransport())  # type: ignore[arg-type]

    def frame(self, data: bytes) -> bytes:
        self.connection.data_received(data)
        return RESPONSE


def _best_us(step: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        start = time.process_time()
        for _ in range(MESSAGES):
            step()
        best = min(best, time.process_time() - start)
    return best / MESSAGES * 1e6


def _framings() -> dict[str, Callable[[], Any]]:
    framings: dict[str, Callable[[], Any]] = {
        "httptools": _HttptoolsFraming,
        "the lane's _Connection": _LaneFraming,
    }
    for name in ("h11", "h11_mypyc"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            print(f"({name} is not installed: pip install {name.replace('_', '-')})")
            continue
        framings[f"{name} {module.__version__}"] = functools.partial(_H11Framing, module)
    return framings


def measure() -> dict[str, dict[str, float]]:
    """µs of CPU per message for each framing, and the processor's own, per message kind."""
    structlog.configure(processors=[], logger_factory=structlog.ReturnLoggerFactory())
    processor = HttpProcessor(Policy())
    rows: dict[str, dict[str, float]] = {}
    for kind, post in zip(
        ("request_headers", "response_headers (503)"), envoy_posts(), strict=True
    ):
        body = post.split(b"\r\n\r\n", 1)[1].split(b"\r\n")[1]
        row = {"processor.answer": _best_us(functools.partial(processor.answer, body))}
        for name, make in _framings().items():
            framing = make()
            assert framing.frame(post).endswith(RESPONSE.rpartition(b"\r\n\r\n")[2])
            row[name] = _best_us(functools.partial(framing.frame, post))
        rows[f"{kind}, {len(post)} bytes"] = row
    return rows


def main() -> None:
    rows = measure()
    names = list(next(iter(rows.values())))
    print("| message | " + " | ".join(f"{n} µs" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for message, row in rows.items():
        print(f"| {message} | " + " | ".join(f"{row[n]:.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
