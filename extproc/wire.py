"""Reading a ProcessingRequest off the wire, also when a string in it is not UTF-8.

A protobuf `string` must hold UTF-8, and upb refuses the whole message otherwise. Envoy
1.40 copies a request header's bytes into an attribute's `string_value` as they are
(`request.id`, `request.headers['traceparent']`; tests/page/test_samples_e2e.py sends a
non-UTF-8 x-request-id through a real Envoy), so one such header would make the message
undecodable and its failure undiagnosed. `parse` reads such a message through a twin of
its types in which those strings are `bytes`, replaces each bad byte with U+FFFD, and
reads the result as a real ProcessingRequest. A message that parses, nearly every one,
pays one extra Python call.

The twin holds only the fields that can carry such strings (the headers' names and
values, the attributes, our metadata namespace); every other field passes through as an
unknown field, byte for byte.
"""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2
from google.protobuf.message import DecodeError

_F = descriptor_pb2.FieldDescriptorProto
_PACKAGE = "extproc.wire"


def _field(message: Any, name: str, number: int, kind: int, type_name: str = "", *,
           repeated: bool = False, oneof: int | None = None) -> None:  # fmt: skip
    field = message.field.add(name=name, number=number, type=kind)
    field.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    if type_name:
        field.type_name = f".{_PACKAGE}.{type_name}"
    if oneof is not None:
        field.oneof_index = oneof


def _map(message: Any, name: str, number: int, value_type: str) -> None:
    """A map<string, value_type> field, spelled as protoc spells one."""
    entry_name = "".join(part.title() for part in name.split("_")) + "Entry"
    entry = message.nested_type.add(name=entry_name)
    entry.options.map_entry = True
    _field(entry, "key", 1, _F.TYPE_STRING)
    _field(entry, "value", 2, _F.TYPE_MESSAGE, value_type)
    _field(message, name, number, _F.TYPE_MESSAGE, f"{message.name}.{entry_name}", repeated=True)


# The twin's field numbers are read from Envoy's own types, so it cannot drift from them.
_REAL = {
    "ProcessingRequest": pb.ProcessingRequest, "HttpHeaders": pb.HttpHeaders,
    "HeaderMap": base_pb2.HeaderMap, "HeaderValue": base_pb2.HeaderValue,
    "Metadata": base_pb2.Metadata, "Value": struct_pb2.Value, "Struct": struct_pb2.Struct,
    "ListValue": struct_pb2.ListValue,
}  # fmt: skip


def _number(message: str, field: str) -> int:
    return int(_REAL[message].DESCRIPTOR.fields_by_name[field].number)


def _twin() -> type[Any]:
    """The twin of ProcessingRequest, its strings from Envoy's headers and attributes as bytes."""
    file = descriptor_pb2.FileDescriptorProto(name="extproc_wire.proto", package=_PACKAGE)
    file.syntax = "proto3"
    value = file.message_type.add(name="Value")
    value.oneof_decl.add(name="kind")
    for name, kind, type_name in (
        ("null_value", _F.TYPE_INT32, ""),
        ("number_value", _F.TYPE_DOUBLE, ""),
        ("string_value", _F.TYPE_BYTES, ""),  # the point of the twin
        ("bool_value", _F.TYPE_BOOL, ""),
        ("struct_value", _F.TYPE_MESSAGE, "Struct"),
        ("list_value", _F.TYPE_MESSAGE, "ListValue"),
    ):
        _field(value, name, _number("Value", name), kind, type_name, oneof=0)
    _map(file.message_type.add(name="Struct"), "fields", _number("Struct", "fields"), "Value")
    listing = file.message_type.add(name="ListValue")
    _field(listing, "values", _number("ListValue", "values"), _F.TYPE_MESSAGE, "Value",
           repeated=True)  # fmt: skip
    header = file.message_type.add(name="HeaderValue")
    for name in ("key", "value", "raw_value"):
        _field(header, name, _number("HeaderValue", name), _F.TYPE_BYTES)
    header_map = file.message_type.add(name="HeaderMap")
    _field(header_map, "headers", _number("HeaderMap", "headers"), _F.TYPE_MESSAGE, "HeaderValue",
           repeated=True)  # fmt: skip
    http_headers = file.message_type.add(name="HttpHeaders")
    _field(http_headers, "headers", _number("HttpHeaders", "headers"), _F.TYPE_MESSAGE,
           "HeaderMap")  # fmt: skip
    metadata = file.message_type.add(name="Metadata")
    _map(metadata, "filter_metadata", _number("Metadata", "filter_metadata"), "Struct")
    request = file.message_type.add(name="ProcessingRequest")
    for name in ("request_headers", "response_headers"):
        _field(request, name, _number("ProcessingRequest", name), _F.TYPE_MESSAGE, "HttpHeaders")
    _field(request, "metadata_context", _number("ProcessingRequest", "metadata_context"),
           _F.TYPE_MESSAGE, "Metadata")  # fmt: skip
    _map(request, "attributes", _number("ProcessingRequest", "attributes"), "Struct")
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(file.SerializeToString())
    twin: type[Any] = message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"{_PACKAGE}.ProcessingRequest")
    )
    return twin


_Twin = _twin()
_parse = pb.ProcessingRequest.FromString


def parse(raw: bytes) -> pb.ProcessingRequest:
    """The message, its non-UTF-8 header and attribute strings read with U+FFFD for each bad
    byte; DecodeError when it is no ProcessingRequest even so."""
    try:
        return _parse(raw)
    except DecodeError:
        twin = _Twin.FromString(raw)
    for part in (twin.request_headers, twin.response_headers):
        for header in part.headers.headers:
            header.key, header.value = _utf8(header.key), _utf8(header.value)
    for struct in twin.attributes.values():
        _fix_struct(struct)
    for struct in twin.metadata_context.filter_metadata.values():
        _fix_struct(struct)
    return _parse(twin.SerializeToString())


def _utf8(raw: bytes) -> bytes:
    return raw.decode("utf-8", "replace").encode("utf-8")


def _fix_struct(struct: Any) -> None:
    """Every string in a Struct made UTF-8; nesting is bounded by upb's depth limit (100)."""
    for value in struct.fields.values():
        _fix_value(value)


def _fix_value(value: Any) -> None:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        value.string_value = _utf8(value.string_value)
    elif kind == "struct_value":
        _fix_struct(value.struct_value)
    elif kind == "list_value":
        for item in value.list_value.values:
            _fix_value(item)
