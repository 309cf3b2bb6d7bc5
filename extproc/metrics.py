"""Prometheus metrics, on their own registry, with the labelled children bound up front.

What every message touches (`extproc_messages_total`, `extproc_processing_seconds`,
`extproc_streams_total`, `extproc_streams_active`) is counted in plain numbers (`Tally`,
`StreamCount`): prometheus-client takes a lock per `inc()` and two per `observe()`, some
36,000 interpreter instructions per clean gRPC stream (bench/README.md), more than the
rest of the metrics' work together. `Metrics.flush` moves them into the families: at every
scrape (a collector registered first), and every `FLUSH_SECONDS` (`extproc.process`),
which is what `--workers` needs: its parent reads each worker's values from files, never
its memory. Everything else a message may count is rare (an action, a diagnosis, an error)
and calls `inc()` on a pre-bound child: no label lookups, no allocation per message. Reason and action labels come from the catalogue and the rule
table, so their number is bounded. The opt-in `cluster` label on the diagnoses counter
comes from Envoy's config, not from the catalogue, so it is bounded here: the first
`cluster_label_limit` distinct clusters keep their name, later ones are counted as
`other` (and in `extproc_diagnoses_clusters_folded_total`).
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.registry import Collector

from extproc.admission import CLOSINGS, REFUSALS
from extproc.diagnosis import HINTS, Diagnosis
from extproc.headers import RULES, Applied

MESSAGE_KINDS = (
    "request_headers",
    "response_headers",
    "request_body",
    "response_body",
    "request_trailers",
    "response_trailers",
)
TRANSPORTS = ("grpc", "http")
# Errors an adapter counts: bad_message (no kind set), processing_failed (answered with a
# plain continue), unknown_flags (a diagnosed response with flag bits this version does
# not know); the HTTP lane adds what its envelope can get wrong, and each of its limits
# (extproc/http_lane.py): a refused peer is counted, never only logged.
ERRORS = (
    "bad_message",
    "processing_failed",
    "unknown_flags",
    "bad_json",
    "too_large",
    "bad_request",
    "timeout",
    "uri_too_long",
    "headers_too_large",
    "upgrade_refused",
    "too_many_connections",
    "overloaded",
)
# Processing one message takes microseconds; the buckets resolve that and show outliers.
_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 50e-3)
# How often the plain counts reach the families besides each scrape (for --workers).
FLUSH_SECONDS = 1.0
# The cluster label's value for every cluster past the limit.
OTHER_CLUSTER = "other"
# The most distinct cluster names `--metrics-cluster-label` may keep, per server process.
MAX_CLUSTER_LABEL_LIMIT = 1000
# Envoy's cluster names are config, not client input, but a long one still costs memory in
# every series it labels.
_CLUSTER_CHARS = 200


def _action_tokens() -> list[str]:
    tokens = [f"strip-{rule.subject}" for rule in RULES]
    return [
        *tokens,
        "rewrite-underscore-headers",
        "refuse-protected-rewrite",
        "rewrite-host",
        "strip-host-port",
        "invalid-host",
        # A wrong reveal token (extproc.core.REFUSED_REVEAL): someone guessing it.
        "refuse-reveal-token",
    ]


class Tally:
    """One (kind, transport)'s answered messages as plain numbers: their summed seconds, and
    per bucket of `_BUCKETS` (the last one: slower than all) how many took that long."""

    __slots__ = ("buckets", "seconds")

    def __init__(self) -> None:
        self.buckets = [0] * (len(_BUCKETS) + 1)
        self.seconds = 0.0

    @property
    def count(self) -> int:
        return sum(self.buckets)

    def observe(self, elapsed: float) -> None:
        """One message answered in `elapsed` seconds (`Histogram.observe`'s bucket: le)."""
        self.seconds += elapsed
        self.buckets[bisect_left(_BUCKETS, elapsed)] += 1


class StreamCount:
    """gRPC streams as plain numbers: opened ever, and open now."""

    __slots__ = ("active", "opened")

    def __init__(self) -> None:
        self.opened = 0
        self.active = 0


class _Flush(Collector):
    """Registered first, so each scrape sees the plain counts: it flushes, yields nothing."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        self.metrics.flush()
        return iter(())


class Metrics:
    """The server's metrics. One instance per server; tests read `registry` (and
    call `flush()` first, as a scrape does)."""

    def __init__(self, cluster_label_limit: int = 0) -> None:
        """`cluster_label_limit` > 0 adds the `cluster` label to the diagnoses counter."""
        if not 0 <= cluster_label_limit <= MAX_CLUSTER_LABEL_LIMIT:
            raise ValueError(
                f"the cluster label limit must be 0 (off) to {MAX_CLUSTER_LABEL_LIMIT}, "
                f"got {cluster_label_limit}"
            )
        self.cluster_label_limit = cluster_label_limit
        self.registry = CollectorRegistry()
        r = self.registry
        self._flush_lock = threading.Lock()  # a scrape's thread and the loop's timer
        r.register(_Flush(self))
        self.stream_count = StreamCount()
        self._streams_flushed = 0
        self._streams = Counter(
            "extproc_streams", "ext_proc streams opened (one per HTTP request)", registry=r
        )
        self._active_streams = Gauge(
            "extproc_streams_active",
            "ext_proc streams open now",
            registry=r,
            multiprocess_mode="livesum",  # summed over live workers under --workers
        )
        refused = Counter(
            "extproc_streams_refused",
            "gRPC streams refused at once, by the limit that refused them",
            ["limit"],
            registry=r,
        )
        self.streams_refused = {limit: refused.labels(limit) for limit in REFUSALS}
        closed = Counter(
            "extproc_streams_closed",
            "gRPC streams the server closed, by the limit that closed them (a deadline, or "
            "a place taken at capacity)",
            ["limit"],
            registry=r,
        )
        self.streams_closed = {limit: closed.labels(limit) for limit in CLOSINGS}
        messages = Counter(
            "extproc_messages",
            "ProcessingRequest messages by kind and transport (grpc, http)",
            ["kind", "transport"],
            registry=r,
        )
        seconds = Histogram(
            "extproc_processing_seconds",
            "time to answer one message, from parse to response, by kind and transport",
            ["kind", "transport"],
            buckets=_BUCKETS,
            registry=r,
        )
        # The hot path's plain counts per transport and kind, each with the children it
        # is flushed into and the bucket counts flushed so far.
        self.tallies = {t: {kind: Tally() for kind in MESSAGE_KINDS} for t in TRANSPORTS}
        self._flushed = [
            (tally, messages.labels(kind, t), seconds.labels(kind, t), Tally())
            for t, tallies in self.tallies.items()
            for kind, tally in tallies.items()
        ]
        self._init_diagnoses()
        actions = Counter(
            "extproc_actions",
            "request changes by rule; report=true when only reported",
            ["action", "report"],
            registry=r,
        )
        self._action_family = actions
        self.actions = {
            (token, report): actions.labels(token, "true" if report else "false")
            for token in _action_tokens()
            for report in (False, True)
        }
        errors = Counter(
            "extproc_errors",
            "messages that could not be processed, by kind of error and transport",
            ["error", "transport"],
            registry=r,
        )
        self.errors_by_transport = {t: {e: errors.labels(e, t) for e in ERRORS} for t in TRANSPORTS}
        self.errors = self.errors_by_transport["grpc"]
        reloads = Counter(
            "extproc_policy_reloads", "policy reloads by result", ["result"], registry=r
        )
        self.reloads = {result: reloads.labels(result) for result in ("ok", "error")}
        # The live page (extproc/page.py): rows its fixed table evicted, event-stream
        # clients refused at the cap, and slow clients dropped to a resync.
        self.page_rows_evicted = Counter(
            "extproc_page_rows_evicted",
            "failure rows the live page evicted (least recently seen) at its row cap",
            registry=r,
        )
        page_clients = Counter(
            "extproc_page_clients",
            "live page event-stream clients by outcome (refused at the cap, resynced when slow)",
            ["outcome"],
            registry=r,
        )
        self.page_clients = {o: page_clients.labels(o) for o in ("refused", "resynced")}

    def flush(self) -> None:
        """Move what the plain counts gained since the last flush into the families.

        Only the loop's thread writes the counts; this may run on a scrape's thread, so it
        reads each number once and keeps what it flushed (never resets what it read)."""
        with self._flush_lock:
            for tally, messages, seconds, flushed in self._flushed:
                buckets = list(tally.buckets)
                added = [now - before for now, before in zip(buckets, flushed.buckets, strict=True)]
                if not any(added):
                    continue
                total, elapsed = tally.seconds, flushed.seconds
                messages.inc(sum(added))
                _observed(seconds, added, total - elapsed)
                flushed.buckets, flushed.seconds = buckets, total
            opened = self.stream_count.opened
            self._streams.inc(opened - self._streams_flushed)
            self._streams_flushed = opened
            self._active_streams.set(self.stream_count.active)

    def count_request(self, applied: Iterable[Applied]) -> None:
        """What the request phase did (one per rule that acted)."""
        for entry in applied:
            self.count_action(entry.token, entry.report)

    def count_response(self, diagnosis: Diagnosis | None, transport: str = "grpc") -> None:
        """What the response phase found."""
        if diagnosis is None:
            return
        self._count_diagnosis(diagnosis)
        if any(key == "unknown_flags" for key, _ in diagnosis.evidence):
            self.errors_by_transport[transport]["unknown_flags"].inc()

    def _init_diagnoses(self) -> None:
        r = self.registry
        if not self.cluster_label_limit:
            diagnoses = Counter(
                "extproc_diagnoses",
                "failing responses diagnosed, by reason",
                ["reason"],
                registry=r,
            )
            self.diagnoses = {reason: diagnoses.labels(reason) for reason in HINTS}
            return
        self._diagnoses_by_cluster = Counter(
            "extproc_diagnoses",
            "failing responses diagnosed, by reason and upstream cluster",
            ["reason", "cluster"],
            registry=r,
        )
        # (reason, cluster label) -> child; the clusters seen so far, in order, up to the limit.
        self._cluster_children: dict[tuple[str, str], Any] = {}
        self._clusters: set[str] = set()
        self.clusters_folded = Counter(
            "extproc_diagnoses_clusters_folded",
            'diagnoses counted under cluster="other" because the cluster label limit was reached',
            registry=r,
        )

    def _count_diagnosis(self, diagnosis: Diagnosis) -> None:
        if not self.cluster_label_limit:
            self.diagnoses[diagnosis.reason].inc()
            return
        cluster = next((str(v) for k, v in diagnosis.evidence if k == "cluster"), "")
        cluster = cluster[:_CLUSTER_CHARS]
        if cluster not in self._clusters:
            if len(self._clusters) < self.cluster_label_limit:
                self._clusters.add(cluster)
            else:
                cluster = OTHER_CLUSTER
                self.clusters_folded.inc()
        key = (diagnosis.reason, cluster)
        child = self._cluster_children.get(key)
        if child is None:
            child = self._cluster_children[key] = self._diagnoses_by_cluster.labels(*key)
        child.inc()

    def count_action(self, token: str, report: bool) -> None:
        child = self.actions.get((token, report))
        if child is None:  # a token the table above does not know yet
            child = self._action_family.labels(token, "true" if report else "false")
            self.actions[(token, report)] = child
        child.inc()

    def serve(self, listen: str) -> None:
        """Expose /metrics over HTTP on HOST:PORT."""
        host, _, port = listen.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)  # noqa: S104


def _observed(histogram: Any, added: list[int], seconds: float) -> None:
    """Add bucket counts and their summed seconds to a prometheus-client Histogram child,
    as as many `observe()` calls would (tests/unit/test_metrics.py holds it to that)."""
    histogram._sum.inc(seconds)
    for bucket, count in zip(histogram._buckets, added, strict=True):
        if count:
            bucket.inc(count)
