"""Tests for the lab's description: validation, the Istio-like configs it builds, the table."""

from __future__ import annotations

import pytest

from extproc.cli import ConfigError, build_parser
from extproc.filter_config import EXT_PROC_FILTER
from extproc.lab import MESH, SCENARIOS, Destination, Mode, Route, Topology, Workload
from extproc.lab.scenarios import find_scenarios
from extproc.lab.topology import (
    ISTIO_ALPN,
    MeshCerts,
    RouteFilter,
    client_bootstrap,
    inbound_listener,
    outbound,
    server_bootstrap,
)


def addresses(topology: Topology) -> dict[str, int]:
    names = [w.name for w in topology.workloads] + [a.value for a in topology.apps] + ["nowhere"]
    return {name: 20000 + i for i, name in enumerate(names)}


def tls_chain(listener: dict) -> dict:
    return next(
        c
        for c in listener["filter_chains"]
        if c["filter_chain_match"]["transport_protocol"] == "tls"
    )


class TestDescription:
    def test_unknown_target_is_named(self):
        """A destination aimed at nothing the lab runs fails with its cluster and target."""
        with pytest.raises(ValueError, match=r"destination 'c': unknown target 'ghost'"):
            Topology(workloads=(), destinations=(Destination("c", "ghost"),), routes=())

    def test_unknown_cluster_is_named(self):
        """A route to an undeclared cluster fails with its Host and cluster."""
        with pytest.raises(ValueError, match=r"route for 'a.demo': unknown cluster 'c'"):
            Topology(workloads=(), destinations=(), routes=(Route("a.demo", "c"),))

    def test_istio_cluster_names(self):
        """outbound() spells clusters the way Istio does."""
        assert outbound("app", subset="v2") == "outbound|8080|v2|app.default.svc.cluster.local"


class TestInboundListener:
    def listener(self, tmp_path, workload: Workload) -> dict:
        cert = MeshCerts(tmp_path).get(workload.identity, workload.cert)
        return inbound_listener(workload, 15006, cert)

    def test_strict(self, tmp_path):
        """STRICT: tls_inspector, one TLS chain matching Istio's ALPN tokens, client certs required."""
        listener = self.listener(tmp_path, Workload("app"))
        assert listener["listener_filters"][0]["name"] == "envoy.filters.listener.tls_inspector"
        [chain] = listener["filter_chains"]
        assert chain["filter_chain_match"] == {
            "transport_protocol": "tls",
            "application_protocols": list(ISTIO_ALPN),
        }
        assert chain["transport_socket"]["typed_config"]["require_client_certificate"] is True

    def test_permissive_adds_a_plaintext_chain(self, tmp_path):
        """PERMISSIVE: the TLS chain plus a raw_buffer chain to the same app."""
        listener = self.listener(tmp_path, Workload("app", mode=Mode.PERMISSIVE))
        matches = [c["filter_chain_match"]["transport_protocol"] for c in listener["filter_chains"]]
        assert matches == ["tls", "raw_buffer"]

    def test_front_door_matches_by_sni_only(self, tmp_path):
        """With server_names the only chain matches by SNI, and no client cert is asked for."""
        workload = Workload("pay", mode=Mode.TLS, server_names=("pay.example.net",))
        chain = tls_chain(self.listener(tmp_path, workload))
        assert chain["filter_chain_match"]["server_names"] == ["pay.example.net"]
        assert chain["transport_socket"]["typed_config"]["require_client_certificate"] is False


class TestMeshBootstraps:
    def test_client_clusters_carry_the_destination_rule(self, tmp_path):
        """Subset clusters keep Istio's names and the istio.config metadata naming the rule."""
        config = client_bootstrap(
            MESH, addresses(MESH), MeshCerts(tmp_path), ("127.0.0.1", 1), tmp_path / "log"
        )
        clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
        v2 = clusters[outbound("reviews", subset="v2")]
        assert v2["metadata"]["filter_metadata"]["istio"]["config"].endswith(
            "/namespaces/default/destination-rule/reviews"
        )
        assert "transport_socket" not in v2
        assert "transport_socket" in clusters[outbound("reviews", subset="v1")]
        assert clusters["PassthroughCluster"]["type"] == "ORIGINAL_DST"

    def test_one_server_listener_per_workload(self, tmp_path):
        """The server-side Envoy has an inbound listener for each workload."""
        config = server_bootstrap(MESH, addresses(MESH), MeshCerts(tmp_path))
        names = [listener["name"] for listener in config["static_resources"]["listeners"]]
        assert names == [f"inbound_{w.name}" for w in MESH.workloads]


class TestScenarioTable:
    def test_every_incident_is_there(self):
        """Incidents 1 to 10 each have at least one scenario, and names are unique."""
        assert {s.incident for s in SCENARIOS if s.incident} == set(range(1, 11))
        assert len({s.name for s in SCENARIOS}) == len(SCENARIOS)

    def test_find_by_number_and_by_name(self):
        """An incident number gives all its variants; a name gives one scenario."""
        assert [s.name for s in find_scenarios("4")] == ["subset_plaintext", "subset_mtls"]
        assert [s.name for s in find_scenarios("not_tls")] == ["not_tls"]

    def test_unknown_label_lists_the_choices(self):
        """An unknown label fails naming what exists."""
        with pytest.raises(KeyError, match=r"no scenario '11'; choose one of: 1, 2"):
            find_scenarios("11")


class TestDemoCommand:
    def test_list(self, capsys):
        """`extproc demo --list` prints every scenario with its label and expected reason, and exits 0."""
        args = build_parser().parse_args(["demo", "--list"])
        assert args.func(args) == 0
        out = capsys.readouterr().out
        for s in SCENARIOS:
            assert s.name in out
        assert "alpn_mismatch" in out

    def test_unknown_scenario(self):
        """`--scenario 11` fails naming the choices, before starting anything."""
        args = build_parser().parse_args(["demo", "--scenario", "11"])
        with pytest.raises(ConfigError, match=r"no scenario '11'; choose one of: 1, 2"):
            args.func(args)


class TestRouteFilters:
    def test_ext_authz_needs_its_service(self):
        """A route with ext_authz in a lab without the authz app fails naming the app."""
        with pytest.raises(ValueError, match=r"ext_authz on a route needs the app 'authz-deny'"):
            Topology(
                workloads=(),
                destinations=(Destination("echo", "echo"),),
                routes=(Route("a.demo", "echo", filters=(RouteFilter.EXT_AUTHZ,)),),
            )

    def test_filters_follow_ext_proc(self, tmp_path):
        """The client chain is ext_proc, the annotation guard, the route filters in use, the router."""
        config = client_bootstrap(
            MESH, addresses(MESH), MeshCerts(tmp_path), ("127.0.0.1", 1), tmp_path / "log"
        )
        [listener] = config["static_resources"]["listeners"]
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        assert [f["name"] for f in manager["http_filters"]] == [
            EXT_PROC_FILTER,
            "extproc-doctor.annotation-guard",
            "envoy.filters.http.cors",
            "envoy.filters.http.local_ratelimit",
            "envoy.filters.http.ext_authz",
            "envoy.filters.http.fault",
            "envoy.filters.http.rbac",
            "envoy.filters.http.router",
        ]
