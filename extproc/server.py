"""The gRPC adapter: ProcessingRequest in, ProcessingResponse out, and nothing else.

This is the only module that touches the ext_proc protobufs. It turns each message into
plain data for `headers.decide` and `diagnosis.classify`, and their answers back into a
response. Messages it does not process (bodies, trailers) are continued unchanged.
The common case, nothing to change, answers with a response built once at import.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from extproc.annotate import (
    ACTIONS_HEADER,
    MAX_VALUE,
    actions_header,
    diagnosis_headers,
    printable,
)
from extproc.config import Policy
from extproc.diagnosis import Diagnosis, Evidence, classify
from extproc.filter_config import METADATA_NAMESPACE
from extproc.headers import NO_CHANGE, Header, RequestDecision, decide

log = structlog.get_logger("extproc")

ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD

# Answers that change nothing, one per message kind, built once.
CONTINUE = {
    "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}


@dataclass(slots=True)
class StreamState:
    """What one HTTP request's stream remembers between its messages."""

    decision: RequestDecision = NO_CHANGE


def header_pairs(headers: pb.HttpHeaders) -> list[Header]:
    """(name, value) pairs; values from raw_value (what Envoy sends) or value.

    Bytes that are not UTF-8 survive the round trip as surrogate escapes.
    """
    return [
        (h.key, h.raw_value.decode("utf-8", "surrogateescape") if h.raw_value else h.value)
        for h in headers.headers.headers
    ]


def _header_option(name: str, value: str, action: int) -> base_pb2.HeaderValueOption:
    raw = value.encode("utf-8", "surrogateescape")
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, raw_value=raw), append_action=action
    )


def _mutation(
    overwrite: Sequence[Header], append: Sequence[Header] = (), remove: Sequence[str] = ()
) -> pb.HeaderMutation:
    options = [_header_option(n, v, _OVERWRITE) for n, v in overwrite]
    options += [_header_option(n, v, _APPEND) for n, v in append]
    return pb.HeaderMutation(set_headers=options, remove_headers=list(remove))


def _metadata(fields: dict[str, Any]) -> struct_pb2.Struct:
    meta = struct_pb2.Struct()
    meta.update({METADATA_NAMESPACE: fields})
    return meta


def _attributes(request: pb.ProcessingRequest) -> Any:
    """The Struct fields Envoy attached, or None."""
    if ATTRIBUTES_KEY in request.attributes:
        return request.attributes[ATTRIBUTES_KEY].fields
    return None


def _text(fields: Any, key: str) -> str:
    value = fields.get(key)
    if value is None:
        return ""
    if value.WhichOneof("kind") == "number_value":
        return str(int(value.number_value))
    return str(value.string_value)


def _number(fields: Any, key: str) -> int | None:
    value = fields.get(key) if fields is not None else None
    if value is None or value.WhichOneof("kind") != "number_value":
        return None
    return int(value.number_value)


def on_request_headers(
    policy: Policy, request: pb.ProcessingRequest, state: StreamState
) -> pb.ProcessingResponse:
    direction = _number(_attributes(request), "xds.listener_direction")
    decision = decide(policy, header_pairs(request.request_headers), direction)
    state.decision = decision
    if not decision.applied:
        return CONTINUE["request_headers"]
    common = pb.CommonResponse(clear_route_cache=decision.clear_route_cache)
    if decision.changes:
        common.header_mutation.CopyFrom(
            _mutation(decision.overwrite, decision.append, decision.remove)
        )
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(response=common),
        dynamic_metadata=_metadata({"actions": actions_header(decision.applied)}),
    )


def evidence_of(request: pb.ProcessingRequest, host: str) -> Evidence:
    """The failure evidence of a response_headers message: attributes first, headers second."""
    status = grpc_status = None
    answered = overloaded = False
    for name, value in header_pairs(request.response_headers):
        if name == ":status":
            status = int(value) if value.isdigit() else None
        elif name == "grpc-status":
            grpc_status = int(value) if value.isdigit() else None
        elif name == "x-envoy-upstream-service-time":
            answered = True
        elif name == "x-envoy-overloaded":
            overloaded = True
    fields = _attributes(request)
    if fields is None:
        return Evidence(
            status=status,
            grpc_status=grpc_status,
            upstream_answered=answered,
            overloaded=overloaded,
            host=host,
        )
    return Evidence(
        status=status if status is not None else _number(fields, "response.code"),
        flags=_number(fields, "response.flags") or 0,
        code_details=_text(fields, "response.code_details"),
        transport_failure_reason=_text(fields, "upstream.transport_failure_reason"),
        cluster=_text(fields, "xds.cluster_name"),
        upstream_address=_text(fields, "upstream.address"),
        route=_text(fields, "xds.route_name"),
        cluster_metadata=_text(fields, "xds.cluster_metadata"),
        host=host,
        grpc_status=grpc_status,
        upstream_answered=answered,
        overloaded=overloaded,
        has_attributes=True,
    )


def on_response_headers(request: pb.ProcessingRequest, state: StreamState) -> pb.ProcessingResponse:
    diagnosis = classify(evidence_of(request, state.decision.host))
    applied = state.decision.applied
    if diagnosis is None and not applied:
        return CONTINUE["response_headers"]
    headers: list[Header] = []
    if applied:
        headers.append((ACTIONS_HEADER, actions_header(applied)))
    response = pb.ProcessingResponse()
    if diagnosis is not None:
        headers.extend(diagnosis_headers(diagnosis))
        fields = _diagnosis_fields(diagnosis)
        response.dynamic_metadata.CopyFrom(_metadata(fields))
        log.warning("upstream_failure", **fields)
    response.response_headers.response.header_mutation.CopyFrom(_mutation(headers))
    return response


def _diagnosis_fields(diagnosis: Diagnosis) -> dict[str, Any]:
    """The diagnosis for access logs and our own log: every string escaped as in the header."""
    fields: dict[str, Any] = {"reason": diagnosis.reason, "hint": diagnosis.hint}
    for key, value in diagnosis.evidence:
        fields[key] = printable(value, MAX_VALUE) if isinstance(value, str) else value
    return fields


def handle(
    policy: Policy, request: pb.ProcessingRequest, state: StreamState
) -> pb.ProcessingResponse | None:
    """The answer to one message, or None when there is nothing to answer."""
    kind = request.WhichOneof("request")
    match kind:
        case "request_headers":
            return on_request_headers(policy, request, state)
        case "response_headers":
            return on_response_headers(request, state)
        case None:
            log.error(
                "bad_processing_request", problem="the message sets none of the request kinds"
            )
            return None
        case _:
            return CONTINUE[kind]


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """The Process stream: one per HTTP request, answered message by message."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    async def Process(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        state = StreamState()
        while (request := await context.read()) is not grpc.aio.EOF:
            try:
                response = handle(self.policy, request, state)
            except Exception as exc:  # one bad message must not end the server
                kind = request.WhichOneof("request")
                log.error("processing_failed", kind=kind, error=type(exc).__name__)
                response = CONTINUE.get(kind or "")
            if response is not None and not request.observability_mode:
                await context.write(response)


class ExtProcServer:
    """The gRPC server: ext_proc, health and reflection. An async context manager."""

    def __init__(
        self,
        policy: Policy,
        listen: str = "127.0.0.1:0",
        grace: float = 10.0,
        *,
        servicer: pb_grpc.ExternalProcessorServicer | None = None,
    ) -> None:
        self.policy = policy
        self.listen = listen
        self.grace = grace
        self.port = 0
        # Tests may put a recording servicer behind the same server and health service.
        self.servicer = servicer or ExternalProcessor(policy)
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()

    async def start(self) -> None:
        server = grpc.aio.server()
        pb_grpc.add_ExternalProcessorServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        try:
            self.port = server.add_insecure_port(self.listen)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self.listen}: {exc}") from None
        await server.start()
        self._server = server
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        """Report NOT_SERVING, refuse new streams, let in-flight ones finish within the grace."""
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self.grace)
        self._server = None

    async def __aenter__(self) -> ExtProcServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve(policy: Policy, listen: str, grace: float = 10.0) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    async with ExtProcServer(policy, listen, grace) as server:
        log.info(
            "serving", listen=listen, port=server.port, policy=policy.source, mode=str(policy.mode)
        )
        await stopping.wait()
        log.info("draining", grace_seconds=grace)
    log.info("stopped")
