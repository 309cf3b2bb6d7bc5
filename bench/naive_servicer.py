"""The yardstick: the ext_proc servicer most people would write first.

A plain `grpc.aio` servicer, an async generator over the request iterator, one protobuf
response built per message, and every message continued unchanged. No rules, no
diagnosis, no metrics. The benchmark runs it as its own process, the same way as
`extproc serve`, so "our server vs the naive one" compares real work against none.

    python -m bench.naive_servicer --listen 127.0.0.1:50052
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def continue_unchanged(request: pb.ProcessingRequest) -> pb.ProcessingResponse:
    """The response that lets the message's phase continue as it is."""
    match request.WhichOneof("request"):
        case "request_headers":
            return pb.ProcessingResponse(request_headers=pb.HeadersResponse())
        case "response_headers":
            return pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        case "request_body":
            return pb.ProcessingResponse(request_body=pb.BodyResponse())
        case "response_body":
            return pb.ProcessingResponse(response_body=pb.BodyResponse())
        case "request_trailers":
            return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
        case _:
            return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


class NaiveProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Continues everything, one generated response per message."""

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[pb.ProcessingResponse]:
        async for request in request_iterator:
            yield continue_unchanged(request)


async def serve(listen: str) -> None:
    """Serve until SIGTERM or SIGINT; health answers SERVING once the port is bound."""
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(NaiveProcessor(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(listen)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_servicer", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:50052", help="HOST:PORT or unix:PATH")
    asyncio.run(serve(parser.parse_args().listen))


if __name__ == "__main__":
    main()
