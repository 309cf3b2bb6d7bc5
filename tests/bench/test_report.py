"""Medians, same-round ratios and target verdicts, from made-up samples (no load is generated)."""

from __future__ import annotations

import json

import pytest

from bench.loadgen import LoadResult
from bench.report import Target, as_json, markdown, summarize, targets
from bench.runner import Outcome, Sample

TITLES = {
    "envoy": "Envoy alone",
    "naive": "naive",
    "always": "ours, always-on",
    "gated": "ours, gated",
    "gated-fail": "ours, gated, failing",
    "envoy-fail": "Envoy alone, failing",
}
META = {
    "command": "make bench",
    "date": "2026-11-21 12:00 UTC",
    "machine": "2 CPUs",
    "envoy": "1.40.0",
    "python": "3.11",
    "commit": "abc1234",
    "settings": {"rounds": 3, "duration": 5.0, "latency_duration": 3.0, "connections": 64},
}


def sample(name: str, round_: int, connections: int, rps: float, p50: float, streams: int = 0):
    load = LoadResult("wrk", connections, 1.0, int(rps), p50, p50 * 2)
    return Sample(name, round_, connections, load, cpu_seconds=streams * 1e-4, streams=streams)


def outcome() -> Outcome:
    """Three rounds; in round 2 the whole machine is slower, which same-round ratios ignore."""
    result = Outcome(tools={"throughput": "wrk", "latency": "h2load"})
    speed = {0: 1.0, 1: 1.0, 2: 0.5}
    base = {
        "envoy": (60000, 0.03, 0), "naive": (3000, 0.7, 1), "always": (3600, 0.6, 1),
        "gated": (54000, 0.04, 0), "gated-fail": (2500, 1.4, 1), "envoy-fail": (20000, 0.2, 0),
    }  # fmt: skip
    for round_, factor in speed.items():
        for name, (rps, p50, per_request) in base.items():
            n = int(rps * factor)
            result.samples.append(sample(name, round_, 64, n, p50 * 10, n * per_request))
            result.samples.append(sample(name, round_, 1, n / 10, p50 + round_ * 0.01))
    result.peak_rss_kib = {"always": 51200}
    return result


class TestSummarize:
    def test_rows_follow_the_titles_and_take_medians(self):
        """One row per titled configuration, in order, with medians over the rounds."""
        rows = summarize(outcome(), TITLES, 64, ("envoy", "naive"))
        assert [r.name for r in rows] == list(TITLES)
        always = rows[2]
        assert always.rps == 3600
        assert always.p50_1_ms == pytest.approx(0.61)
        assert always.p50_1_ms <= always.p99_1_ms

    def test_ratios_pair_rows_of_the_same_round(self):
        """A round where every row was slower gives the same ratio as the others."""
        rows = {r.name: r for r in summarize(outcome(), TITLES, 64, ("envoy", "naive"))}
        assert rows["gated"].vs_envoy == pytest.approx(0.9)
        assert rows["always"].vs_naive == pytest.approx(1.2)
        assert rows["envoy"].vs_envoy == pytest.approx(1.0)

    def test_streams_cpu_and_rss(self):
        """Streams per request, CPU per stream and RSS come through; absent ones are None."""
        rows = {r.name: r for r in summarize(outcome(), TITLES, 64, ("envoy", "naive"))}
        assert rows["always"].streams_per_request == pytest.approx(1.0)
        assert rows["always"].cpu_us_per_stream == pytest.approx(100)
        assert rows["always"].peak_rss_mib == 50
        assert rows["gated"].cpu_us_per_stream is None
        assert rows["gated"].peak_rss_mib is None

    def test_without_a_reference_there_is_no_ratio(self):
        """Direct rows have no Envoy row: that ratio is None, not an error."""
        rows = summarize(outcome(), {"always": "x"}, 64, (None, "naive"))
        assert rows[0].vs_envoy is None
        assert rows[0].vs_naive == pytest.approx(1.2)


class TestTargets:
    def test_each_target_is_judged(self):
        """Gated and always-on throughput are met, the diagnosis latency is missed by its gap."""
        samples = outcome().samples
        found = {
            t.name: t
            for t in targets(summarize(outcome(), TITLES, 64, ("envoy", "naive")), samples)
        }
        assert len(found) == 5
        verdicts = {name.split(":")[0]: t.verdict() for name, t in found.items()}
        assert verdicts["gated, clean traffic"] == "met"
        assert verdicts["grpc always-on"] == "met"  # 1.2x the naive servicer, bar 1.0x
        assert verdicts["a diagnosis"] == "missed by 0.20 ms"

    def test_lower_is_better_targets(self):
        """A value under a lower-is-better bar is met; above it, the gap is named."""
        assert Target("x", 0.4, 1.0, False, " ms").met
        assert Target("x", 1.5, 1.0, False, " ms").verdict() == "missed by 0.50 ms"


class TestOutput:
    def test_markdown_has_the_command_the_table_and_the_targets(self):
        """The report starts with its command and has one table line per row and per target."""
        result = outcome()
        rows = summarize(result, TITLES, 64, ("envoy", "naive"))
        text = markdown(rows, [], targets(rows, result.samples), result, META)
        assert text.startswith("Command: `make bench`")
        assert "| ours, always-on | 3,600 | 0.06 | 1.20x |" in text
        assert text.count("\n| ") == 1 + len(TITLES) + 1 + 5

    def test_json_round_trips_with_every_sample(self):
        """The JSON document is serializable and keeps every raw sample."""
        result = outcome()
        rows = summarize(result, TITLES, 64, ("envoy", "naive"))
        data = json.loads(
            json.dumps(as_json(rows, [], targets(rows, result.samples), result, META))
        )
        assert len(data["samples"]) == len(result.samples)
        assert data["rows"][0]["name"] == "envoy"
        assert {t["met"] for t in data["targets"]} == {True, False}
