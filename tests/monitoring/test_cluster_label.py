"""The opt-in cluster label on the diagnoses counter, and its hard bound."""

from __future__ import annotations

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from extproc.cli import DEFAULT_CLUSTER_LABEL_LIMIT, ConfigError, build_parser, serve_config
from extproc.diagnosis import Diagnosis
from extproc.metrics import MAX_CLUSTER_LABEL_LIMIT, Metrics


def diagnosis(reason: str, cluster: str | None) -> Diagnosis:
    evidence = (("status", 503), ("cluster", cluster)) if cluster is not None else ()
    return Diagnosis(reason, "hint", evidence)


def samples(metrics: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Sample labels -> value, read back through the text format Prometheus scrapes."""
    text = generate_latest(metrics.registry).decode()
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


class TestClusterLabel:
    def test_off_by_default(self):
        """Without the option the counter has the reason label only."""
        metrics = Metrics()
        metrics.count_response(diagnosis("no_route", "outbound|80||a"))
        assert samples(metrics, "extproc_diagnoses_total")[(("reason", "no_route"),)] == 1
        assert samples(metrics, "extproc_diagnoses_clusters_folded_total") == {}

    def test_first_clusters_keep_their_names_the_rest_fold_into_other(self):
        """With a limit of 2, the third and fourth distinct clusters count as `other`, and as folded."""
        metrics = Metrics(cluster_label_limit=2)
        for cluster in ("a", "b", "a", "c", "d", "b"):
            metrics.count_response(diagnosis("upstream_refused", cluster))
        got = samples(metrics, "extproc_diagnoses_total")
        assert got == {
            (("cluster", "a"), ("reason", "upstream_refused")): 2,
            (("cluster", "b"), ("reason", "upstream_refused")): 2,
            (("cluster", "other"), ("reason", "upstream_refused")): 2,
        }
        assert samples(metrics, "extproc_diagnoses_clusters_folded_total") == {(): 2}

    def test_bound_holds_for_many_clusters(self):
        """Ten thousand distinct clusters make at most limit + 1 cluster values."""
        metrics = Metrics(cluster_label_limit=5)
        for i in range(10_000):
            metrics.count_response(diagnosis("upstream_reset", f"outbound|80||svc-{i}"))
        clusters = {dict(k)["cluster"] for k in samples(metrics, "extproc_diagnoses_total")}
        assert len(clusters) == 6 and "other" in clusters
        assert samples(metrics, "extproc_diagnoses_clusters_folded_total") == {(): 9_995}

    def test_no_cluster_in_the_evidence(self):
        """A diagnosis without a cluster (no attributes) counts under an empty cluster."""
        metrics = Metrics(cluster_label_limit=1)
        metrics.count_response(diagnosis("upstream_failure", None))
        assert samples(metrics, "extproc_diagnoses_total") == {
            (("cluster", ""), ("reason", "upstream_failure")): 1
        }

    def test_limit_out_of_range_is_refused(self):
        """The limit is hard: above MAX_CLUSTER_LABEL_LIMIT the Metrics refuse it."""
        with pytest.raises(ValueError, match="cluster label limit"):
            Metrics(cluster_label_limit=MAX_CLUSTER_LABEL_LIMIT + 1)


class TestCommandLine:
    def test_flag_alone_uses_the_default_limit(self):
        """`--metrics-cluster-label` without a number turns it on with the default limit."""
        args = build_parser().parse_args(["serve", "--metrics-cluster-label"])
        assert serve_config(args).metrics_cluster_label == DEFAULT_CLUSTER_LABEL_LIMIT

    def test_off_unless_asked(self):
        """Without the flag the label is off."""
        assert serve_config(build_parser().parse_args(["serve"])).metrics_cluster_label == 0

    @pytest.mark.parametrize("value", ["0", str(MAX_CLUSTER_LABEL_LIMIT + 1)])
    def test_bad_limit_is_refused_naming_the_flag(self, value):
        """A limit outside 1..MAX is a ConfigError (exit 2) before the server starts, naming the flag."""
        args = build_parser().parse_args(["serve", "--metrics-cluster-label", value])
        with pytest.raises(ConfigError, match="--metrics-cluster-label must be 1 to"):
            serve_config(args)
