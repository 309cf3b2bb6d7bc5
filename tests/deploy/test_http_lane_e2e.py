"""The rendered `--transport http` bootstraps, run by a real Envoy with the real HTTP lane.

Over `http_service` the two phases are separate POSTs: what the response phase needs
from the request phase (the actions, the rewritten Host, the direction) must travel in
our metadata namespace and come back through the response filter's
`forwarding_namespaces`. These tests prove it end to end: a Host rewritten at request
time still shows in x-extproc-actions on the response, and a diagnosis names the Host.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from extproc import http_lane
from extproc.config import policy_from_mapping
from extproc.http_lane import HttpLane, HttpProcessor
from extproc.lab import BackgroundServer, EnvoyProcess, HttpUpstream
from extproc.render import RenderMode, RenderOptions, render

from .test_gated_e2e import Gated, StatusByPath

pytestmark = pytest.mark.envoy

# The rendered Envoy is the edge, where annotations are hidden by default: show them.
POLICY = policy_from_mapping(
    {"host_rewrites": {"old.example": "new.example"}, "response_annotations": "on"}
)


class Recording(HttpProcessor):
    """The real processor, keeping the JSON bodies Envoy POSTs."""

    def __init__(self) -> None:
        super().__init__(POLICY)
        self.bodies: list[dict[str, Any]] = []

    def answer(self, body: bytes, declared: Any = None) -> bytes:
        self.bodies.append(json.loads(body))
        return super().answer(body, declared)


@pytest.fixture(scope="module", params=[RenderMode.ALWAYS, RenderMode.GATED])
def lane(request) -> Iterator[Gated]:
    processor = Recording()
    with (
        HttpUpstream(StatusByPath) as upstream,
        BackgroundServer(HttpLane(processor, "127.0.0.1:0")) as server,
    ):
        options = RenderOptions(
            mode=request.param,
            transport="http",
            policy=POLICY,  # the gate must know the Host rewrite
            extproc_address=f"127.0.0.1:{server.port}",
            envoy_listen="127.0.0.1:0",
            upstream=f"127.0.0.1:{upstream.port}",
        )
        bootstrap = yaml.safe_load(render("envoy", options)[f"envoy/{request.param}-http.yaml"])
        with EnvoyProcess(bootstrap) as envoy:
            gated = Gated(envoy, processor)  # type: ignore[arg-type]
            gated.envoy = envoy  # type: ignore[attr-defined]
            yield gated


def stats(envoy: EnvoyProcess) -> dict[str, int]:
    _, text = envoy.admin_get("/stats?filter=ext_proc")
    pairs = (line.split(": ") for line in text.splitlines() if ": " in line)
    return {name: int(value) for name, value in pairs if value.isdigit()}


class TestHttpLane:
    def test_rewritten_host_shows_in_actions_on_the_response(self, lane):
        status, headers, body = lane.get("/200", {"Host": "old.example"})
        assert status == 200
        received = {k.lower(): v for k, v in json.loads(body).items()}
        assert received["host"] == "new.example"  # the upstream got the rewrite
        assert headers["x-extproc-actions"] == 'rewrite-host;headers=":authority"'
        # It came back through metadata_context, as Envoy forwarded it.
        forwarded = [b["metadata_context"]["filter_metadata"]["extproc_doctor"]
                     for b in lane.processor.bodies if "response_headers" in b
                     and b.get("metadata_context", {}).get("filter_metadata")]  # fmt: skip
        assert {"actions": 'rewrite-host;headers=":authority"', "request_host": "new.example",
                "direction": "edge"} in forwarded  # fmt: skip

    def test_failure_is_diagnosed_with_the_host(self, lane):
        status, headers, _ = lane.get("/503", {"Host": "shop.example"})
        assert status == 503
        assert headers["x-extproc-diagnosis"].startswith("upstream_app_error;status=503")
        assert ';host="shop.example"' in headers["x-extproc-diagnosis"]

    def test_a_failure_the_hygiene_gate_also_matched_counts_once(self, lane):
        """A 503 to a request that needed hygiene: one diagnosis counted, actions kept."""
        registry = lane.processor.metrics.registry
        labels = {"reason": "upstream_app_error"}
        before = registry.get_sample_value("extproc_diagnoses_total", labels) or 0.0
        status, headers, _ = lane.get("/503", {"x-envoy-attempt-count": "3"})
        assert status == 503
        assert headers["x-extproc-diagnosis"].startswith("upstream_app_error;status=503")
        assert "strip-echoed-envoy-headers" in headers["x-extproc-actions"]
        assert registry.get_sample_value("extproc_diagnoses_total", labels) == before + 1

    def test_no_reply_is_lost(self, lane):
        """Two single-phase filters: Envoy never waits out a message timeout (design.md)."""
        for _ in range(3):
            assert lane.get("/200")[0] == 200
        counters = stats(lane.envoy)
        assert not any(v for k, v in counters.items() if k.endswith("message_timeouts"))
        assert not any(v for k, v in counters.items() if k.endswith("http_not_ok_resp_received"))

    def test_direction_travels_as_a_header(self, lane, monkeypatch):
        """The rendered filters say where they sit in a header of each POST."""
        seen = []
        original = http_lane.HttpProcessor.answer

        def spy(self, body, declared=None):
            seen.append(declared)
            return original(self, body, declared)

        monkeypatch.setattr(http_lane.HttpProcessor, "answer", spy)
        lane.get("/503")
        assert seen and all(str(d) == "edge" for d in seen)


def test_demo_runs_over_http():
    """`extproc demo --transport http`: the mesh lab's incidents diagnose the same over the lane."""
    import io

    from extproc.lab.demo import run_demo
    from extproc.lab.scenarios import find_scenarios

    out = io.StringIO()
    code = run_demo(stay=False, out=out, scenarios=find_scenarios("4"), transport="http")
    assert code == 0, out.getvalue()
    assert "upstream_requires_mtls" in out.getvalue()
