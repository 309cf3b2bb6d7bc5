"""The rendered rules and dashboard in a real Prometheus, fed by a real Envoy and server.

One scene, in order, because each step needs the data of the ones before it:

- the mesh lab's client sidecar (Envoy 1.40) sends its ext_proc calls to `extproc serve`
  (a separate process, `--metrics-listen`, `--metrics-cluster-label 2`, `--envoy-admin`);
- Debian's Prometheus scrapes the server's `/metrics` and Envoy's `/stats/prometheus`
  every second, with the rendered rules (every `for:` shortened to 1 s) evaluated every
  second;
- failing requests go through the Envoy (the lab's mTLS, SNI and refused-port incidents)
  together with a request whose headers the policy strips; one ProcessingRequest with no
  kind goes straight to the server, and the policy file is broken on disk;
- Prometheus then has values for the recording rules, the alerts for those are active,
  and every dashboard query parses and returns data; the fail-open alert is not active;
- the server is stopped while requests keep coming: the fail-open alert becomes active.

Nothing waits a fixed time: every step polls Prometheus's API with a generous deadline.
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.lab import MESH, Lab, find_scenarios, free_port
from extproc.render import monitoring
from tests.reliability.conftest import ServerProcess

from .prometheus import Prometheus

pytestmark = pytest.mark.envoy

# name -> (scenario, reason the doctor gives with the sidecar's admin at hand)
TRAFFIC = ("requires_mtls", "sni_missing", "refused", "echoed_headers")
DRIVEN_MISCONFIGURATIONS = ("upstream_requires_mtls", "sni_rejected")
# Grafana's variables as the test sets them: every namespace and job.
VARIABLES = {"$namespace": ".*", "$job": ".*", "$proxy_namespace": ".*", "$__rate_interval": "1m"}
LABEL_VALUES = re.compile(r"label_values\((?P<selector>.+), (?P<label>\w+)\)")


class Traffic:
    """Sends the TRAFFIC scenarios through the lab in a loop until stopped."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        scenarios = [find_scenarios(name)[0] for name in TRAFFIC]
        while not self._stop.is_set():
            for s in scenarios:
                self.lab.request(s.host, s.path, s.headers)
                self.sent += 1
            self._stop.wait(0.1)


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[tuple[Lab, ServerProcess, Prometheus, Path]]:
    """The lab, the server (serving) and Prometheus (ready), all stopped after the test."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("mode: enforce\n")
    metrics_port = free_port()
    server = ServerProcess(free_port(), tmp_path / "extproc.log")
    (tmp_path / "lab").mkdir()
    with Lab(("127.0.0.1", server.port), tmp_path / "lab", MESH) as lab:
        server.args = (
            "--config", str(policy),
            "--metrics-listen", f"127.0.0.1:{metrics_port}",
            "--metrics-cluster-label", "2",
            "--envoy-admin", lab.admin_url,
        )  # fmt: skip
        try:
            server.start()
            jobs = {
                "extproc-doctor": (f"127.0.0.1:{metrics_port}", "/metrics", {"namespace": "doctor"}),
                "envoy-stats": (
                    f"127.0.0.1:{lab.envoy.admin_port}", "/stats/prometheus", {"namespace": "shop"}
                ),
            }  # fmt: skip
            workdir = tmp_path / "prometheus"
            workdir.mkdir()
            with Prometheus(workdir, jobs, monitoring.rule_groups(alert_for="1s")) as prom:
                yield lab, server, prom, policy
        finally:
            server.close()


def active(prom: Prometheus, alertname: str, **labels: str) -> list[dict[str, Any]] | None:
    """The pending or firing alerts of that name and labels, or None."""
    found = [
        a
        for a in prom.alerts()
        if a["labels"].get("alertname") == alertname
        and all(a["labels"].get(k) == v for k, v in labels.items())
        and a["state"] in ("pending", "firing")
    ]
    return found or None


def positive(prom: Prometheus, expr: str) -> list[dict[str, Any]] | None:
    """The series of `expr` whose value is a number above zero, or None."""
    series = [s for s in prom.query(expr) if float(s["value"][1]) > 0]
    return series or None


def send_bad_message(port: int) -> None:
    """One ProcessingRequest with no kind set, straight to the server."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        replies = pb_grpc.ExternalProcessorStub(channel).Process(
            iter([pb.ProcessingRequest()]), timeout=10
        )
        assert list(replies) == []


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, variables set to 'all'."""
    queries = []
    for panel in monitoring.dashboard()["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in sorted(VARIABLES.items(), key=lambda kv: -len(kv[0])):
                expr = expr.replace(name, value)
            queries.append((panel["title"], expr))
    return queries


class TestRulesInPrometheus:
    def test_alerts_recording_rules_and_dashboard(self, scene):
        """Driven failures show in the recording rules, alerts and every panel; a stopped server fails open."""
        lab, server, prom, policy = scene
        # A counter's first increase must come after its first scrape, or rate() misses it.
        prom.wait_for(lambda: len(positive(prom, "up") or ()) == 2, "both targets scraped")
        with Traffic(lab) as traffic:
            send_bad_message(server.port)
            policy.write_text("mode: sometimes\n")  # the reloader finds it within 2 s

            # Recording rules have values.
            for reason in DRIVEN_MISCONFIGURATIONS:
                prom.wait_for(
                    lambda r=reason: positive(prom, f'{monitoring.DIAGNOSES}{{reason="{r}"}}'),
                    f"{reason} in {monitoring.DIAGNOSES}",
                )
            prom.wait_for(
                lambda: positive(
                    prom, f'{monitoring.ACTIONS}{{action="strip-echoed-envoy-headers"}}'
                ),
                "strip-echoed-envoy-headers in the actions rate",
            )
            p99 = prom.wait_for(
                lambda: positive(prom, f'{monitoring.SECONDS_P99}{{kind="response_headers"}}'),
                "a p99 processing time",
            )
            assert float(p99[0]["value"][1]) < 60  # a time in seconds, not NaN or +Inf
            prom.wait_for(
                lambda: positive(prom, f'{monitoring.ERRORS}{{error="bad_message"}}'),
                "the bad message in the errors rate",
            )
            prom.wait_for(lambda: positive(prom, monitoring.STREAMS_STARTED), "Envoy's streams")

            # The cluster label is bounded: two clusters by name, the rest as `other`.
            clusters = {
                s["metric"]["cluster"]
                for s in prom.query(f"sum by (cluster) ({monitoring.DIAGNOSES})")
            }
            assert "other" in clusters and len(clusters - {"other"}) == 2, clusters
            assert positive(prom, "extproc_diagnoses_clusters_folded_total")

            # The alerts the traffic drove are pending or firing, with the reason in the labels.
            for reason in DRIVEN_MISCONFIGURATIONS:
                prom.wait_for(
                    lambda r=reason: active(prom, "ExtprocMeshMisconfiguration", reason=r),
                    f"ExtprocMeshMisconfiguration for {reason}",
                )
            prom.wait_for(
                lambda: active(prom, "ExtprocDiagnosisSurge", reason="upstream_requires_mtls"),
                "ExtprocDiagnosisSurge",
            )
            prom.wait_for(
                lambda: active(prom, "ExtprocProcessingErrors", error="bad_message"),
                "ExtprocProcessingErrors",
            )
            prom.wait_for(lambda: active(prom, "ExtprocPolicyReloadFailed"), "reload alert")
            # No app error was sent, and the server answered every stream so far.
            assert active(prom, "ExtprocMeshMisconfiguration", reason="upstream_not_tls") is None
            assert active(prom, "ExtprocFailingOpen") is None

            # Every dashboard query parses and, with this traffic, returns data.
            for title, expr in dashboard_queries():
                assert prom.query_range(expr), f"panel {title!r}: no data for {expr}"
            for variable in monitoring.dashboard()["templating"]["list"][1:]:
                m = LABEL_VALUES.fullmatch(variable["definition"].replace("$namespace", ".*"))
                assert m, variable["definition"]
                values = prom.api(f"label/{m['label']}/values", **{"match[]": m["selector"]})
                assert values, f"variable {variable['name']}: no values"

            # The server goes away; Envoy fails open and says so.
            sent_before = traffic.sent
            server.stop(signal.SIGTERM)
            prom.wait_for(lambda: active(prom, "ExtprocFailingOpen"), "ExtprocFailingOpen")
            assert traffic.sent > sent_before
