"""A closed connection is the mTLS mismatch only with proof: plaintext, and on every request."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from extproc import core
from extproc import flags as F
from extproc.closes import (
    CLOSE_WINDOW,
    MAX_CLUSTERS,
    MISMATCH_CLOSES,
    ClosedConnections,
    is_close,
)
from extproc.config import policy_from_mapping
from extproc.diagnosis import Evidence, classify
from extproc.render.monitoring import MISCONFIGURATION

CLOSED = "upstream_reset_before_response_started{connection_termination}"
OUTBOUND = "outbound|8080||ratings.default.svc.cluster.local"


def close(cluster: str = OUTBOUND, **kw: object) -> Evidence:
    """A 503 UC connection_termination, as Envoy 1.40 reports it (docs/signatures.md)."""
    return Evidence(status=503, flags=F.UC, code_details=CLOSED, cluster=cluster,
                    has_attributes=True, **kw)  # type: ignore[arg-type]  # fmt: skip


def answer(cluster: str = OUTBOUND) -> Evidence:
    return Evidence(status=200, code_details="via_upstream", cluster=cluster, has_attributes=True)


# Every way a keep-alive race can reach the catalogue: an inbound cluster (plaintext to
# the app), a transport nobody told us, a TLS cluster, a plaintext cluster that answered
# in between, a plaintext cluster with no memory.
RACES = [
    pytest.param(close("inbound|8080||"), id="inbound-unknown"),
    pytest.param(
        close("inbound|8080||", cluster_tls=False, repeated_close=True), id="inbound-plain"
    ),
    pytest.param(close("InboundPassthroughCluster"), id="inbound-passthrough"),
    pytest.param(close(), id="unknown-transport"),
    pytest.param(close(cluster_tls=True, repeated_close=True), id="tls"),
    pytest.param(close(cluster_tls=False, repeated_close=False), id="plaintext-answered-between"),
    pytest.param(close(cluster_tls=False), id="plaintext-no-memory"),
    pytest.param(Evidence(status=503, flags=F.UC, has_attributes=True), id="flag-only"),
]


class TestVerdict:
    @pytest.mark.parametrize("evidence", RACES)
    def test_keepalive_race_is_no_misconfiguration(self, evidence: Evidence) -> None:
        """A close that may be a keep-alive race gets no reason the misconfiguration alert pages on."""
        diagnosis = classify(evidence)
        assert diagnosis is not None
        assert diagnosis.reason == "upstream_connection_closed"
        assert diagnosis.reason not in MISCONFIGURATION

    def test_tls_version_proves_tls_without_admin(self) -> None:
        """Envoy's upstream.tls_version on the closed connection: TLS, the keep-alive race."""
        diagnosis = classify(close(upstream_tls_version="TLSv1.3"))
        assert diagnosis is not None
        assert diagnosis.reason == "upstream_connection_closed"
        assert ("tls", "on") in diagnosis.evidence

    def test_plaintext_every_request_is_the_mismatch(self) -> None:
        """A plaintext cluster that closed every request lately is upstream_requires_mtls."""
        diagnosis = classify(close(cluster_tls=False, repeated_close=True))
        assert diagnosis is not None
        assert diagnosis.reason == "upstream_requires_mtls"
        assert ("tls", "off") in diagnosis.evidence


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TestClosedConnections:
    def test_second_close_in_a_row_is_repeated(self) -> None:
        """The first close is no proof; the MISMATCH_CLOSES-th in a row is."""
        memory = ClosedConnections()
        seen = [memory.observe(close()).repeated_close for _ in range(MISMATCH_CLOSES + 1)]
        assert seen == [False] * (MISMATCH_CLOSES - 1) + [True, True]

    def test_an_answer_ends_the_run(self) -> None:
        """An answer from the cluster between two closes: a race, not a mismatch."""
        memory = ClosedConnections()
        memory.observe(close())
        memory.observe(answer())
        assert memory.observe(close()).repeated_close is False

    def test_another_cluster_does_not_count(self) -> None:
        """Closes are counted per cluster."""
        memory = ClosedConnections()
        memory.observe(close("outbound|8080||a"))
        assert memory.observe(close("outbound|8080||b")).repeated_close is False

    def test_window_restarts_the_run(self) -> None:
        """Two closes further apart than CLOSE_WINDOW are no run."""
        clock = FakeClock()
        memory = ClosedConnections(clock=clock)
        memory.observe(close())
        clock.now += CLOSE_WINDOW + 1
        assert memory.observe(close()).repeated_close is False

    def test_other_failures_and_nameless_clusters_pass_through(self) -> None:
        """Only a close on a named cluster is counted; the rest is left as it is."""
        memory = ClosedConnections()
        refused = Evidence(status=503, flags=F.UF, cluster=OUTBOUND, has_attributes=True)
        assert memory.observe(refused) is refused
        assert memory.observe(close("")).repeated_close is None
        assert not memory.watching

    def test_hostile_cluster_names_stay_bounded(self) -> None:
        """A peer naming 8x MAX_CLUSTERS clusters leaves at most MAX_CLUSTERS, the newest."""
        memory = ClosedConnections()
        for n in range(8 * MAX_CLUSTERS):
            memory.closed(f"c{n}")
        assert len(memory) == MAX_CLUSTERS
        assert memory.closed(f"c{8 * MAX_CLUSTERS - 1}") == 2
        assert memory.closed("c0") == 1

    def test_recently_touched_cluster_survives_eviction(self) -> None:
        """Least recently touched goes first: a cluster closing again stays."""
        memory = ClosedConnections(max_clusters=2)
        memory.closed("a")
        memory.closed("b")
        memory.closed("a")
        memory.closed("c")
        assert memory.closed("a") == 3

    def test_is_close_reads_envoy_strings(self) -> None:
        """UC with connection_termination is a close; UC with another reset is not."""
        assert is_close(close())
        overflow = Evidence(
            status=503, flags=F.UC, code_details="upstream_reset_before_response_started{overflow}"
        )
        assert not is_close(overflow)


class FakeClusterTls:
    """The cluster TLS source with a real memory and a fixed transport."""

    def __init__(self, tls: bool) -> None:
        self.closes = ClosedConnections()
        self.tls = tls

    def enrich(self, ev: Evidence) -> Evidence:
        return self.closes.observe(replace(ev, cluster_tls=self.tls))

    @property
    def watching(self) -> bool:
        return self.closes.watching

    def answered(self, cluster: str) -> None:
        self.closes.answered(cluster)


class Attributes:
    def __init__(self, values: dict[str, object]) -> None:
        self.values = values

    def number(self, key: str, limit: int) -> int | None:
        value = self.values.get(key)
        return value if isinstance(value, int) and 0 <= value <= limit else None

    def text(self, key: str) -> str:
        value = self.values.get(key, "")
        return str(value)


POLICY = policy_from_mapping({}, source="<test>")


def phase(source: FakeClusterTls, status: int, flags: int, details: str) -> str | None:
    attributes = Attributes({"response.code": status, "response.flags": flags,
                             "response.code_details": details, "xds.cluster_name": OUTBOUND})  # fmt: skip
    outcome = core.response_phase(
        POLICY, {":status": str(status).encode()}, attributes, core.NOTHING_CARRIED,
        cluster_tls=source,
    )  # fmt: skip
    return None if outcome is None or outcome.diagnosis is None else outcome.diagnosis.reason


class TestResponsePhase:
    def test_clean_answers_between_closes_keep_it_a_race(self) -> None:
        """Close, answer, close on a plaintext cluster: never the mismatch."""
        source = FakeClusterTls(tls=False)
        reasons = [phase(source, *step) for step in
                   [(503, F.UC, CLOSED), (200, 0, "via_upstream"), (503, F.UC, CLOSED)]]  # fmt: skip
        assert reasons == ["upstream_connection_closed", None, "upstream_connection_closed"]

    def test_every_request_closed_is_the_mismatch(self) -> None:
        """Two closes in a row on a plaintext cluster: upstream_requires_mtls."""
        source = FakeClusterTls(tls=False)
        reasons = [phase(source, 503, F.UC, CLOSED) for _ in itertools.repeat(None, 2)]
        assert reasons == ["upstream_connection_closed", "upstream_requires_mtls"]
