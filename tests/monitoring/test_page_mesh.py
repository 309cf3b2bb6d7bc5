"""The live page's mesh-wide view: Debian's Prometheus scraping two `extproc serve` replicas.

Each replica diagnoses its own failures (sent over gRPC as Envoy 1.40 sends them); the
page asks Prometheus for the rendered recording rule and shows the sum over the
replicas, beside the replica's own table. Prometheus is the oracle: the view must equal
the two replicas' values added, evaluated at the same instant.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc import mesh_view
from extproc.lab import free_port
from extproc.mesh_view import MeshView, MeshViewError, parse_vector
from extproc.render import monitoring
from tests.conftest import REFUSED_MESH, request_headers, response_headers
from tests.reliability.conftest import ServerProcess

from .prometheus import Prometheus

CLUSTER = REFUSED_MESH["xds.cluster_name"]


def fail(port: int, times: int) -> None:
    """`times` refused-upstream failures through one replica's gRPC door."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        for _ in range(times):
            messages = [request_headers([(":path", "/"), (":method", "GET")]),
                        response_headers([(":status", "503")], REFUSED_MESH)]  # fmt: skip
            list(stub.Process(iter(messages), timeout=10))


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[list[ServerProcess], Prometheus, int]]:
    """Two replicas with metrics (the first with the page and --ui-prometheus), and Prometheus."""
    prom_port = free_port()
    ui_port = free_port()
    servers, jobs = [], {}
    for name in ("a", "b"):
        metrics = free_port()
        server = ServerProcess(free_port(), tmp_path / f"{name}.log")
        server.args = ("--metrics-listen", f"127.0.0.1:{metrics}", "--metrics-cluster-label", "5")
        if name == "a":
            server.args += ("--ui-listen", f"127.0.0.1:{ui_port}",
                            "--ui-prometheus", f"http://127.0.0.1:{prom_port}")  # fmt: skip
        servers.append(server)
        jobs[f"extproc-doctor-{name}"] = (
            f"127.0.0.1:{metrics}",
            "/metrics",
            {"namespace": "doctor"},
        )
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    try:
        for server in servers:
            server.start()
        prom = Prometheus(workdir, jobs, monitoring.rule_groups(alert_for="1s"))
        prom.port, prom.url = prom_port, f"http://127.0.0.1:{prom_port}"
        with prom:
            yield servers, prom, ui_port
    finally:
        for server in servers:
            server.close()


def value(result: list[dict], cluster: str) -> float:
    return sum(float(s["value"][1]) for s in result if s["metric"].get("cluster") == cluster)


class TestMeshView:
    def test_rule_names_are_the_rendered_ones(self):
        """The view queries the recording rules `render monitoring` writes, by their names."""
        recorded = dict(monitoring.RECORDING_RULES)
        assert mesh_view.DIAGNOSES == monitoring.DIAGNOSES and mesh_view.DIAGNOSES in recorded
        assert mesh_view.DIAGNOSES_1H == monitoring.DIAGNOSES_1H

    def test_bad_answers_are_refused(self):
        """An answer that is not a success vector is an error naming the problem."""
        with pytest.raises(MeshViewError, match="no JSON"):
            parse_vector(b"<html>")
        with pytest.raises(MeshViewError, match="an error: bad"):
            parse_vector(b'{"status": "error", "error": "bad"}')
        with pytest.raises(MeshViewError, match="no instant vector"):
            parse_vector(b'{"status": "success", "data": {"resultType": "matrix", "result": []}}')

    def test_answer_capped_in_series(self):
        """At most MAX_ROWS series are kept, the highest rates first."""
        result = [{"metric": {"reason": "r", "cluster": f"c{i}"}, "value": [0, str(i)]}
                  for i in range(mesh_view.MAX_ROWS + 10)]  # fmt: skip
        body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})
        rows = parse_vector(body.encode())
        assert len(rows) == mesh_view.MAX_ROWS
        assert rows[0][1] == mesh_view.MAX_ROWS + 9

    def test_bad_url_refused(self):
        """--ui-prometheus takes http(s) URLs only."""
        with pytest.raises(MeshViewError, match="http"):
            mesh_view.prometheus_url("file:///etc/passwd")

    def test_unreachable_prometheus_keeps_the_last_view_and_says_why(self):
        """A poll that cannot reach Prometheus keeps the rows and reports the error."""
        view = MeshView(f"http://127.0.0.1:{free_port()}")
        view.rows = [{"reason": "r", "cluster": "c", "per_minute": 1.0}]
        view.poll()
        assert view.rows and "cannot reach Prometheus" in view.error

    def test_page_shows_the_sum_of_the_replicas(self, replicas):
        """With failures on both replicas, the view's rate for the cluster is the two
        replicas' rates added, at the same instant; the page serves that view."""
        (a, b), prom, ui_port = replicas
        # A counter series is born at its first failure: Prometheus must scrape it once
        # before the rest, or the rate never sees them.
        fail(a.port, 1)
        fail(b.port, 1)
        series = f'extproc_diagnoses_total{{cluster="{CLUSTER}"}}'

        def scraped(expected: str) -> bool:
            values = sorted(s["value"][1] for s in prom.query(series))
            return values == [expected, expected]

        prom.wait_for(lambda: scraped("1"), "both replicas' first failure scraped")
        fail(a.port, 3)
        fail(b.port, 3)
        prom.wait_for(lambda: scraped("4"), "both replicas' later failures scraped")
        per_job = f"sum by (job, cluster) ({mesh_view.DIAGNOSES})"
        prom.wait_for(
            lambda: len([s for s in prom.query(per_job) if float(s["value"][1]) > 0]) == 2,
            "a rate from both replicas",
        )
        at = time.time()
        view = MeshView(prom.url)
        view.poll(at)
        assert view.error == ""
        by_job = prom.api("query", query=per_job, time=f"{at:.3f}")["result"]
        rates = [float(s["value"][1]) for s in by_job if s["metric"].get("cluster") == CLUSTER]
        assert len(rates) == 2 and all(r > 0 for r in rates)
        (row,) = [r for r in view.rows if r["cluster"] == CLUSTER]
        assert row["reason"] == "upstream_refused"
        assert row["per_minute"] == pytest.approx(sum(rates) * 60)

        def served() -> dict | None:
            connection = http.client.HTTPConnection("127.0.0.1", ui_port, timeout=10)
            connection.request("GET", "/api/failures")
            mesh = json.loads(connection.getresponse().read())["mesh"]
            return mesh if mesh["at"] is not None else None

        mesh = prom.wait_for(served, "the page's first poll of Prometheus")
        assert mesh["source"] == prom.url and mesh["error"] == ""
