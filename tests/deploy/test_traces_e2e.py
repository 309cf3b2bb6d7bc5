"""The diagnosis on Envoy's own span, for every rendered target that traces, run by a real Envoy.

Each rendered config (the plain Envoy with its Zipkin or OpenTelemetry tracer; the Istio
EnvoyFilters placed on a sidecar's and an ingress gateway's listeners by the Istio
stand-in, in a mesh that traces to Zipkin as istiod configures it) runs with the real
server, an upstream, and a span receiver. A request to a refused port must leave a span
with the diagnosis as tags (`filter_config.TRACE_TAGS`), in gated mode as well, where a
composite filter created ext_proc for the failing response only; a clean request's span
must carry none of them. Cilium is absent: cilium-envoy compiles no tracer
(`extproc/render/cilium.py`), and `TestRender` checks that a collector is refused there.
"""

from __future__ import annotations

import http.client
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config import Policy
from extproc.diagnosis import HINTS
from extproc.filter_config import GRPC, HTTP, TRACE_TAGS, trace_custom_tags
from extproc.http_lane import HttpLane, HttpProcessor
from extproc.lab import BackgroundServer, EnvoyProcess, HttpUpstream
from extproc.lab.envoy import free_port
from extproc.render import RenderError, RenderMode, RenderOptions, render
from extproc.render.options import OTLP, ZIPKIN
from extproc.server import ExtProcServer

from .istio_pilot import Proxy, apply, istio_tracing
from .placement import (
    INGRESS,
    ISTIO_LISTENERS,
    SIDECAR,
    apply_envoy_filter,
    upstream_cluster,
)
from .test_render import run
from .trace_receivers import OtlpReceiver, Span, ZipkinReceiver

pytestmark = pytest.mark.envoy

# Envoy's tracers batch: a span waits for 5 others or 5 s (runtime keys
# tracing.zipkin.min_flush_spans / flush_interval_ms, the same under tracing.opentelemetry).
# Flushing each span as it finishes makes the receiver's wait end as soon as Envoy is done.
FLUSH_EACH_SPAN = {
    "layers": [
        {
            "name": "flush-each-span",
            "static_layer": {
                "tracing.zipkin.min_flush_spans": 1,
                "tracing.opentelemetry.min_flush_spans": 1,
            },
        }
    ]
}
# The refused upstream's cluster carries the metadata Istio stamps on a cluster built from a
# DestinationRule (design.md), so the diagnosis names it.
REFUSED = "refused"
DESTINATION_RULE = "/apis/networking.istio.io/v1/namespaces/shop/destination-rule/payments"
OURS = tuple(tag for tag, _ in TRACE_TAGS)
SECRET = "s3cret-token-4711"
EDGE_LISTENERS = ("ingress", "gateway")  # the plain Envoy's (edge by default) and Istio's gateway


class Ok(BaseHTTPRequestHandler):
    """Answers 200."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


def with_refused_route(bootstrap: dict[str, Any], port: int) -> None:
    """Every listener routes `/refused` to a port nothing listens on, the rest as rendered."""
    refused = upstream_cluster(REFUSED, port)
    refused["metadata"] = {"filter_metadata": {"istio": {"config": DESTINATION_RULE}}}
    bootstrap["static_resources"]["clusters"].append(refused)
    for listener in bootstrap["static_resources"]["listeners"]:
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        for host in manager["route_config"]["virtual_hosts"]:
            route = {"match": {"prefix": "/refused"}, "route": {"cluster": REFUSED}}
            host["routes"].insert(0, route)


@contextmanager
def traced(
    target: str, mode: RenderMode, tracer: str, transport: str = GRPC
) -> Iterator[tuple[dict[str, int], ZipkinReceiver | OtlpReceiver]]:
    """The target's rendered config running with the server (over `transport`), an
    upstream and a receiver: (listener ports by name, the receiver)."""
    with ExitStack() as stack:
        receiver = stack.enter_context(ZipkinReceiver() if tracer == ZIPKIN else OtlpReceiver())
        upstream = stack.enter_context(HttpUpstream(Ok))
        door = (
            ExtProcServer(Policy())
            if transport == GRPC
            else HttpLane(HttpProcessor(Policy()), "127.0.0.1:0")
        )
        server = stack.enter_context(BackgroundServer(door)).port
        collector = {f"tracing_{tracer}": f"127.0.0.1:{receiver.port}"} if target == "envoy" else {}
        options = RenderOptions(
            mode=mode,
            transport=transport,
            extproc_address=f"127.0.0.1:{server}",
            envoy_listen="127.0.0.1:0",
            upstream=f"127.0.0.1:{upstream.port}",
            **collector,
        )
        (text,) = render(target, options).values()
        documents = list(yaml.safe_load_all(text))
        if target == "istio":
            bootstrap = apply_envoy_filter(documents, upstream.port, zipkin_port=receiver.port)
        else:
            bootstrap = documents[0]
        with_refused_route(bootstrap, free_port())
        bootstrap["layered_runtime"] = FLUSH_EACH_SPAN
        envoy = stack.enter_context(EnvoyProcess(bootstrap))
        yield envoy.listener_ports(), receiver


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def span_of(receiver: ZipkinReceiver | OtlpReceiver, path: str) -> Span:
    """The downstream span of the request to `path`, once the receiver has it."""
    return receiver.wait_for(lambda span: span.tags.get("http.url", "").endswith(path))


CASES = [
    ("envoy", RenderMode.GATED, ZIPKIN),
    ("envoy", RenderMode.ALWAYS, ZIPKIN),
    ("envoy", RenderMode.GATED, OTLP),
    ("envoy", RenderMode.ALWAYS, OTLP),
    ("istio", RenderMode.GATED, ZIPKIN),
    ("istio", RenderMode.ALWAYS, ZIPKIN),
    # The HTTP lane: the response-phase filter is a second one, created by the gate.
    ("envoy", RenderMode.GATED, ZIPKIN, HTTP),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(map(str, c)))
def running(request: pytest.FixtureRequest) -> Iterator[tuple[dict[str, int], Any]]:
    with traced(*request.param) as ports_and_receiver:
        yield ports_and_receiver


def unique(prefix: str, listener: str) -> str:
    return f"{prefix}/{listener}/{uuid.uuid4().hex}"


class TestTheSpan:
    def test_failing_request_carries_the_diagnosis(self, running):
        """A refused upstream's span carries the reason, the DestinationRule, the socket
        error and the hint, beside Envoy's own UF; at Istio's listeners beside Istio's tags."""
        ports, receiver = running
        for listener, port in ports.items():
            path = unique("/refused", listener)
            status, _ = get(port, path)
            tags = span_of(receiver, path).tags
            assert status == 503, listener
            assert tags["response_flags"] == "UF", listener
            assert tags["extproc.reason"] == "upstream_refused", listener
            assert tags["extproc.dr"] == "shop/payments", listener
            assert "Connection refused" in tags["extproc.detail"], listener
            assert tags["extproc.hint"] == HINTS["upstream_refused"], listener
            if listener in ISTIO_LISTENERS.values():  # the MERGE appended: Istio's tags stay
                assert tags["istio.canonical_service"] == "unknown", listener
                assert tags["istio.namespace"] in (SIDECAR.namespace, INGRESS.namespace)

    def test_clean_request_carries_none(self, running):
        """A clean request's span has none of the doctor's tags."""
        ports, receiver = running
        for listener, port in ports.items():
            path = unique("/ok", listener)
            status, _ = get(port, path)
            tags = span_of(receiver, path).tags
            assert status == 200, listener
            assert not [tag for tag in tags if tag.startswith("extproc.")], listener


class TestWhereTheTagsGo:
    def test_tags_never_reach_the_client(self, running):
        """The tags are span tags: no response header carries one, and at the edge no
        response header carries the diagnosis at all."""
        ports, receiver = running
        for listener, port in ports.items():
            path = unique("/refused", listener)
            _, headers = get(port, path)
            tags = span_of(receiver, path).tags
            assert not [name for name in headers if name.startswith("extproc.")], listener
            if listener in EDGE_LISTENERS:
                values = " ".join(headers.values())
                assert tags["extproc.reason"] not in values, listener
                assert tags["extproc.hint"] not in values, listener

    def test_span_carries_only_the_listed_tags(self, running):
        """The doctor's tags are the listed ones, and no header value (a token, a cookie)
        is on the span."""
        ports, receiver = running
        secrets = {"authorization": f"Bearer {SECRET}", "cookie": f"session={SECRET}"}
        for listener, port in ports.items():
            path = unique("/refused", listener)
            get(port, path, secrets)
            tags = span_of(receiver, path).tags
            ours = {tag for tag in tags if tag.startswith("extproc.")}
            assert "extproc.reason" in ours and ours <= set(OURS), listener
            assert not [tag for tag, value in tags.items() if SECRET in value], listener


def hcm_tracing(listener: dict[str, Any]) -> dict[str, Any] | None:
    tracing: dict[str, Any] | None = listener["filter_chains"][0]["filters"][0]["typed_config"].get(
        "tracing"
    )
    return tracing


HBONE_SIDECAR = Proxy("web", router=False, namespace="default", labels={"app": "web"}, hbone=True)


class TestRender:
    """What each target renders for tracing, and what the Istio MERGE leaves of Istio's."""

    @pytest.mark.parametrize("mode", list(RenderMode))
    def test_istio_merge_appends_to_istio_tags(self, mode):
        """On every HCM the doctor's filters are in, Istio's tags stay and ours follow;
        the HBONE tunnel's own HCM keeps Istio's tracing untouched."""
        filters = list(
            yaml.safe_load_all(render("istio", RenderOptions(mode=mode))[f"istio/{mode}.yaml"])
        )
        for proxy in (HBONE_SIDECAR, INGRESS):
            listeners, _ = apply(filters, proxy, "istio-system", traced=True)
            built = istio_tracing(proxy)
            for listener in listeners:
                tags = hcm_tracing(listener)["custom_tags"]
                if listener["name"] == "connect_terminate":
                    assert tags == built["custom_tags"]
                else:
                    assert tags == [*built["custom_tags"], *trace_custom_tags()], listener["name"]

    def test_no_trace_tags_leaves_istio_tracing_as_built(self):
        """`--no-trace-tags`: a traced mesh's HCM tracing is Istio's own, an untraced mesh's
        HCM gets no tracing (the MERGE would create one)."""

        def placed(trace_tags: bool, traced: bool) -> list[dict[str, Any]]:
            options = RenderOptions(mode=RenderMode.ALWAYS, trace_tags=trace_tags)
            filters = list(yaml.safe_load_all(render("istio", options)["istio/always.yaml"]))
            return apply(filters, SIDECAR, "istio-system", traced=traced)[0]

        for listener in placed(trace_tags=False, traced=True):
            assert hcm_tracing(listener) == istio_tracing(SIDECAR), listener["name"]
        assert [hcm_tracing(lis) for lis in placed(trace_tags=False, traced=False)] == [None, None]
        assert None not in [hcm_tracing(lis) for lis in placed(trace_tags=True, traced=False)]

    def test_cilium_refuses_a_collector(self):
        """cilium-envoy has no tracer: naming a collector for cilium is refused, and its
        listener has no tracing."""
        options = RenderOptions(mode=RenderMode.ALWAYS, cilium_service="default/web:8080")
        assert "tracing" not in str(render("cilium", options))
        for flag in ("tracing_zipkin", "tracing_otlp"):
            with pytest.raises(RenderError, match="compiles no tracer"):
                render(
                    "cilium",
                    RenderOptions(
                        mode=RenderMode.ALWAYS,
                        cilium_service="default/web:8080",
                        **{flag: "10.0.0.9:9411"},
                    ),
                )

    def test_envoy_traces_only_with_a_collector(self):
        """The plain Envoy has no tracing block without a collector, and one tracer with one."""
        assert "tracing" not in render("envoy", RenderOptions())["envoy/gated.yaml"]
        text = render("envoy", RenderOptions(tracing_zipkin="zipkin.observability:9411"))[
            "envoy/gated.yaml"
        ]
        assert "envoy.tracers.zipkin" in text and "extproc.reason" in text
        with pytest.raises(RenderError, match="one tracer"):
            RenderOptions(tracing_zipkin="a:9411", tracing_otlp="b:4317")
        with pytest.raises(RenderError, match="--tracing-otlp"):
            RenderOptions(tracing_otlp="no-port")

    def test_command(self, capsys):
        """`render envoy --tracing-otlp` prints the tracer; `render all` with a collector skips
        cilium and says why; `--no-trace-tags` drops the tags."""
        assert run(["render", "envoy", "--tracing-otlp", "otel-collector:4317"]) == 0
        out, _ = capsys.readouterr()
        assert "envoy.tracers.opentelemetry" in out and "extproc.reason" in out
        assert run(["render", "envoy", "--tracing-otlp", "otel:4317", "--no-trace-tags"]) == 0
        out, _ = capsys.readouterr()
        assert "envoy.tracers.opentelemetry" in out and "extproc.reason" not in out
        assert (
            run(
                [
                    "render",
                    "all",
                    "--tracing-zipkin",
                    "zipkin:9411",
                    "--cilium-service",
                    "default/web:8080",
                ]
            )
            == 0
        )
        _, err = capsys.readouterr()
        assert (
            "render cilium: skipped: --tracing-zipkin/--tracing-otlp: cilium-envoy compiles no tracer"
            in err
        )


class TestAProviderlessTracingBlock:
    def test_traces_with_the_bootstrap_tracer(self):
        """Why `--no-trace-tags` exists (T36): an HCM `tracing` without a provider, what the
        Istio MERGE creates in a mesh that traces nothing, makes Envoy 1.40 trace every
        request with the bootstrap's tracer, which Istio's bootstrap has whenever ProxyConfig
        names a Zipkin address (istio/istio tools/packaging/common/envoy_bootstrap.json:1031-1045
        and pkg/bootstrap/config.go:516-520 at 86c9f01f)."""
        with ZipkinReceiver() as receiver, HttpUpstream(Ok) as upstream:
            options = RenderOptions(
                envoy_listen="127.0.0.1:0",
                upstream=f"127.0.0.1:{upstream.port}",
                tracing_zipkin=f"127.0.0.1:{receiver.port}",
            )
            bootstrap = yaml.safe_load(render("envoy", options)["envoy/gated.yaml"])
            listener = bootstrap["static_resources"]["listeners"][0]
            tracing = hcm_tracing(listener)
            assert tracing is not None
            bootstrap["tracing"] = {"http": tracing.pop("provider")}
            bootstrap["layered_runtime"] = FLUSH_EACH_SPAN
            with EnvoyProcess(bootstrap) as envoy:
                status, _ = get(envoy.listener_ports()["ingress"], "/not-meant-to-be-traced")
                span = span_of(receiver, "/not-meant-to-be-traced")
        assert status == 200
        assert span.tags["http.status_code"] == "200"


class TestDocs:
    def test_every_tag_is_documented(self):
        """The README's traces section (or the docs page it moves to) has a row per tag,
        with the metadata key it reads."""
        root = Path(__file__).parents[2]
        pages = [root / "README.md", *sorted((root / "docs").glob("**/*.md"))]
        text = "\n".join(page.read_text(encoding="utf-8") for page in pages)
        for tag, key in TRACE_TAGS:
            assert f"| `{tag}` | `{key}` |" in text, tag
