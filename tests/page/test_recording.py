"""What the adapters record for the page: failures with their request, and nothing when off."""

from __future__ import annotations

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import json_format

from extproc import failures as F
from extproc.config import Policy
from extproc.failures import Failures
from extproc.http_lane import CONTINUE, HttpProcessor
from extproc.server import ExtProcServer
from tests.conftest import CLEAN, REFUSED_MESH, request_headers, response_headers
from tests.grpc.test_server import exchange

REQUEST = [(":method", "POST"), (":path", "/cart?session=s3cret"), (":authority", "orders"),
           ("cookie", "id=c00kie"), ("x-request-id", "req-1")]  # fmt: skip


async def through_grpc(
    failures: Failures | None, attrs: dict[str, object], status: str = "503"
) -> None:
    async with ExtProcServer(Policy(), "127.0.0.1:0", grace=1.0) as server:
        server.servicer.failures = failures
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            await exchange(channel, request_headers(REQUEST),
                           response_headers([(":status", status)], attrs))  # fmt: skip


class TestGrpc:
    @pytest.mark.asyncio
    async def test_failure_recorded_with_its_request(self):
        """A diagnosed failure is a row whose sample has method, path without query, id."""
        table = Failures()
        await through_grpc(table, REFUSED_MESH)
        (row,) = table.rows.values()
        assert (row.cluster, row.reason) == (REFUSED_MESH["xds.cluster_name"], "upstream_refused")
        (sample,) = row.samples
        assert (sample.method, sample.path, sample.request_id, sample.status) == (
            "POST",
            "/cart",
            "req-1",
            503,
        )
        shown = orjson.dumps(table.snapshot(0.0))
        assert b"s3cret" not in shown and b"c00kie" not in shown

    @pytest.mark.asyncio
    async def test_where_is_the_direction_the_response_phase_resolved(self):
        """A clean request carries no direction; the row says where from the response's
        listener (inbound here), not from the cluster's outbound| prefix."""
        table = Failures()
        await through_grpc(table, {**REFUSED_MESH, "xds.listener_direction": 1})
        (row,) = table.rows.values()
        assert row.where == "inbound"

    @pytest.mark.asyncio
    async def test_clean_response_records_nothing(self):
        """A clean answer leaves the table empty."""
        table = Failures()
        await through_grpc(table, CLEAN, "200")
        assert table.seq == 0 and not table.rows

    @pytest.mark.asyncio
    async def test_off_reads_nothing_for_the_page(self, monkeypatch):
        """With the page off, the request's fields are never picked and nothing records."""

        def refuse(*_: object) -> None:
            raise AssertionError("called with the page off")

        monkeypatch.setattr("extproc.server.request_fields", refuse)
        monkeypatch.setattr(F.Failures, "record", refuse)
        await through_grpc(None, REFUSED_MESH)


def as_json(message: pb.ProcessingRequest) -> bytes:
    return json_format.MessageToJson(message, preserving_proto_field_name=True).encode()


def through_http(
    processor: HttpProcessor, attrs: dict[str, object], status: str = "503"
) -> tuple[bytes, dict[str, object]]:
    """Both phases over the HTTP lane, as Envoy sends them: the request phase's answer, and
    our namespace from it forwarded into the response phase's POST (forwarding_namespaces)."""
    answer = processor.answer(as_json(request_headers(REQUEST)))
    body = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])
    namespace = body.get("dynamic_metadata", {}).get("extproc_doctor", {})
    response = orjson.loads(as_json(response_headers([(":status", status)], attrs)))
    response["metadata_context"] = {"filter_metadata": {"extproc_doctor": namespace}}
    processor.answer(orjson.dumps(response))
    return answer, namespace


class TestHttpLane:
    def test_failure_recorded_with_its_request(self):
        """Over the HTTP lane the request phase carries the sample's fields to the response
        phase: the row's sample has method, path without query, id; no query, no cookie."""
        processor = HttpProcessor(Policy())
        processor.failures = table = Failures()
        _, namespace = through_http(processor, REFUSED_MESH)
        assert namespace == {"sample_method": "POST", "sample_path": "/cart",
                             "sample_request_id": "req-1"}  # fmt: skip
        (row,) = table.rows.values()
        assert row.reason == "upstream_refused"
        (sample,) = row.samples
        assert (sample.method, sample.path, sample.request_id, sample.status) == (
            "POST", "/cart", "req-1", 503,
        )  # fmt: skip
        shown = orjson.dumps(table.snapshot(0.0))
        assert b"s3cret" not in shown and b"c00kie" not in shown

    def test_clean_records_nothing(self):
        """A clean answer over the HTTP lane records nothing."""
        processor = HttpProcessor(Policy())
        processor.failures = table = Failures()
        through_http(processor, CLEAN, "200")
        assert not table.rows

    def test_off_carries_nothing(self, monkeypatch):
        """With the page off the request phase answers the continue built once, and the
        request's fields are never picked: a clean request pays nothing for the page."""

        def refuse(*_: object) -> None:
            raise AssertionError("called with the page off")

        monkeypatch.setattr("extproc.http_lane.request_fields", refuse)
        monkeypatch.setattr("extproc.http_lane.carried_fields", refuse)
        processor = HttpProcessor(Policy())
        answer, namespace = through_http(processor, REFUSED_MESH)
        assert answer is CONTINUE["request_headers"] and namespace == {}
