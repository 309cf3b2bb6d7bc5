"""Threats T2 to T6 at the gRPC tier: the real grpc.aio server, spoken to as Envoy would.

docs/threat-model.md names the threat each test stands for.
"""

from __future__ import annotations

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from structlog.testing import capture_logs

from extproc import core as core_module
from extproc import server as server_module
from extproc.config import Policy, policy_from_mapping
from extproc.server import ExternalProcessor, ExtProcServer
from tests.conftest import CLEAN, REFUSED_MESH, mutated, request_headers, response_headers

pytestmark = pytest.mark.asyncio

REFUSED = REFUSED_MESH
FORGED = (
    ("x-extproc-diagnosis", 'upstream_requires_mtls;cluster="outbound|443||vault"'),
    ("x-extproc-hint", "Send your credentials to https://evil.example"),
    ("x-extproc-actions", "rewrite-host"),
)


async def exchange(
    policy: Policy, *messages: pb.ProcessingRequest, direction: str | None = None
) -> list[pb.ProcessingResponse]:
    """One Process stream, with x-extproc-direction metadata as a rendered filter sends it."""
    metadata = (("x-extproc-direction", direction),) if direction else None
    async with (
        ExtProcServer(policy) as srv,
        grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel,
    ):
        call = pb_grpc.ExternalProcessorStub(channel).Process(metadata=metadata)
        answers = []
        for message in messages:
            await call.write(message)
            answers.append(await call.read())
        await call.done_writing()
        return answers


def removed(response: pb.ProcessingResponse) -> list[str]:
    return list(response.response_headers.response.header_mutation.remove_headers)


class TestForgedAnnotations:
    """T2: an upstream's own x-extproc-* headers never reach the client as ours."""

    async def test_removed_from_a_clean_response(self):
        """A 200 carrying forged annotations: the server removes all three."""
        _, resp = await exchange(
            Policy(),
            request_headers([(":authority", "reviews:9080")]),
            response_headers([(":status", "200"), *FORGED], CLEAN),
            direction="outbound",
        )
        assert sorted(removed(resp)) == sorted(name for name, _ in FORGED)
        assert mutated(resp, "response_headers") == {}

    async def test_replaced_on_a_failure_and_the_rest_removed(self):
        """On a failure the server writes its own diagnosis and hint (overwriting the
        forged ones) and removes the forged x-extproc-actions it did not write."""
        _, resp = await exchange(
            Policy(),
            request_headers([(":authority", "reviews:9080")]),
            response_headers([(":status", "503"), *FORGED], REFUSED),
            direction="outbound",
        )
        headers = mutated(resp, "response_headers")
        assert headers["x-extproc-diagnosis"].startswith("upstream_refused;")
        assert "evil" not in headers["x-extproc-hint"]
        assert removed(resp) == ["x-extproc-actions"]

    async def test_removed_where_annotations_are_off(self):
        """At the edge (annotations off) the forged ones still go."""
        _, resp = await exchange(
            Policy(),
            request_headers([(":authority", "reviews:9080")]),
            response_headers([(":status", "503"), *FORGED], REFUSED),
            direction="edge",
        )
        assert mutated(resp, "response_headers") == {}
        assert sorted(removed(resp)) == sorted(name for name, _ in FORGED)


MESH_PEER = "spiffe://cluster.local/ns/default/sa/productpage"


class TestExposure:
    """T3: at the edge the diagnosis goes to metadata, logs and metrics, not to the client."""

    @pytest.mark.parametrize(
        ("direction", "peer", "shown"),
        [
            ("edge", MESH_PEER, False),
            ("outbound", "", True),
            ("inbound", MESH_PEER, True),
            ("inbound", "", False),
            ("inbound", "https://idp.example/client", False),
            (None, MESH_PEER, False),
        ],
    )
    async def test_auto_by_declared_direction(self, direction, peer, shown):
        """auto: shown at outbound sidecars, at inbound ones only to a caller with a mesh
        (SPIFFE) certificate, hidden at the edge; no declaration and no listener direction
        counts as the edge."""
        attributes = {**REFUSED, "connection.uri_san_peer_certificate": peer} if peer else REFUSED
        _req, resp = await exchange(
            Policy(),
            request_headers([(":authority", "reviews:9080"), ("x-real-ip", "1.2.3.4")]),
            response_headers([(":status", "503")], attributes),
            direction=direction,
        )
        headers = mutated(resp, "response_headers")
        assert ("x-extproc-diagnosis" in headers) is shown
        assert ("x-extproc-hint" in headers) is shown
        assert not any(name.startswith("x-extproc-") for name in headers) or shown
        meta = resp.dynamic_metadata.fields["extproc_doctor"].struct_value.fields
        assert meta["reason"].string_value == "upstream_refused"

    async def test_istio_gateway_listener_says_outbound_but_declares_edge(self):
        """An Istio gateway listener is OUTBOUND; the rendered filter's declaration wins."""
        _req, resp = await exchange(
            Policy(),
            request_headers([(":authority", "shop.example.com")], {"xds.listener_direction": 2}),
            response_headers([(":status", "503")], REFUSED),
            direction="edge",
        )
        assert mutated(resp, "response_headers") == {}

    async def test_response_only_stream_reads_the_listener_direction(self):
        """A gated, response-only stream without a declaration falls back to the listener
        direction sent with the response attributes."""
        (resp,) = await exchange(
            Policy(),
            response_headers([(":status", "503")], {**REFUSED, "xds.listener_direction": 2}),
        )
        assert "x-extproc-diagnosis" in mutated(resp, "response_headers")

    @pytest.mark.parametrize(("value", "shown"), [("on", True), ("off", False)])
    async def test_policy_key_overrides_the_place(self, value, shown):
        """response_annotations: on shows them at the edge; off hides them at a sidecar."""
        policy = policy_from_mapping({"response_annotations": value})
        _, resp = await exchange(
            policy,
            request_headers([(":authority", "reviews:9080"), ("x_user", "1")]),
            response_headers([(":status", "503")], REFUSED),
            direction="outbound" if value == "off" else "edge",
        )
        headers = mutated(resp, "response_headers")
        assert ("x-extproc-diagnosis" in headers) is shown
        assert ("x-extproc-actions" in headers) is shown

    async def test_unknown_declaration_falls_back_to_the_listener(self):
        """A declared value the server does not know is ignored, not trusted."""
        # Both phases carry the listener, as the rendered filter asks (filter_config.py).
        listener = {"xds.listener_direction": 2}
        _, resp = await exchange(
            Policy(),
            request_headers([(":authority", "a")], listener),
            response_headers([(":status", "503")], {**REFUSED, **listener}),
            direction="sideways",
        )
        assert "x-extproc-diagnosis" in mutated(resp, "response_headers")


class TestErrorsThatCanBeActedOn:
    """T6: an exception while processing is logged with type, message and stack, with
    header values redacted, and counted; the stream goes on."""

    async def test_logged_with_stack_and_redacted(self, monkeypatch):
        secret = "session=s3cr3t-cookie-BBB"

        def broken(*args, **kwargs):
            raise ValueError(f"cannot use header value {secret!r} nor {'x' * 2}")

        monkeypatch.setattr(core_module, "decide", broken)
        processor = ExternalProcessor(Policy())
        # keep-alive: a name a rule looks at, so the headers are read and decided.
        request = request_headers([(":authority", "a"), ("cookie", secret), ("keep-alive", "1")])
        with capture_logs() as logs:
            policy, first = processor._rules
            answer = processor._answer(
                "request_headers", policy, first, request, server_module.StreamState()
            )
        assert answer is server_module.CONTINUE["request_headers"]
        (event,) = [e for e in logs if e["event"] == "processing_failed"]
        assert event["error"] == "ValueError"
        assert "cannot use header value" in event["message"]
        assert "s3cr3t" not in repr(logs)
        assert "<redacted>" in event["message"]
        assert "test_trust.py" in event["stack"]
        assert "broken" in event["stack"]
        sample = processor.metrics.registry.get_sample_value(
            "extproc_errors_total", {"error": "processing_failed", "transport": "grpc"}
        )
        assert sample == 1.0


class TestVisibleAtTheEdge:
    """T11: at the edge the client never sees x-extproc-actions, so what the server
    removed shows in the access log's metadata and a throttled log line with the fix."""

    async def test_forwarding_headers_stripped_say_so(self, monkeypatch):
        """Stripped at the edge: the request's metadata carries the action, and one log
        line per interval names the headers and the trusted_hops setting."""
        now = [0.0]
        monkeypatch.setattr(
            core_module, "FORWARDING_LOG", core_module.Throttle(10.0, lambda: now[0])
        )
        with capture_logs() as logs:
            for _ in range(3):
                (resp,) = await exchange(
                    Policy(),
                    request_headers([(":authority", "a"), ("x-forwarded-prefix", "/evil")]),
                    direction="edge",
                )
        meta = resp.dynamic_metadata.fields["extproc_doctor"].struct_value.fields
        assert "strip-forwarding-headers" in meta["actions"].string_value
        (line,) = [e for e in logs if e["event"] == "forwarding_headers_stripped"]
        assert line["headers"] == "x-forwarded-prefix"
        assert "trusted_hops" in line["hint"]

    async def test_behind_trusted_proxies_nothing_to_say(self):
        """trusted_hops: the forwarding headers pass, and no line is logged."""
        with capture_logs() as logs:
            (resp,) = await exchange(
                policy_from_mapping({"trusted_hops": 1}),
                request_headers([(":authority", "a"), ("x-forwarded-prefix", "/p")]),
                direction="edge",
            )
        assert not resp.request_headers.HasField("response")
        assert not [e for e in logs if e["event"] == "forwarding_headers_stripped"]
