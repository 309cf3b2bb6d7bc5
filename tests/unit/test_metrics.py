"""The hot path's plain counts reach Prometheus as prometheus-client itself would count them."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest

from extproc.metrics import MESSAGE_KINDS, Metrics

# Durations around every bucket bound (on it, just under, just over), tiny, huge, zero.
_BOUNDS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 50e-3)
durations = st.one_of(
    st.sampled_from([0.0, *_BOUNDS, *(b * (1 - 1e-12) for b in _BOUNDS), 10.0]),
    st.floats(min_value=0, max_value=1.0, allow_nan=False),
)


def _histogram_lines(registry: CollectorRegistry, name: str) -> list[str]:
    """The exposition lines of one family's buckets, count and sum, without timestamps."""
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines()
            if line.startswith(name) and "_created" not in line]  # fmt: skip


class TestFlush:
    """`Metrics.flush` moves the plain counts into the families, exactly."""

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from(MESSAGE_KINDS), durations), max_size=40),
           st.integers(min_value=0, max_value=40))  # fmt: skip
    def test_buckets_and_sums_match_prometheus_clients_own_observe(self, observed, flush_at):
        """The same durations observed by prometheus-client and tallied then flushed (once in
        the middle, once at scrape) expose the same buckets, counts and sums."""
        metrics = Metrics()
        twin = CollectorRegistry()
        oracle = Histogram("extproc_processing_seconds", "oracle", ["kind", "transport"],
                           buckets=_BOUNDS, registry=twin)  # fmt: skip
        for kind in MESSAGE_KINDS:  # bound up front, as ours are
            oracle.labels(kind, "grpc")
        for i, (kind, elapsed) in enumerate(observed):
            if i == flush_at:
                metrics.flush()
            metrics.tallies["grpc"][kind].observe(elapsed)
            oracle.labels(kind, "grpc").observe(elapsed)
        ours = _histogram_lines(metrics.registry, "extproc_processing_seconds")
        theirs = _histogram_lines(twin, "extproc_processing_seconds")
        ours = [line for line in ours if 'transport="grpc"' in line and not line.startswith("#")]
        theirs = [line for line in theirs if not line.startswith("#")]
        assert sorted(_rounded(ours)) == sorted(_rounded(theirs))

    def test_messages_total_counts_each_observed_message(self):
        """extproc_messages_total is the tallied count, per kind and transport."""
        metrics = Metrics()
        for _ in range(3):
            metrics.tallies["http"]["response_headers"].observe(1e-4)
        value = metrics.registry.get_sample_value(
            "extproc_messages_total", {"kind": "response_headers", "transport": "http"}
        )
        assert value == 3.0
        assert metrics.tallies["http"]["response_headers"].count == 3

    def test_streams_opened_and_active(self):
        """Opened streams add up across flushes; the active gauge shows the count now."""
        metrics = Metrics()
        metrics.stream_count.opened += 2
        metrics.stream_count.active += 2
        metrics.flush()
        metrics.stream_count.opened += 1
        metrics.stream_count.active -= 1
        assert metrics.registry.get_sample_value("extproc_streams_total") == 3.0
        assert metrics.registry.get_sample_value("extproc_streams_active") == 1.0

    def test_a_flush_from_another_thread_loses_nothing(self):
        """Scrapes on prometheus-client's thread while the loop counts: the totals agree."""
        metrics = Metrics()
        tally = metrics.tallies["grpc"]["request_headers"]
        done = threading.Event()

        def scrape() -> None:
            while not done.is_set():
                metrics.flush()

        scraper = threading.Thread(target=scrape)
        scraper.start()
        try:
            for _ in range(20_000):
                tally.observe(3e-5)
        finally:
            done.set()
            scraper.join()
        labels = {"kind": "request_headers", "transport": "grpc"}
        assert metrics.registry.get_sample_value("extproc_messages_total", labels) == 20_000
        count = metrics.registry.get_sample_value("extproc_processing_seconds_count", labels)
        assert count == 20_000


def _rounded(lines: list[str]) -> list[str]:
    """Sums differ in the last float bits (one sum of many against many small adds)."""
    out = []
    for line in lines:
        name, _, value = line.rpartition(" ")
        out.append(f"{name} {float(value):.9g}")
    return out
