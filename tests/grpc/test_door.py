"""The gRPC door on a real grpc.aio server: silent, idle and oversized streams meet their limits."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from structlog.testing import capture_logs

from extproc import admission
from extproc.admission import MAX_SIDE_STREAMS, StreamLimits
from extproc.config import Policy
from extproc.metrics import Metrics
from extproc.server import ExtProcServer
from tests.conftest import request_headers, response_headers
from tests.grpc.test_server import exchange

pytestmark = pytest.mark.asyncio

HEADERS = request_headers([(":authority", "a")])


@pytest.fixture
def quick_deadlines(monkeypatch):
    """Deadlines short enough for a test; the logic is the same at any length."""
    monkeypatch.setattr(admission, "FIRST_MESSAGE_SECONDS", 0.2)
    monkeypatch.setattr(admission, "PENDING_GRACE_SECONDS", 0.0)


def counted(metrics: Metrics, family: str, limit: str) -> float:
    return metrics.registry.get_sample_value(f"extproc_streams_{family}_total", {"limit": limit})


async def ended(call) -> grpc.StatusCode:
    """The status a stream ends with; without the limit under test it would never end,
    so the wait is bounded far past the test's own deadlines (0.2-0.3 s) to fail, not hang."""
    async with asyncio.timeout(30):
        return await call.code()


async def until(check) -> None:
    """Wait for the server to reach a state (it runs on this loop), never a fixed time."""
    async with asyncio.timeout(10):
        # The door offers no event to wait on; polling its count is the honest wait.
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


class TestDeadlines:
    async def test_a_silent_stream_is_closed_after_the_first_message_deadline(
        self, quick_deadlines
    ):
        """A stream that never sends a message ends DEADLINE_EXCEEDED and is counted."""
        metrics = Metrics()
        async with (
            ExtProcServer(Policy(), metrics=metrics) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
        ):
            call = pb_grpc.ExternalProcessorStub(ch).Process()
            assert await ended(call) == grpc.StatusCode.DEADLINE_EXCEEDED
            assert counted(metrics, "closed", admission.CLOSED_FIRST_MESSAGE) == 1
            (answer,) = await exchange(ch, HEADERS)
            assert answer.WhichOneof("response") == "request_headers"

    async def test_an_idle_stream_is_closed_with_ok_after_the_idle_timeout(self, quick_deadlines):
        """A stream answered once and then silent ends OK (Envoy skips the rest) and is counted."""
        metrics = Metrics()
        limits = StreamLimits(idle_seconds=0.3)
        async with (
            ExtProcServer(Policy(), metrics=metrics, limits=limits) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
        ):
            call = pb_grpc.ExternalProcessorStub(ch).Process()
            await call.write(HEADERS)
            assert (await call.read()).WhichOneof("response") == "request_headers"
            assert await ended(call) == grpc.StatusCode.OK
            assert counted(metrics, "closed", admission.CLOSED_IDLE) == 1
            assert counted(metrics, "closed", admission.CLOSED_FIRST_MESSAGE) == 0


class TestCapacity:
    async def test_silent_streams_give_their_places_to_a_real_one(self, quick_deadlines):
        """With every place held by silent streams, a stream that speaks is still answered."""
        metrics = Metrics()
        async with (
            ExtProcServer(Policy(), metrics=metrics, limits=StreamLimits(max_streams=3)) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
        ):
            stub = pb_grpc.ExternalProcessorStub(ch)
            silent = [stub.Process() for _ in range(3)]
            for call in silent:
                await call.wait_for_connection()
            await until(lambda: server.servicer.door.open_streams == 3)
            req, resp = await exchange(ch, HEADERS, response_headers([(":status", "200")]))
            assert req.WhichOneof("response") == "request_headers"
            assert resp.WhichOneof("response") == "response_headers"
            assert await silent[0].code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert counted(metrics, "closed", admission.CLOSED_SILENT) == 1
            assert counted(metrics, "refused", admission.REFUSED_MAX_STREAMS) == 0
            for call in silent:
                call.cancel()

    async def test_refusals_are_counted_and_warned_about_once_per_interval(self):
        """Every refused stream is counted; the warning log line is not repeated per stream."""
        metrics = Metrics()
        with capture_logs() as logs:
            async with (
                ExtProcServer(Policy(), metrics=metrics, limits=StreamLimits(max_streams=1)) as srv,
                grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch,
            ):
                stub = pb_grpc.ExternalProcessorStub(ch)
                held = stub.Process()
                await held.write(HEADERS)
                await held.read()
                for _ in range(5):
                    extra = stub.Process()
                    assert await extra.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                await held.done_writing()
        assert counted(metrics, "refused", admission.REFUSED_MAX_STREAMS) == 5
        warnings = [e for e in logs if e["event"] == "stream_limit"]
        assert len(warnings) == 1
        assert warnings[0]["limit"] == admission.REFUSED_MAX_STREAMS


class TestMessageSize:
    async def test_a_message_over_the_cap_is_refused_and_the_server_serves_on(self):
        """A ProcessingRequest above --max-message-bytes ends RESOURCE_EXHAUSTED before parsing."""
        limits = StreamLimits(max_message_bytes=64 * 1024)
        async with (
            ExtProcServer(Policy(), limits=limits) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
        ):
            big = request_headers([(":authority", "a"), ("x-big", "v" * 70_000)])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await exchange(ch, big)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            small = request_headers([(":authority", "a"), ("x-big", "v" * 60_000)])
            (answer,) = await exchange(ch, small)
            assert answer.WhichOneof("response") == "request_headers"
            assert server.servicer.door.open_streams == 0


class TestSideStreams:
    async def test_health_watches_are_capped_and_process_goes_on(self):
        """Beyond MAX_SIDE_STREAMS open health Watch streams a new one is refused; ext_proc is not."""
        async with (
            ExtProcServer(Policy()) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
        ):
            stub = health_pb2_grpc.HealthStub(ch)
            held = [stub.Watch(health_pb2.HealthCheckRequest()) for _ in range(MAX_SIDE_STREAMS)]
            for call in held:
                assert (await call.read()).status == health_pb2.HealthCheckResponse.SERVING
            extra = stub.Watch(health_pb2.HealthCheckRequest())
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await extra.read()  # an admitted watch would answer SERVING here
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            (answer,) = await exchange(ch, HEADERS)
            assert answer.WhichOneof("response") == "request_headers"
            for call in held:
                call.cancel()

    async def test_reflection_streams_are_capped(self):
        """Beyond MAX_SIDE_STREAMS open reflection streams a new one is refused."""
        async with (
            ExtProcServer(Policy()) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
        ):
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            list_services = reflection_pb2.ServerReflectionRequest(list_services="")
            held = [stub.ServerReflectionInfo() for _ in range(MAX_SIDE_STREAMS)]
            for call in held:
                await call.write(list_services)
                assert (await call.read()).HasField("list_services_response")
            extra = stub.ServerReflectionInfo()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await extra.write(list_services)
                await extra.read()  # an admitted stream would list the services here
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for call in held:
                call.cancel()
