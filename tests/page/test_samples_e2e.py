"""A failure's sample on the live page, through a real Envoy 1.40 and the rendered filters.

Over gRPC in always mode one stream holds both phases, so the server reads the sample's
request fields from the request headers it saw. Over the HTTP lane the response is
diagnosed in a POST that never saw the request: in always mode the request phase (a
separate POST) carries them in our metadata namespace, only while the page is on; in
gated mode the diagnose filter, created for failing responses alone, asks Envoy for them
as attributes (`filter_config.SAMPLE_ATTRIBUTES`), over gRPC as over HTTP. Each way,
the page's /api/failures shows method, path without its query, request id and trace id,
and never the query, a cookie or a credential.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from extproc.config import policy_from_mapping
from extproc.failures import Failures
from extproc.http_lane import HttpLane, HttpProcessor
from extproc.lab import BackgroundServer, EnvoyProcess, HttpUpstream
from extproc.page import Page
from extproc.render import RenderMode, RenderOptions, render
from extproc.server import ExtProcServer
from tests.deploy.test_gated_e2e import Gated, StatusByPath

pytestmark = pytest.mark.envoy

POLICY = policy_from_mapping({"response_annotations": "on"})
SECRETS = ("s3cret-query", "s3cret-param", "c00kie", "b3arer")
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
WAYS = [
    (RenderMode.ALWAYS, "grpc"),
    (RenderMode.ALWAYS, "http"),
    (RenderMode.GATED, "http"),
    (RenderMode.GATED, "grpc"),
]


class StatusByPathAndQuery(StatusByPath):
    """Answers GET /<status>?... or /<status>;... with that status (the rest is ignored)."""

    def do_GET(self) -> None:
        self.path = self.path.split("?", 1)[0].split(";", 1)[0]
        super().do_GET()


class Lane(Gated):
    mode: RenderMode
    transport: str
    page: Page


@pytest.fixture(scope="module", params=WAYS, ids=[f"{m}-{t}" for m, t in WAYS])
def lane(request) -> Iterator[Lane]:
    """The rendered Envoy, the real server (gRPC or the HTTP lane) and the page (on)."""
    mode, transport = request.param
    page = Page(Failures(), "127.0.0.1:0")
    server = (
        HttpLane(HttpProcessor(POLICY), "127.0.0.1:0") if transport == "http"
        else ExtProcServer(POLICY, "127.0.0.1:0")
    )  # fmt: skip
    with (
        HttpUpstream(StatusByPathAndQuery) as upstream,
        BackgroundServer(server, page=page) as running,
    ):
        options = RenderOptions(
            mode=mode, transport=transport, policy=POLICY,
            extproc_address=f"127.0.0.1:{running.port}", envoy_listen="127.0.0.1:0",
            upstream=f"127.0.0.1:{upstream.port}",
        )  # fmt: skip
        name = f"envoy/{mode}.yaml" if transport == "grpc" else f"envoy/{mode}-{transport}.yaml"
        with EnvoyProcess(yaml.safe_load(render("envoy", options)[name])) as envoy:
            lane = Lane(envoy, None)  # type: ignore[arg-type]
            lane.mode, lane.transport, lane.page = mode, transport, page
            yield lane


def page_failures(page: Page) -> tuple[bytes, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", page.port, timeout=10)
    try:
        conn.request("GET", "/api/failures")
        body = conn.getresponse().read()
    finally:
        conn.close()
    return body, json.loads(body)


def samples(table: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for r in table["rows"] for s in r["samples"]]


class TestSamples:
    def test_a_sample_has_its_request(self, lane):
        """A failure's sample has the method, the path without its query or parameters,
        the request id and the trace id; no query, cookie or credential reaches the page."""
        headers = {"Host": "shop.example", "x-request-id": "req-page-1",
                   "traceparent": f"00-{TRACE}-00f067aa0ba902b7-01",
                   "cookie": "session=c00kie", "authorization": "Bearer b3arer"}  # fmt: skip
        status, _, _ = lane.get("/503;jsessionid=s3cret-param?token=s3cret-query", headers)
        assert status == 503
        body, table = page_failures(lane.page)
        (sample,) = [s for s in samples(table) if s["request_id"] == "req-page-1"]
        assert (sample["method"], sample["path"], sample["trace_id"], sample["status"]) == (
            "GET", "/503", TRACE, 503,
        )  # fmt: skip
        assert sample["host"] == "shop.example"
        assert not [s for s in SECRETS if s.encode() in body]

    def test_b3_trace_id_without_traceparent(self, lane):
        """Without traceparent the B3 trace id is kept, lowercased (Envoy leaves the absent
        traceparent out of a gated filter's attributes)."""
        status, _, _ = lane.get("/503", {"x-request-id": "req-page-b3",
                                         "x-b3-traceid": TRACE[:16].upper()})  # fmt: skip
        assert status == 503
        _, table = page_failures(lane.page)
        (sample,) = [s for s in samples(table) if s["request_id"] == "req-page-b3"]
        assert sample["trace_id"] == TRACE[:16]

    def test_undecodable_request_id_keeps_the_page_working(self, lane):
        """A request id with a byte that is not UTF-8 (Envoy passes obs-text on) still makes
        a sample and the page's JSON: from the request headers, or as a gated gRPC filter's
        attribute (`extproc.wire`), it becomes U+FFFD; as a gated HTTP-lane filter's
        attribute Envoy 1.40's JSON has already replaced the bytes itself."""
        status, _, _ = lane.get("/503", {"x-request-id": "r\xe9q-page-2"})
        assert status == 503
        _, table = page_failures(lane.page)
        ids = [s["request_id"] for s in samples(table)]
        (sent,) = [i for i in ids if i.startswith("r") and i.endswith("-page-2")]
        assert "\xe9" not in sent
        if lane.mode is RenderMode.ALWAYS or lane.transport == "grpc":
            assert sent == "r\ufffdq-page-2"
