"""The real grpc.aio server on port 0, spoken to as Envoy would."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import grpc
import pytest
import pytest_asyncio
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from extproc.config import policy_from_mapping
from extproc.server import SERVICE_NAME, ExtProcServer
from tests.conftest import mutated, request_headers, response_headers

pytestmark = pytest.mark.asyncio

REFUSED = {
    "response.code": 503,
    "response.flags": 32,
    "response.code_details": "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}",
    "upstream.transport_failure_reason": "delayed connect error: Connection refused",
    "upstream.address": "127.0.0.1:1",
    "xds.cluster_name": "refused",
    "xds.route_name": "",
}
POLICY = policy_from_mapping(
    {
        "host_rewrites": {"shop.example.com": "echo.demo"},
        "underscore_headers": "strip",
        "response_annotations": "on",
    },
    source="test",
)


@pytest_asyncio.fixture
async def server():
    async with ExtProcServer(POLICY, "127.0.0.1:0", grace=1.0) as srv:
        yield srv


@pytest_asyncio.fixture
async def channel(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


async def exchange(channel, *messages: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
    """One Process stream: send each message, read its answer, as Envoy does."""
    call = pb_grpc.ExternalProcessorStub(channel).Process()
    answers = []
    for message in messages:
        await call.write(message)
        answers.append(await call.read())
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    return answers


class TestProcess:
    async def test_clean_request_continues_unchanged(self, channel):
        """A clean request and a 200 get empty continues of the right kinds."""
        req, resp = await exchange(
            channel,
            request_headers(
                [(":authority", "echo.demo"), (":path", "/")], {"xds.listener_direction": 2}
            ),
            response_headers(
                [(":status", "200"), ("x-envoy-upstream-service-time", "1")],
                {
                    "response.code": 200,
                    "response.flags": 0,
                    "response.code_details": "via_upstream",
                },
            ),
        )
        assert req.WhichOneof("response") == "request_headers"
        assert req.request_headers == pb.HeadersResponse()
        assert resp.WhichOneof("response") == "response_headers"
        assert resp.response_headers == pb.HeadersResponse()
        assert not resp.HasField("dynamic_metadata")

    async def test_failure_is_annotated(self, channel):
        """A refused upstream gets the diagnosis, the hint and dynamic metadata."""
        _, resp = await exchange(
            channel,
            request_headers([(":authority", "refused.demo")]),
            response_headers([(":status", "503")], REFUSED),
        )
        headers = mutated(resp, "response_headers")
        assert headers["x-extproc-diagnosis"] == (
            'upstream_refused;status=503;flags="UF";cluster="refused";upstream="127.0.0.1:1";'
            'host="refused.demo";detail="delayed connect error: Connection refused"'
        )
        assert "Nothing listens" in headers["x-extproc-hint"]
        meta = resp.dynamic_metadata.fields["extproc_doctor"].struct_value.fields
        assert meta["reason"].string_value == "upstream_refused"
        assert meta["cluster"].string_value == "refused"

    async def test_host_rewrite(self, channel):
        """A Host in host_rewrites is rewritten, the route cache cleared, and the response lists the action."""
        req, resp = await exchange(
            channel,
            request_headers(
                [(":authority", "shop.example.com"), ("x_debug", "1")],
                {"xds.listener_direction": 2},
            ),
            response_headers(
                [(":status", "200")], {"response.flags": 0, "response.code_details": "via_upstream"}
            ),
        )
        common = req.request_headers.response
        assert common.clear_route_cache
        assert mutated(req, "request_headers") == {
            ":authority": "echo.demo",
            "x-forwarded-host": "shop.example.com",
        }
        assert list(common.header_mutation.remove_headers) == ["x_debug"]
        assert (
            req.dynamic_metadata.fields["extproc_doctor"]
            .struct_value.fields["actions"]
            .string_value
        )
        assert mutated(resp, "response_headers") == {
            "x-extproc-actions": 'strip-underscore-headers;headers="x_debug", rewrite-host;headers=":authority"'
        }

    async def test_value_field_is_read_too(self, channel):
        """Header values in `value` instead of `raw_value` are understood."""
        (req,) = await exchange(
            channel, request_headers([(":authority", "SHOP.example.com")], raw=False)
        )
        assert mutated(req, "request_headers")[":authority"] == "echo.demo"

    async def test_odd_bytes_survive_and_never_reach_an_annotation_raw(self, channel):
        """Non-UTF-8 and control bytes in the Host come back percent-encoded, never raw."""
        _, resp = await exchange(
            channel,
            request_headers([(":authority", b"bad\xff\r\nhost")]),
            response_headers([(":status", "503")], REFUSED),
        )
        value = mutated(resp, "response_headers")["x-extproc-diagnosis"]
        assert 'host="bad%ff%0d%0ahost"' in value
        assert all(0x20 <= ord(c) < 0x7F for c in value)

    @pytest.mark.parametrize(
        "message",
        [
            pb.ProcessingRequest(request_body=pb.HttpBody(body=b"x", end_of_stream=True)),
            pb.ProcessingRequest(response_body=pb.HttpBody(body=b"x")),
            pb.ProcessingRequest(request_trailers=pb.HttpTrailers()),
            pb.ProcessingRequest(response_trailers=pb.HttpTrailers()),
        ],
        ids=["request_body", "response_body", "request_trailers", "response_trailers"],
    )
    async def test_bodies_and_trailers_continue(self, channel, message):
        """Every kind the server does not process is continued with the matching empty response."""
        (answer,) = await exchange(channel, message)
        kind = message.WhichOneof("request")
        assert answer.WhichOneof("response") == kind
        assert not getattr(answer, kind).ListFields()

    async def test_without_attributes(self, channel):
        """With no attributes, a 503 without x-envoy-upstream-service-time is still called an Envoy failure."""
        _, resp = await exchange(
            channel, request_headers([(":authority", "a")]), response_headers([(":status", "503")])
        )
        assert mutated(resp, "response_headers")["x-extproc-diagnosis"].startswith(
            "upstream_failure;status=503"
        )


class TestBadInput:
    async def test_empty_message_is_skipped_and_stream_continues(self, channel):
        """A message with no kind set gets no answer, and the stream goes on."""
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        await call.write(pb.ProcessingRequest())
        await call.write(request_headers([(":authority", "a")]))
        answer = await call.read()
        assert answer.WhichOneof("response") == "request_headers"
        await call.done_writing()

    async def test_garbage_bytes_fail_one_stream_only(self, channel):
        """Bytes that are not a ProcessingRequest end that stream with an error; the server keeps serving."""
        method = f"/{SERVICE_NAME}/Process"
        raw = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
        call = raw()
        await call.write(b"\xff\xff\xff\xff garbage")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
        (answer,) = await exchange(channel, request_headers([(":authority", "a")]))
        assert answer.WhichOneof("response") == "request_headers"

    async def test_huge_header_count(self, channel):
        """Ten thousand headers are processed and the answer stays bounded."""
        pairs = [(":authority", "a")] + [(f"x_h{i}", "v" * 10) for i in range(10_000)]
        _, resp = await exchange(
            channel, request_headers(pairs), response_headers([(":status", "200")])
        )
        assert len(mutated(resp, "response_headers")["x-extproc-actions"]) <= 300


class TestHealthAndReflection:
    async def test_health_serving(self, channel):
        """The standard health service answers SERVING overall and for the ext_proc service."""
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

    async def test_reflection_lists_services(self, channel):
        """Server reflection lists ext_proc and health, so grpcurl and ghz can find them."""
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def requests():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for reply in stub.ServerReflectionInfo(requests()):
            names = {s.name for s in reply.list_services_response.service}
            assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
            break


class TestServeProcess:
    async def test_sigterm_drains_in_flight_stream_and_exits_zero(self):
        """`extproc serve` on SIGTERM lets an open stream finish, refuses new ones, and exits 0."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "extproc", "serve", "--listen", "127.0.0.1:0", "--grace", "5"],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            port = await asyncio.to_thread(_port_from_log, proc)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                health = health_pb2_grpc.HealthStub(ch)
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=10
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                # As a rendered sidecar filter declares it: annotations are shown there.
                call = pb_grpc.ExternalProcessorStub(ch).Process(
                    metadata=(("x-extproc-direction", "outbound"),)
                )
                await call.write(request_headers([(":authority", "a")]))
                assert (await call.read()).WhichOneof("response") == "request_headers"
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(
                    0.3
                )  # let the server start draining; correctness does not depend on it
                await call.write(response_headers([(":status", "503")], REFUSED))
                answer = await call.read()
                assert "x-extproc-diagnosis" in mutated(answer, "response_headers")
                await call.done_writing()
            assert await asyncio.to_thread(proc.wait, 10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stderr.close()

    async def test_bad_policy_fails_start_with_the_reason(self, tmp_path):
        """A broken policy stops `extproc serve` at start-up with a message naming the key."""
        bad = tmp_path / "p.yaml"
        bad.write_text("mode: sometimes\n")
        result = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "extproc",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--config",
                str(bad),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2
        assert f"{bad}:1: mode: expected one of enforce, report" in result.stderr


def _port_from_log(proc: subprocess.Popen) -> int:
    """The port from the server's `serving` log line (it listens on port 0)."""
    import json

    for line in proc.stderr:
        event = json.loads(line)
        if event.get("event") == "serving":
            return int(event["port"])
    raise AssertionError(f"server exited ({proc.wait()}) before serving")
