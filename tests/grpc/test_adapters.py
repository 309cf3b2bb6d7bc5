"""One table of cases through both adapters: gRPC (protobuf) and HTTP (JSON).

Each row is one HTTP request's two phases. The gRPC adapter gets the messages as
protobuf, with the phase state kept by the stream; the HTTP adapter gets the same
messages as proto3 JSON, written by protobuf's own `json_format` (snake_case names,
base64 `raw_value`: what Envoy 1.40 sends, recorded in tests/envoy/test_http_lane_e2e.py),
with the request phase's dynamic metadata handed back in `metadata_context` as the
response-phase filter's `forwarding_namespaces` does. The HTTP answers are read back
with `json_format.Parse`, so every answer must also be a valid ProcessingResponse.
Both must give the same mutations, and those the row expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import json_format

from extproc.config import Direction, Policy, policy_from_mapping
from extproc.http_lane import HttpProcessor
from extproc.server import StreamState, handle
from tests.conftest import CLEAN, REFUSED_MESH, request_headers, response_headers

NS = "extproc_doctor"
REFUSED = {**REFUSED_MESH, "request.host": "reviews:9080"}


@dataclass(frozen=True)
class Seen:
    """What one answer does, in plain terms: set (name, value), appended, removed, metadata."""

    overwrite: frozenset[tuple[str, str]] = frozenset()
    append: frozenset[tuple[str, str]] = frozenset()
    remove: frozenset[str] = frozenset()
    clear_route_cache: bool = False
    metadata: dict[str, object] = field(default_factory=dict)


CONTINUED = Seen()


@dataclass(frozen=True)
class Case:
    name: str
    policy: Policy
    request: list[tuple[str, str]]
    response: list[tuple[str, str]]
    attributes: dict[str, object]
    request_seen: Seen
    # Response headers set, by name, and the diagnosis reason (None: none).
    response_names: frozenset[str]
    reason: str | None = None
    removed: frozenset[str] = frozenset()
    declared: Direction | None = None


ANNOTATE = policy_from_mapping({"response_annotations": "on"})
REWRITE = policy_from_mapping(
    {"host_rewrites": {"old.example": "new.example"}, "response_annotations": "on"}
)
ACTIONS = "x-extproc-actions"
DIAGNOSIS = {"x-extproc-diagnosis", "x-extproc-hint"}
REVEAL_TOKEN = "op3rator-reveal-token-2026"
REVEAL = Policy(reveal_token=REVEAL_TOKEN.encode(), reveal_token_file="token")

CASES = [
    Case("clean", Policy(), [(":authority", "a")], [(":status", "200")], CLEAN, CONTINUED,
         frozenset()),
    Case("clean without attributes", Policy(), [(":authority", "a")], [(":status", "200")], {},
         CONTINUED, frozenset()),
    Case(
        "host rewrite shows on the response", REWRITE,
        [(":authority", "old.example"), (":path", "/")], [(":status", "200")], CLEAN,
        Seen(overwrite=frozenset({(":authority", "new.example"), ("x-forwarded-host", "old.example")}),
             clear_route_cache=True,
             metadata={"actions": 'rewrite-host;headers=":authority"', "request_host": "new.example",
                       "direction": "edge"}),
        frozenset({ACTIONS}),
    ),
    Case(
        "echoed envoy header stripped, annotations hidden at the edge", Policy(),
        [(":authority", "a"), ("x-envoy-peer-metadata", "abc")], [(":status", "200")], CLEAN,
        Seen(remove=frozenset({"x-envoy-peer-metadata"}),
             metadata={"actions": 'strip-echoed-envoy-headers;headers="x-envoy-peer-metadata"',
                       "request_host": "a", "direction": "edge"}),
        frozenset(),
    ),
    Case(
        "underscore header reported at a sidecar", Policy(),
        [(":authority", "a"), ("x_user", "1")], [(":status", "200")], CLEAN,
        Seen(metadata={"actions": 'strip-underscore-headers;headers="x_user";report',
                       "request_host": "a", "direction": "outbound"}),
        frozenset({ACTIONS}), declared=Direction.OUTBOUND,
    ),
    Case("refused upstream at the edge", Policy(), [(":authority", "reviews:9080")],
         [(":status", "503")], REFUSED, CONTINUED, frozenset(), reason="upstream_refused"),
    Case("refused upstream, annotated", ANNOTATE, [(":authority", "reviews:9080")],
         [(":status", "503")], REFUSED, CONTINUED, frozenset(DIAGNOSIS), reason="upstream_refused"),
    Case("refused upstream without attributes", ANNOTATE, [(":authority", "reviews:9080")],
         [(":status", "503")], {}, CONTINUED, frozenset(DIAGNOSIS), reason="upstream_failure"),
    Case(
        "the reveal token shows the diagnosis at the edge", REVEAL,
        [(":authority", "reviews:9080"), ("x-extproc-reveal", REVEAL_TOKEN)], [(":status", "503")],
        REFUSED,
        Seen(remove=frozenset({"x-extproc-reveal"}),
             metadata={"actions": 'strip-reveal-header;headers="x-extproc-reveal"',
                       "request_host": "reviews:9080", "direction": "edge", "reveal": 1}),
        frozenset({ACTIONS, *DIAGNOSIS}), reason="upstream_refused",
    ),
    Case(
        "a wrong reveal token shows nothing", REVEAL,
        [(":authority", "reviews:9080"), ("x-extproc-reveal", "guess-guess-guess-guess")],
        [(":status", "503")], REFUSED,
        Seen(remove=frozenset({"x-extproc-reveal"}),
             metadata={"actions": 'strip-reveal-header;headers="x-extproc-reveal", '
                                  'refuse-reveal-token;headers="x-extproc-reveal";report',
                       "request_host": "reviews:9080", "direction": "edge"}),
        frozenset(), reason="upstream_refused",
    ),
    Case(
        "forged annotations removed", Policy(), [(":authority", "a")],
        [(":status", "200"), ("x-extproc-diagnosis", "upstream_requires_mtls"),
         ("x-extproc-hint", "evil")], CLEAN, CONTINUED, frozenset(),
        removed=frozenset({"x-extproc-diagnosis", "x-extproc-hint"}),
    ),
]  # fmt: skip


def seen(response: pb.ProcessingResponse | None, kind: str) -> Seen:
    if response is None or not getattr(response, kind).HasField("response"):
        return CONTINUED
    common = getattr(response, kind).response
    overwrite, append = set(), set()
    for option in common.header_mutation.set_headers:
        pair = (
            option.header.key,
            (option.header.raw_value or option.header.value.encode()).decode(),
        )
        (append if option.append_action == base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
         else overwrite).add(pair)  # fmt: skip
    metadata = {}
    if NS in response.dynamic_metadata.fields:
        metadata = json_format.MessageToDict(response.dynamic_metadata.fields[NS].struct_value)
    return Seen(frozenset(overwrite), frozenset(append), frozenset(common.header_mutation.remove_headers),
                common.clear_route_cache, metadata)  # fmt: skip


def via_grpc(case: Case, request: pb.ProcessingRequest, response: pb.ProcessingRequest):
    state = StreamState(declared=case.declared)
    return handle(case.policy, request, state), handle(case.policy, response, state)


def via_http(case: Case, request: pb.ProcessingRequest, response: pb.ProcessingRequest):
    processor = HttpProcessor(case.policy)

    def call(message: pb.ProcessingRequest) -> pb.ProcessingResponse:
        body = json_format.MessageToJson(message, preserving_proto_field_name=True).encode()
        raw = processor.answer(body, case.declared)
        head, _, payload = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        return json_format.Parse(payload, pb.ProcessingResponse())

    first = call(request)
    # What Envoy forwards to the response-phase filter: the namespace the request phase wrote.
    if NS in first.dynamic_metadata.fields:
        response.metadata_context.filter_metadata[NS].CopyFrom(
            first.dynamic_metadata.fields[NS].struct_value
        )
    return first, call(response)


@pytest.fixture(params=["grpc", "http"])
def adapter(request):
    return {"grpc": via_grpc, "http": via_http}[request.param]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_same_mutations_on_both_transports(case: Case, adapter):
    attrs = {"xds.listener_direction": 0}
    request = request_headers(case.request, attrs)
    response = response_headers(case.response, case.attributes or None)
    first, second = adapter(case, request, response)
    assert seen(first, "request_headers") == case.request_seen
    answer = seen(second, "response_headers")
    assert {name for name, _ in answer.overwrite} == case.response_names
    assert answer.remove == case.removed
    assert answer.metadata.get("reason") == case.reason
    if ACTIONS in case.response_names:
        assert dict(answer.overwrite)[ACTIONS] == case.request_seen.metadata["actions"]


def test_http_answers_equal_grpc_answers_byte_for_byte():
    """Beyond the table's view: the two adapters' responses are the same message.

    Except in one known way: without attributes, the HTTP response phase does not know
    the Host of an unchanged request (the request phase carries nothing then, to keep
    the clean path free), so its diagnosis lacks `host`; gRPC remembers it in the stream.
    """
    for case in CASES:
        if not case.attributes:
            continue
        grpc_answers = via_grpc(case, request_headers(case.request, {"xds.listener_direction": 0}),
                                response_headers(case.response, case.attributes or None))  # fmt: skip
        http_answers = via_http(case, request_headers(case.request, {"xds.listener_direction": 0}),
                                response_headers(case.response, case.attributes or None))  # fmt: skip
        for g, h in zip(grpc_answers, http_answers, strict=True):
            assert json_format.MessageToDict(g) == json_format.MessageToDict(h), case.name
