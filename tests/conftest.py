"""Shared fixtures: message builders for the ext_proc protocol."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"

# The response attributes Envoy 1.40 sends for a mesh service called on a refused port
# (tests/envoy/test_signatures.py records them), and for an upstream's clean 200.
REFUSED_MESH = {
    "response.code": 503,
    "response.flags": 32,
    "response.code_details": "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}",
    "upstream.transport_failure_reason": "delayed connect error: Connection refused",
    "upstream.address": "10.244.1.17:9080",
    "xds.cluster_name": "outbound|9080||reviews.default.svc.cluster.local",
}
CLEAN = {"response.code": 200, "response.flags": 0, "response.code_details": "via_upstream"}


def http_headers(pairs: Iterable[tuple[str, str | bytes]], *, raw: bool = True) -> pb.HttpHeaders:
    """HttpHeaders as Envoy sends them: values in raw_value (or value, with raw=False)."""
    values = []
    for key, value in pairs:
        if raw:
            data = value if isinstance(value, bytes) else value.encode()
            values.append(base_pb2.HeaderValue(key=key, raw_value=data))
        else:
            values.append(base_pb2.HeaderValue(key=key, value=str(value)))
    return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=values))


def attributes(values: Mapping[str, object]) -> dict[str, struct_pb2.Struct]:
    struct = struct_pb2.Struct()
    struct.update(dict(values))
    return {ATTRIBUTES_KEY: struct}


def request_headers(pairs, attrs: Mapping[str, object] | None = None, **kw) -> pb.ProcessingRequest:
    msg = pb.ProcessingRequest(request_headers=http_headers(pairs, **kw))
    if attrs is not None:
        for key, value in attributes(attrs).items():
            msg.attributes[key].CopyFrom(value)
    return msg


def response_headers(pairs, attrs: Mapping[str, object] | None = None) -> pb.ProcessingRequest:
    msg = pb.ProcessingRequest(response_headers=http_headers(pairs))
    if attrs is not None:
        for key, value in attributes(attrs).items():
            msg.attributes[key].CopyFrom(value)
    return msg


def mutated(response: pb.ProcessingResponse, phase: str) -> dict[str, str]:
    """The headers a response sets, by name."""
    common = getattr(response, phase).response
    return {
        o.header.key: (o.header.raw_value or o.header.value.encode()).decode()
        for o in common.header_mutation.set_headers
    }
