"""`wire.parse`: a message whose strings are not all UTF-8 is read, not refused."""

from __future__ import annotations

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.message import DecodeError

from extproc import wire
from extproc.config import policy_from_mapping
from extproc.server import ExtProcServer
from tests.conftest import REFUSED_MESH, response_headers
from tests.cost import LINEAR_RATIO, growth

KEY = "envoy.filters.http.ext_proc"
MARK = "MARKMARKMARK"  # replaced in the bytes by as many bytes that are not UTF-8
BAD = b"r\xe9q\xff-page-2"[: len(MARK)].ljust(len(MARK), b"\xc3")
READ = BAD.decode("utf-8", "replace")


def rich() -> pb.ProcessingRequest:
    """A response_headers message with every place such a string can sit marked once."""
    message = response_headers([(":status", "503"), ("x-odd", MARK)], dict(REFUSED_MESH))
    message.response_headers.headers.headers.add(key="x-old", value=MARK)  # older Envoys
    fields = message.attributes[KEY]
    fields.update({"request.id": MARK, "nested": {"list": [MARK, 1.5, True, None]}})
    message.metadata_context.filter_metadata["extproc_doctor"].update({"actions": MARK})
    message.observability_mode = False
    return message


def broken(message: pb.ProcessingRequest) -> bytes:
    """The message's bytes with every mark made non-UTF-8 (lengths kept)."""
    raw = message.SerializeToString()
    assert raw.count(MARK.encode()) == 5
    return raw.replace(MARK.encode(), BAD)


class TestParse:
    def test_a_well_formed_message_is_read_as_the_real_parser_reads_it(self):
        """Nothing to repair: the same message as ProcessingRequest.FromString gives."""
        raw = rich().SerializeToString()
        assert wire.parse(raw) == pb.ProcessingRequest.FromString(raw)

    def test_the_real_parser_refuses_the_broken_bytes(self):
        """The premise: upb refuses a message with one string that is not UTF-8."""
        with pytest.raises(DecodeError):
            pb.ProcessingRequest.FromString(broken(rich()))

    def test_each_bad_string_is_read_with_replacement_characters_the_rest_unchanged(self):
        """Every marked place (header value, raw value kept as bytes, attribute, nested
        struct and list, our namespace) reads U+FFFD for each bad byte; all else is equal."""
        expected = rich()
        text = str(expected).replace(MARK, READ)  # the oracle: the real types, repaired by hand
        got = wire.parse(broken(expected))
        raw_value = got.response_headers.headers.headers[1].raw_value
        assert raw_value == BAD  # bytes fields stay as sent: the adapter decodes them itself
        got.response_headers.headers.headers[1].raw_value = MARK.encode()
        assert str(got).replace(MARK, READ) == text.replace(MARK, READ)
        assert got.attributes[KEY].fields["request.id"].string_value == READ
        assert (
            got.metadata_context.filter_metadata["extproc_doctor"].fields["actions"].string_value
            == READ
        )

    @pytest.mark.parametrize("raw", [b"\xff\xff\xff", b"\x12\x05ab", b"\x1a\xff\xff\xff\x0f"])
    def test_garbage_is_still_refused(self, raw):
        """Bytes that are no ProcessingRequest at all raise DecodeError, as before."""
        with pytest.raises(DecodeError):
            wire.parse(raw)


def as_is(raw: bytes) -> bytes:
    """The client's serializer: the bytes go out as they are."""
    return raw


@pytest.mark.asyncio
async def test_the_door_diagnoses_a_message_the_real_parser_would_refuse():
    """Over the real gRPC door: the failure with a non-UTF-8 request id is diagnosed
    (before: the stream failed, Envoy failed open, nothing annotated)."""
    policy = policy_from_mapping({"response_annotations": "on"})
    async with (
        ExtProcServer(policy, "127.0.0.1:0", grace=1.0) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        process = channel.stream_stream(
            "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
            request_serializer=as_is,
            response_deserializer=pb.ProcessingResponse.FromString,
        )
        call = process()
        await call.write(broken(rich()))
        answer = await call.read()
        await call.done_writing()
    names = [o.header.key for o in answer.response_headers.response.header_mutation.set_headers]
    assert "x-extproc-diagnosis" in names


class TestCost:
    def test_repair_cost_grows_linearly_with_the_bad_strings(self):
        """A message full of non-UTF-8 strings (flat and nested lists) costs about 8x to
        read at 8x the strings, not 64x: one pass over the message."""

        def build(n: int) -> bytes:
            message = response_headers([(":status", "503")], dict(REFUSED_MESH))
            fields = message.attributes[KEY]
            fields.update({f"a{i}": MARK for i in range(n // 2)})
            fields.update({"list": [MARK] * (n // 2)})
            return message.SerializeToString().replace(MARK.encode(), BAD)

        n, ratio = growth(wire.parse, build, n=64)
        assert ratio < LINEAR_RATIO, f"{ratio:.1f}x for 8x the strings at n={n}"
