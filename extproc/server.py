"""The gRPC door: ProcessingRequest in, ProcessingResponse out, and nothing else.

One of the process's three doors (`extproc.process` starts them; the HTTP lane is
`extproc.http_lane`, the live page `extproc.page`); it knows gRPC and the core only.

This is the only module that touches the ext_proc protobufs. It turns each message into
plain data for `headers.decide` and `diagnosis.classify`, and their answers back into a
response. Messages it does not process (bodies, trailers) are continued unchanged.
The common case, nothing to change, answers with a response built once at import.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from time import perf_counter
from typing import Any

import grpc
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from extproc import core
from extproc.admission import (
    CONNECTION_IDLE_SECONDS,
    MAX_SIDE_STREAMS,
    REFUSED_MAX_STREAMS,
    SWEEP_SECONDS,
    WARN_INTERVAL_SECONDS,
    Door,
    Stream,
    StreamLimits,
    peer_address,
)
from extproc.config import Direction, Policy, TlsFiles
from extproc.core import Answer, Carried
from extproc.diagnosis import Diagnosis
from extproc.envoy_admin import ClusterTlsCache
from extproc.failures import (
    NO_REQUEST,
    Failures,
    RequestFields,
    attribute_fields,
    request_fields,
)
from extproc.filter_config import DIRECTION_METADATA, METADATA_NAMESPACE
from extproc.headers import (
    NO_CHANGE,
    Header,
    NamesFirst,
    RequestDecision,
    names_first,
)
from extproc.metrics import Metrics
from extproc.tls import ReloadingCredentials
from extproc.wire import parse as parse_request

log = structlog.get_logger("extproc")

ATTRIBUTES_KEY = core.ATTRIBUTES_KEY
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
TRANSPORT = "grpc"

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
    diagnosis: Diagnosis | None = None
    direction: Direction | None = None  # where the filter sits, once a response phase resolved it
    # The clusters' TLS settings from Envoy's admin endpoint (`--envoy-admin`), if known.
    cluster_tls: ClusterTlsCache | None = None
    # Where the rendered filter says it sits (x-extproc-direction), if it says.
    declared: Direction | None = None
    # What the response phase needs from the request phase.
    carried: Carried = core.NOTHING_CARRIED
    # The request's headers for the live page, kept only while it is on and read only when
    # the response fails: a clean request pays one reference, no decoding.
    request_headers: pb.HttpHeaders | None = None


def declared_direction(metadata: Sequence[tuple[str, str | bytes]] | None) -> Direction | None:
    """The direction the rendered filter declared in the stream's gRPC metadata, if any.

    An unknown value counts as not declared: the listener direction decides then.
    """
    for key, value in metadata or ():
        if key == DIRECTION_METADATA:
            return core.declared_direction(value)
    return None


def header_pairs(headers: pb.HttpHeaders) -> list[Header]:
    """(name, value) pairs; values from raw_value (what Envoy sends) or value.

    Bytes that are not UTF-8 survive the round trip as surrogate escapes.
    """
    return [(h.key, _value(h)) for h in headers.headers.headers]


def _value(header: base_pb2.HeaderValue) -> str:
    raw = header.raw_value
    return raw.decode("utf-8", "surrogateescape") if raw else str(header.value)


def _header_option(name: str, value: str, action: int) -> base_pb2.HeaderValueOption:
    raw = value.encode("utf-8", "surrogateescape")
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, raw_value=raw), append_action=action
    )


def _metadata(fields: Mapping[str, str | int]) -> struct_pb2.Struct:
    """Our dynamic metadata namespace holding flat string and number fields."""
    meta = struct_pb2.Struct()
    namespace = meta.fields[METADATA_NAMESPACE].struct_value.fields
    for key, value in fields.items():
        if isinstance(value, str):
            namespace[key].string_value = value
        else:
            namespace[key].number_value = value
    return meta


def encode(kind: str, answer: Answer) -> pb.ProcessingResponse:
    """The core's answer to a headers message as a ProcessingResponse."""
    response = pb.ProcessingResponse()
    common = getattr(response, kind).response
    common.SetInParent()
    if answer.clear_route_cache:
        common.clear_route_cache = True
    if answer.mutates or kind == "response_headers":
        mutation = common.header_mutation
        mutation.SetInParent()
        options = [_header_option(n, v, _OVERWRITE) for n, v in answer.overwrite]
        options += [_header_option(n, v, _APPEND) for n, v in answer.append]
        mutation.set_headers.extend(options)
        mutation.remove_headers.extend(answer.remove)
    if answer.metadata is not None:
        response.dynamic_metadata.CopyFrom(_metadata(answer.metadata))
    return response


def _attributes(request: pb.ProcessingRequest) -> Any:
    """The Struct fields Envoy attached, or None."""
    attributes = request.attributes.get(ATTRIBUTES_KEY)
    return None if attributes is None else attributes.fields


def _number(fields: Any, key: str, limit: int) -> int | None:
    """A whole number attribute in [0, limit], or None: Envoy sends doubles, a peer could send anything."""
    value = fields.get(key) if fields is not None else None
    if value is None or value.WhichOneof("kind") != "number_value":
        return None
    number = value.number_value
    return int(number) if 0 <= number <= limit else None


class _StructAttributes:
    """`core.Attributes` over the Struct fields of a ProcessingRequest."""

    __slots__ = ("fields",)

    def __init__(self, fields: Any) -> None:
        self.fields = fields

    def number(self, key: str, limit: int) -> int | None:
        return _number(self.fields, key, limit)

    def text(self, key: str) -> str:
        value = self.fields.get(key)
        if value is None:
            return ""
        if value.WhichOneof("kind") == "number_value":
            number = value.number_value
            return str(int(number)) if math.isfinite(number) else ""
        return str(value.string_value)


def on_request_headers(
    policy: Policy, first: NamesFirst, request: pb.ProcessingRequest, state: StreamState
) -> pb.ProcessingResponse:
    # Names first: a clean request's values are never decoded.
    outcome = core.request_phase(
        policy, first, [h.key for h in request.request_headers.headers.headers],
        lambda: (header_pairs(request.request_headers),
                 _number(_attributes(request), core.LISTENER_ATTRIBUTE, 2)),
        state.declared,
    )  # fmt: skip
    state.decision, state.carried = outcome.decision, outcome.carried
    if outcome.answer is None:
        return CONTINUE["request_headers"]
    return encode("request_headers", outcome.answer)


def on_response_headers(
    policy: Policy, request: pb.ProcessingRequest, state: StreamState
) -> pb.ProcessingResponse:
    # Only the few response headers that decide triage are read.
    signs = {h.key: h.raw_value or h.value.encode() for h in request.response_headers.headers.headers
             if h.key in core.RESPONSE_SIGNS}  # fmt: skip
    fields = _attributes(request)
    carried = state.carried
    if _diagnosed_before(request):
        carried = replace(carried, diagnosed=True)
    outcome = core.response_phase(
        policy, signs, None if fields is None else _StructAttributes(fields), carried,
        declared=state.declared, cluster_tls=state.cluster_tls,
    )  # fmt: skip
    if outcome is None:
        return CONTINUE["response_headers"]
    state.diagnosis, state.direction = outcome.diagnosis, outcome.direction
    if outcome.answer is None:
        return CONTINUE["response_headers"]
    return encode("response_headers", outcome.answer)


def _diagnosed_before(request: pb.ProcessingRequest) -> bool:
    """Whether Envoy forwarded our namespace with a diagnosis in it (gated mode's hygiene
    filter, after the response filter diagnosed; `filter_config.ext_proc_filter`)."""
    if not request.HasField("metadata_context"):
        return False
    ours = request.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
    return ours is not None and core.DIAGNOSED_KEY in ours.fields


def handle(
    policy: Policy,
    request: pb.ProcessingRequest,
    state: StreamState,
    first: NamesFirst | None = None,
) -> pb.ProcessingResponse | None:
    """The answer to one message, or None when there is nothing to answer. `first`: the
    policy's `names_first`, built here when not given (the servicer builds it once)."""
    first = names_first(policy) if first is None else first
    return _dispatch(request.WhichOneof("request"), policy, first, request, state)


def _dispatch(
    kind: str | None,
    policy: Policy,
    first: NamesFirst,
    request: pb.ProcessingRequest,
    state: StreamState,
) -> pb.ProcessingResponse | None:
    match kind:
        case "request_headers":
            return on_request_headers(policy, first, request, state)
        case "response_headers":
            return on_response_headers(policy, request, state)
        case None:
            log.error(
                "bad_processing_request", problem="the message sets none of the request kinds"
            )
            return None
        case _:
            return CONTINUE[kind]


def _sample_fields(state: StreamState, request: pb.ProcessingRequest) -> RequestFields:
    """The failing request's method, path, id and trace id for the live page: from its
    headers when this stream saw them, else from the attributes a response-only filter
    asks for (gated mode, `filter_config.SAMPLE_ATTRIBUTES`); none when neither."""
    if state.request_headers is not None:
        return request_fields(header_pairs(state.request_headers))
    fields = _attributes(request)
    return NO_REQUEST if fields is None else attribute_fields(_StructAttributes(fields).text)


def error_fields(exc: BaseException, request: pb.ProcessingRequest) -> dict[str, str]:
    """`core.error_fields` with every header value of `request` as the values to cut out."""
    values = [v for part in ("request_headers", "response_headers") if request.HasField(part)
              for _, v in header_pairs(getattr(request, part))]  # fmt: skip
    return core.error_fields(exc, values)


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """The Process stream: one per HTTP request, answered message by message.

    `policy` may be replaced at any time (a reload); each stream keeps the policy it
    started with, so a request and its response are judged by the same rules.
    """

    def __init__(
        self, policy: Policy, metrics: Metrics | None = None, limits: StreamLimits | None = None
    ) -> None:
        self.policy = policy
        self.metrics = metrics or Metrics()
        self.tallies = self.metrics.tallies[TRANSPORT]
        self.cluster_tls: ClusterTlsCache | None = None
        self.door = Door(limits or StreamLimits())
        self._warned: dict[str, tuple[float, int]] = {}
        # The live page's table (`serve --ui-listen`); None: off, and nothing is read for it.
        self.failures: Failures | None = None

    @property
    def policy(self) -> Policy:
        return self._rules[0]

    @policy.setter
    def policy(self, policy: Policy) -> None:
        """A policy and its names-first test, built once here, not per stream."""
        self._rules = (policy, names_first(policy))

    async def Process(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        (policy, first), metrics, door = self._rules, self.metrics, self.door
        clock = asyncio.get_running_loop().time
        stream = self._admit(context, clock())
        if stream is None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many streams open")
            return
        state = StreamState(
            cluster_tls=self.cluster_tls, declared=declared_direction(context.invocation_metadata())
        )
        counts = metrics.stream_count
        counts.opened += 1
        counts.active += 1
        try:
            while (request := await context.read()) is not grpc.aio.EOF:
                door.heard(stream, clock())
                kind = request.WhichOneof("request")
                response = self._answer(kind, policy, first, request, state)
                if response is not None and not request.observability_mode:
                    await context.write(response)
                if kind == "response_headers":
                    # Nothing later in the exchange needs us (bodies and trailers would be
                    # continued unchanged), so end the stream here with OK: Envoy then
                    # stops sending instead of resetting the stream, and a reset stream
                    # costs grpc.aio ~100 bytes that are never freed (tests/reliability).
                    return
        except asyncio.CancelledError:
            if stream.closed_by is None:
                raise
            # A limit closed it. One that has spoken ends with OK, as after the response
            # headers (Envoy skips the rest); a silent one was never Envoy's.
            if not stream.heard:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, stream.closed_by)
        finally:
            door.done(stream)
            counts.active -= 1

    def _admit(self, context: grpc.aio.ServicerContext, now: float) -> Stream | None:
        task = asyncio.current_task()
        assert task is not None  # grpc.aio runs each call in a task
        stream, evicted = self.door.admit(peer_address(context.peer()), task.cancel, now)
        if evicted is not None:
            self._limited(self.metrics.streams_closed, evicted.closed_by or "", now)
        if stream is None:
            self._limited(self.metrics.streams_refused, REFUSED_MAX_STREAMS, now)
        return stream

    def sweep(self, now: float) -> None:
        """Close the streams past their deadlines (the server calls it every SWEEP_SECONDS)."""
        for stream in self.door.expired(now):
            self._limited(self.metrics.streams_closed, stream.closed_by or "", now)

    def _limited(self, counters: Mapping[str, Any], limit: str, now: float) -> None:
        """Count a stream a limit refused or closed; warn at most once per interval."""
        counters[limit].inc()
        last, since = self._warned.get(limit, (-math.inf, 0))
        if now - last < WARN_INTERVAL_SECONDS:
            self._warned[limit] = (last, since + 1)
            return
        self._warned[limit] = (now, 0)
        log.warning(
            "stream_limit", limit=limit, open_streams=self.door.open_streams,
            max_streams=self.door.limits.max_streams, also_since_last_warning=since,
        )  # fmt: skip

    def _answer(
        self,
        kind: str | None,
        policy: Policy,
        first: NamesFirst,
        request: pb.ProcessingRequest,
        state: StreamState,
    ) -> pb.ProcessingResponse | None:
        started = perf_counter()
        metrics = self.metrics
        try:
            response = _dispatch(kind, policy, first, request, state)
        except Exception as exc:  # one bad message must not end the stream or the server
            metrics.errors["processing_failed"].inc()
            log.error("processing_failed", kind=kind, **error_fields(exc, request))
            response = CONTINUE.get(kind or "")
        if kind is None:
            metrics.errors["bad_message"].inc()
            return response
        if kind == "request_headers":
            if state.decision.applied:
                metrics.count_request(state.decision.applied)
            if self.failures is not None:
                state.request_headers = request.request_headers
        elif kind == "response_headers" and state.diagnosis is not None:
            metrics.count_response(state.diagnosis)
            if self.failures is not None:
                self.failures.record(state.diagnosis, time.time(), _sample_fields(state, request),
                                     str(state.direction or ""))  # fmt: skip
        self.tallies[kind].observe(perf_counter() - started)
        return response


def add_processor(servicer: pb_grpc.ExternalProcessorServicer, server: grpc.aio.Server) -> None:
    """The ext_proc service as grpc's generated code adds it, its messages read by
    `extproc.wire.parse`: a header or attribute string that is not UTF-8 does not fail the stream."""
    handlers = {
        "Process": grpc.stream_stream_rpc_method_handler(
            servicer.Process,
            request_deserializer=parse_request,
            response_serializer=pb.ProcessingResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class _SideStreams:
    """At most MAX_SIDE_STREAMS open at once of one streaming RPC outside the door."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.open = 0

    @contextlib.asynccontextmanager
    async def slot(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        if self.open >= MAX_SIDE_STREAMS:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"at most {MAX_SIDE_STREAMS} {self.name}"
            )
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1


class _Health(HealthServicer):  # type: ignore[misc]
    """grpc's health service with its Watch streams capped; Check (what probes use) is not."""

    def __init__(self) -> None:
        super().__init__()
        self.watches = _SideStreams("health watches")

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        async with self.watches.slot(context):
            await super().Watch(request, context)


class _Reflection(reflection.aio.ReflectionServicer):  # type: ignore[misc]
    """Server reflection (grpcurl, ghz) with its streams capped."""

    def __init__(self, service_names: Sequence[str]) -> None:
        super().__init__(service_names)
        self.streams = _SideStreams("reflection streams")

    async def ServerReflectionInfo(
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async with self.streams.slot(context):
            async for response in super().ServerReflectionInfo(request_iterator, context):
                yield response


class ExtProcServer:
    """The gRPC server: ext_proc, health and reflection. An async context manager."""

    def __init__(
        self,
        policy: Policy,
        listen: str = "127.0.0.1:0",
        grace: float = 10.0,
        *,
        servicer: pb_grpc.ExternalProcessorServicer | None = None,
        tls: TlsFiles | None = None,
        limits: StreamLimits | None = None,
        metrics: Metrics | None = None,
        health_listen: str | None = None,
    ) -> None:
        self.listen = listen
        self.health_listen = health_listen
        self.grace = grace
        self.metrics = metrics or Metrics()
        self.limits = limits or StreamLimits()
        # Tests may put a recording servicer behind the same server and health service.
        self.servicer = servicer or ExternalProcessor(policy, self.metrics, self.limits)
        # Built now, so unusable certificate files fail start-up with their names.
        self.credentials = ReloadingCredentials(tls) if tls else None
        self.port = 0
        self.health_port = 0
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._health = _Health()
        self._sweeper: asyncio.Task[None] | None = None

    def options(self) -> list[tuple[str, int]]:
        """The HTTP/2 and message limits grpc enforces for us (admission.py says why)."""
        return [
            ("grpc.max_receive_message_length", self.limits.max_message_bytes),
            ("grpc.max_connection_idle_ms", int(CONNECTION_IDLE_SECONDS * 1000)),
        ]

    async def start(self) -> None:
        # No maximum_concurrent_rpcs: the servicer's door admits streams, so that at
        # capacity a new stream can take a silent or an over-share stream's place.
        server = grpc.aio.server(options=self.options())
        add_processor(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        self._reflection = _Reflection((SERVICE_NAME, health_name, reflection.SERVICE_NAME))
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(self._reflection, server)
        try:
            if self.credentials is None:
                self.port = server.add_insecure_port(self.listen)
            else:
                self.port = server.add_secure_port(self.listen, self.credentials.credentials())
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self.listen}: {exc}") from None
        await server.start()
        self._server = server
        if isinstance(self.servicer, ExternalProcessor):
            self._sweeper = asyncio.create_task(self._sweep(self.servicer))
        if self.health_listen:
            await self._start_health_server(self.health_listen)
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def _start_health_server(self, listen: str) -> None:
        """Plaintext health only, beside a TLS listener: kubelet gRPC probes cannot speak TLS."""
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        try:
            self.health_port = server.add_insecure_port(listen)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {listen}: {exc}") from None
        await server.start()
        self._health_server = server

    @staticmethod
    async def _sweep(servicer: ExternalProcessor) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            servicer.sweep(loop.time())

    async def stop(self) -> None:
        """Report NOT_SERVING, refuse new streams, let in-flight ones finish within the grace."""
        if self._server is None:
            return
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self.grace)
        self._server = None
        if self._health_server is not None:
            await self._health_server.stop(None)
            self._health_server = None

    async def __aenter__(self) -> ExtProcServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
