"""Operations on the in-process server: metrics, policy reload, TLS, overload."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import urllib.request
from pathlib import Path
from types import MappingProxyType

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from structlog.testing import capture_logs

from extproc.admission import StreamLimits
from extproc.config import Policy, TlsFiles, policy_from_mapping
from extproc.lab.certs import CertificateAuthority
from extproc.lab.envoy import free_port
from extproc.metrics import Metrics
from extproc.reload import PolicyReloader
from extproc.server import ExternalProcessor, ExtProcServer
from extproc.tls import TlsError
from tests.conftest import mutated, request_headers, response_headers
from tests.grpc.test_server import REFUSED, exchange

pytestmark = pytest.mark.asyncio


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


class TestMetrics:
    async def test_counts_streams_messages_diagnoses_actions(self):
        """One clean and one failing request show up in every counter and the histogram."""
        policy = policy_from_mapping({"underscore_headers": "strip"})
        async with (
            ExtProcServer(policy) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
        ):
            await exchange(
                ch,
                request_headers([(":authority", "a")]),
                response_headers([(":status", "200")]),
            )
            await exchange(
                ch,
                request_headers([(":authority", "a"), ("x_debug", "1")]),
                response_headers([(":status", "503")], REFUSED),
            )
        m = server.metrics
        assert sample(m, "extproc_streams_total") == 2
        assert sample(m, "extproc_streams_active") == 0
        assert sample(m, "extproc_messages_total", kind="request_headers", transport="grpc") == 2
        assert sample(m, "extproc_messages_total", kind="response_headers", transport="grpc") == 2
        assert sample(m, "extproc_diagnoses_total", reason="upstream_refused") == 1
        assert (
            sample(m, "extproc_actions_total", action="strip-underscore-headers", report="false")
            == 1
        )
        assert (
            sample(m, "extproc_processing_seconds_count", kind="response_headers", transport="grpc")
            == 2
        )

    async def test_bad_message_is_counted(self):
        """A message with no kind set counts as an error."""
        from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

        async with (
            ExtProcServer(Policy()) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
        ):
            call = pb_grpc.ExternalProcessorStub(ch).Process()
            await call.write(pb.ProcessingRequest())
            await call.write(request_headers([(":authority", "a")]))
            await call.read()
            await call.done_writing()
        assert (
            sample(server.metrics, "extproc_errors_total", error="bad_message", transport="grpc")
            == 1
        )

    async def test_http_endpoint(self):
        """--metrics-listen serves the text format with the documented names."""
        metrics = Metrics()
        port = free_port()
        metrics.serve(f"127.0.0.1:{port}")
        metrics.diagnoses["no_route"].inc()
        body = await asyncio.to_thread(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
                .read()
                .decode()
            )
        )
        for name in (
            "extproc_streams_total",
            "extproc_streams_active",
            "extproc_messages_total",
            "extproc_processing_seconds_bucket",
            "extproc_actions_total",
            "extproc_errors_total",
            "extproc_policy_reloads_total",
        ):
            assert name in body
        assert 'extproc_diagnoses_total{reason="no_route"} 1.0' in body


async def reported(servicer: ExternalProcessor) -> bool:
    """Wait (up to 5 s) until the servicer's policy is in report mode."""
    for _ in range(250):
        if str(servicer.policy.mode) == "report":
            return True
        await asyncio.sleep(0.02)
    return False


class TestPolicyReload:
    def reloader(self, path: Path, target: ExternalProcessor) -> PolicyReloader:
        def apply(policy: Policy) -> None:
            target.policy = policy

        return PolicyReloader(path, apply, target.metrics)

    async def test_valid_file_replaces_the_policy(self, tmp_path):
        """A valid new file is applied and counted."""
        path = tmp_path / "p.yaml"
        path.write_text("mode: enforce\n")
        servicer = ExternalProcessor(Policy())
        assert self.reloader(path, servicer).reload()
        path.write_text("host_rewrites:\n  a.example: b.example\n")
        assert self.reloader(path, servicer).reload()
        assert dict(servicer.policy.host_rewrites) == {"a.example": "b.example"}
        assert sample(servicer.metrics, "extproc_policy_reloads_total", result="ok") == 2

    async def test_broken_file_keeps_the_old_policy(self, tmp_path):
        """A broken file is refused with file, line and key in the log; the old policy keeps serving."""
        path = tmp_path / "p.yaml"
        old = policy_from_mapping({"mode": "report"})
        servicer = ExternalProcessor(old)
        path.write_text("mode: enforce\nunderscore_headers: maybe\n")
        with capture_logs() as logs:
            assert not self.reloader(path, servicer).reload()
        assert servicer.policy is old
        (event,) = [e for e in logs if e["event"] == "policy_reload_failed"]
        assert f"{path}:2: underscore_headers: expected one of" in event["problem"]
        assert sample(servicer.metrics, "extproc_policy_reloads_total", result="error") == 1

    async def test_file_change_is_picked_up(self, tmp_path):
        """The watcher reloads when the file changes, without a signal."""
        path = tmp_path / "p.yaml"
        path.write_text("mode: enforce\n")
        servicer = ExternalProcessor(Policy())
        reloader = self.reloader(path, servicer)
        task = asyncio.create_task(reloader.run(interval=0.02))
        try:
            path.write_text("mode: report\n# changed\n")
            assert await reported(servicer)
        finally:
            task.cancel()

    async def test_rotated_token_in_a_secret_is_picked_up(self, tmp_path):
        """The watcher reloads when the reveal token file changes, without a signal,
        through a Secret volume's symlink swap (token -> ..data/token, ..data -> a new
        directory); the policy file itself never changes."""
        secret = tmp_path / "secret"
        (secret / "v1").mkdir(parents=True)
        (secret / "v1" / "token").write_text("first-token-0123456789")
        (secret / "..data").symlink_to("v1")
        (secret / "token").symlink_to("..data/token")
        path = tmp_path / "p.yaml"
        path.write_text(f"reveal_token_file: {secret / 'token'}\n")
        servicer = ExternalProcessor(Policy())
        reloader = self.reloader(path, servicer)
        assert reloader.reload()
        assert servicer.policy.reveal_token == b"first-token-0123456789"
        task = asyncio.create_task(reloader.run(interval=0.02))
        try:
            (secret / "v2").mkdir()
            (secret / "v2" / "token").write_text("second-token-0123456789")
            (secret / "..data_tmp").symlink_to("v2")
            (secret / "..data_tmp").replace(secret / "..data")  # atomic, as kubelet does
            for _ in range(250):
                if servicer.policy.reveal_token == b"second-token-0123456789":
                    break
                await asyncio.sleep(0.02)
            assert servicer.policy.reveal_token == b"second-token-0123456789"
        finally:
            task.cancel()

    async def test_trigger_reloads_at_once(self, tmp_path):
        """trigger() (the SIGHUP handler) reloads even when the stamp looks unchanged."""
        path = tmp_path / "p.yaml"
        path.write_text("mode: report\n")
        servicer = ExternalProcessor(Policy())
        reloader = self.reloader(path, servicer)
        task = asyncio.create_task(reloader.run(interval=3600))
        try:
            reloader.trigger()
            assert await reported(servicer)
        finally:
            task.cancel()


@pytest.fixture
def pki(tmp_path):
    """A CA, a server certificate for 127.0.0.1/localhost, and a client certificate."""
    ca = CertificateAuthority.create("extproc test CA")
    server = ca.issue(
        dns_names=["localhost"], spiffe_id="spiffe://cluster.local/ns/mesh/sa/extproc"
    )
    client = ca.issue(spiffe_id="spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway")
    return ca, server.write(tmp_path, "server"), client.write(tmp_path, "client"), tmp_path


def peer_certificate(port: int, ca: Path, client) -> bytes:
    """The certificate the server presents on a fresh TLS connection (ALPN h2, as gRPC)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(str(client.cert_chain), str(client.private_key))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return tls.getpeercert(binary_form=True)


def secure_channel(port: int, files, client=None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=files.trusted_ca.read_bytes(),
        private_key=client.private_key.read_bytes() if client else None,
        certificate_chain=client.cert_chain.read_bytes() if client else None,
    )
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
    )


async def health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    return reply.status


class TestTls:
    async def test_mtls_refuses_a_client_without_certificate(self, pki):
        """With --client-ca, a client with a certificate is served and one without is refused."""
        _, server_files, client_files, _ = pki
        tls = TlsFiles(server_files.cert_chain, server_files.private_key, server_files.trusted_ca)
        async with ExtProcServer(Policy(), tls=tls) as server:
            async with secure_channel(server.port, server_files, client_files) as ch:
                assert await health(ch) == health_pb2.HealthCheckResponse.SERVING
            async with secure_channel(server.port, server_files) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await health(ch)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    async def test_rotated_certificate_is_served_without_restart(self, pki):
        """Replacing the certificate files changes what new connections see, with no restart."""
        ca, server_files, client_files, tmp = pki
        tls = TlsFiles(server_files.cert_chain, server_files.private_key, server_files.trusted_ca)
        async with ExtProcServer(Policy(), tls=tls) as server:
            first = await asyncio.to_thread(
                peer_certificate, server.port, server_files.trusted_ca, client_files
            )
            rotated = ca.issue(
                dns_names=["localhost"], spiffe_id="spiffe://cluster.local/ns/mesh/sa/extproc"
            )
            (tmp / "staged").mkdir()
            staged = rotated.write(tmp / "staged", "server")
            staged.private_key.replace(server_files.private_key)
            staged.cert_chain.replace(server_files.cert_chain)
            second = await asyncio.to_thread(
                peer_certificate, server.port, server_files.trusted_ca, client_files
            )
            assert first != second
            assert server.credentials.reloads == 1
            async with secure_channel(server.port, server_files, client_files) as ch:
                assert await health(ch) == health_pb2.HealthCheckResponse.SERVING

    async def test_plaintext_health_port_beside_tls(self, pki):
        """--health-listen answers health in plaintext and serves nothing else there."""
        _, server_files, _, _ = pki
        tls = TlsFiles(server_files.cert_chain, server_files.private_key)
        async with (
            ExtProcServer(Policy(), tls=tls, health_listen="127.0.0.1:0") as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as ch,
        ):
            assert await health(ch) == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await exchange(ch, request_headers([(":authority", "a")]))
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

    async def test_unusable_files_fail_start_with_their_names(self, pki):
        """A key that does not match the certificate is refused before the server starts."""
        _, server_files, client_files, _ = pki
        with pytest.raises(TlsError, match=str(server_files.cert_chain)):
            ExtProcServer(Policy(), tls=TlsFiles(server_files.cert_chain, client_files.private_key))


class TestOverload:
    async def test_streams_beyond_the_limit_are_refused_at_once(self):
        """With max_streams open, a new stream is refused with RESOURCE_EXHAUSTED instead of queueing."""
        async with (
            ExtProcServer(Policy(), limits=StreamLimits(max_streams=2)) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
        ):
            stub = pb_grpc.ExternalProcessorStub(ch)
            held = [stub.Process() for _ in range(2)]
            for call in held:
                await call.write(request_headers([(":authority", "a")]))
                await call.read()
            extra = stub.Process()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await extra.write(request_headers([(":authority", "a")]))
                await asyncio.wait_for(extra.read(), timeout=5)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for call in held:
                await call.done_writing()
                assert await call.code() == grpc.StatusCode.OK
            (answer,) = await exchange(ch, request_headers([(":authority", "a")]))
            assert answer.WhichOneof("response") == "request_headers"


class TestSecretsNeverLeak:
    SECRETS = MappingProxyType(
        {
            "authorization": "Bearer s3cr3t-token-AAA",
            "cookie": "session=s3cr3t-cookie-BBB",
            "proxy-authorization": "Basic s3cr3t-proxy-CCC",
            "x-forwarded-client-cert": "By=spiffe://x;Hash=s3cr3t-xfcc-DDD",
            "x-extproc-reveal": "s3cr3t-reveal-GGG-0123456789",
        }
    )

    async def test_no_secret_in_annotations_metadata_or_logs(self):
        """Sensitive header values appear in no response header, metadata field or log event."""
        policy = dataclasses.replace(
            policy_from_mapping({"underscore_headers": "strip", "direction": "edge"}),
            reveal_token=self.SECRETS["x-extproc-reveal"].encode(),
        )
        secret_response = {"set-cookie": "id=s3cr3t-set-cookie-EEE"}
        with capture_logs() as logs:
            async with (
                ExtProcServer(policy) as server,
                grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch,
            ):
                req, resp = await exchange(
                    ch,
                    request_headers(
                        [
                            (":authority", "a"),
                            ("x_auth", "s3cr3t-under-FFF"),
                            *self.SECRETS.items(),
                        ]
                    ),
                    response_headers([(":status", "503"), *secret_response.items()], REFUSED),
                )
        visible = " ".join(
            [*mutated(req, "request_headers").values(), *mutated(resp, "response_headers").values(),
             str(req.dynamic_metadata), str(resp.dynamic_metadata), repr(logs)]
        )  # fmt: skip
        assert "x-extproc-diagnosis" in mutated(resp, "response_headers")
        assert "s3cr3t" not in visible
