"""The benchmark harness end to end, for a moment: it must keep working, whatever the numbers.

No timing is asserted: only that every row ran, the numbers are well formed, each row did
what it claims (streams opened or not, statuses), and the report files were written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.__main__ import main
from bench.configs import CONFIGS
from bench.runner import Settings, run

pytestmark = pytest.mark.envoy

ALWAYS_ROWS = {
    "envoy",
    "naive",
    "always",
    "gated",
    "gated-fail",
    "envoy-fail",
    "naive-http",
    "always-http",
    "always-http-fail",
    "bare-gate",
    "envoy-proxied",
    "gated-proxied",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One tiny `python -m bench` run: one round, one second at 4 connections, 0.3 s at 1."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["--rounds", "1", "--duration", "1", "--latency-duration", "0.3",
            "--connections", "4", "--warmup", "0", "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out, json.loads((out / "latest.json").read_text())


class TestHarness:
    def test_every_row_ran(self, report):
        """The always-available rows and both direct gRPC rows are in the report."""
        _, data = report
        assert {r["name"] for r in data["rows"]} >= ALWAYS_ROWS
        assert {r["name"] for r in data["direct"]} == {"grpc-naive", "grpc-ours"}
        optional = {c.name for c in CONFIGS} - ALWAYS_ROWS
        assert {r["name"] for r in data["rows"]} | set(data["skipped"]) >= optional

    def test_numbers_are_well_formed(self, report):
        """Each row has a positive rate, ordered percentiles, and no load generator errors."""
        _, data = report
        for row in data["rows"] + data["direct"]:
            assert row["rps"] > 0, row
            assert 0 < row["p50_1_ms"] <= row["p99_1_ms"], row
            assert 0 < row["p50_n_ms"] <= row["p99_n_ms"], row
        assert all(s["load"]["errors"] == 0 for s in data["samples"])

    def test_streams_match_each_rows_claim(self, report):
        """Always-on and failing gated rows open streams and cost CPU; clean gated and Envoy alone open none."""
        _, data = report
        rows = {r["name"]: r for r in data["rows"]}
        for name in ("naive", "always", "gated-fail", "naive-http", "always-http",
                     "always-http-fail"):  # fmt: skip
            assert rows[name]["streams_per_request"] > 0
            assert rows[name]["cpu_us_per_stream"] > 0
            assert rows[name]["cpu_us_per_message"] > 0
            assert rows[name]["peak_rss_mib"] > 0
        # Over HTTP each phase is its own POST: two calls per request.
        assert rows["always-http"]["streams_per_request"] == pytest.approx(2, abs=0.1)
        for name in ("envoy", "gated", "envoy-fail", "bare-gate", "envoy-proxied",
                     "gated-proxied"):  # fmt: skip
            assert rows[name]["streams_per_request"] == 0
            assert rows[name]["cpu_us_per_stream"] is None

    def test_markdown_report_names_its_command_and_every_row(self, report):
        """latest.md starts with the command and has a line for each row and each target."""
        out, data = report
        text = (out / "latest.md").read_text()
        assert text.startswith("Command: `python -m bench --rounds 1")
        for row in data["rows"] + data["direct"]:
            assert f"| {row['title']} |" in text
        assert len(data["targets"]) == 11
        assert all(f"| {t['name']} |" in text for t in data["targets"])
        assert "![the table as a chart](latest.svg)" in text
        svg = (out / "latest.svg").read_text()
        assert svg.startswith("<svg") and all(row["title"] in svg for row in data["rows"])


class TestPythonFallback:
    def test_fallback_generator_measures_and_sees_statuses(self):
        """With --tool python, both runs use the Python generator, which sees 200s and 503s."""
        configs = [c for c in CONFIGS if c.name in ("envoy", "envoy-fail")]
        settings = Settings(rounds=1, duration=0.3, latency_duration=0.3, connections=2,
                            warmup=0, tool="python")  # fmt: skip
        outcome = run(configs, [], settings)
        assert set(outcome.tools.values()) == {"python (--tool python)"}
        statuses = {(s.config, s.connections): s.load.statuses for s in outcome.samples}
        assert set(statuses) == {("envoy", 2), ("envoy", 1), ("envoy-fail", 2), ("envoy-fail", 1)}
        for (config, _), seen in statuses.items():
            assert set(seen) == ({"2xx"} if config == "envoy" else {"5xx"})
        assert all(s.load.requests > 0 and s.load.p50_ms <= s.load.p99_ms for s in outcome.samples)


class TestAdapterCost:
    def test_adapter_costs_are_reported(self, report):
        """The report carries the adapter's CPU per stream, clean and failing, with and without metrics."""
        out, data = report
        costs = data["adapter_cpu_us_per_stream"]
        assert set(costs) == {"clean", "clean_with_metrics", "failing", "failing_with_metrics"}
        assert all(value > 0 for value in costs.values())
        assert "The adapter alone, no gRPC" in (out / "latest.md").read_text()
