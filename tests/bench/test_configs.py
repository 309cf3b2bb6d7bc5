"""The benchmark's rows as data, and the Envoy bootstrap each one gets (no process is started)."""

from __future__ import annotations

import pytest

from bench.configs import CONFIGS, Config, Filter, Route, Server, bootstrap
from bench.runner import BEFORE_REPO, Outcome, ServerProcess, _supported
from extproc.filter_config import EXT_PROC_FILTER
from extproc.render.options import NAME

ROWS = {c.name: c for c in CONFIGS}


def manager(rendered):
    (listener,) = rendered["static_resources"]["listeners"]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def clusters(rendered):
    return {c["name"]: c for c in rendered["static_resources"]["clusters"]}


class TestRows:
    def test_each_row_says_what_it_expects(self):
        """Status, annotation and streams per request follow from the filter and the route."""
        expected = {
            "envoy": (200, False, 0), "naive": (200, False, 1), "always": (200, False, 1),
            "gated": (200, False, 0), "gated-fail": (503, True, 1), "envoy-fail": (503, False, 0),
        }  # fmt: skip
        for name, claim in expected.items():
            row = ROWS[name]
            assert (row.expected_status, row.annotated, row.streams_per_request) == claim

    def test_optional_rows_name_the_server_flags_they_need(self):
        """Worker and Unix socket rows are skipped unless `extproc serve --help` mentions them."""
        assert ROWS["always-workers2"].needs == ("--workers",)
        assert ROWS["always-unix"].needs == ("unix:",)
        assert ROWS["always-unix-workers2"].needs == ("--workers", "unix:")
        assert ROWS["always"].needs == ()
        assert ROWS["always-page"].needs == ("--ui-listen",)
        assert ROWS["gated-fail-page"].needs == ("--ui-listen",)

    def test_a_server_needs_a_filter(self):
        """A row with a server but no filter (or the reverse) is refused."""
        with pytest.raises(ValueError, match="a server goes with a filter"):
            Config("x", "x", Filter.NONE, Route.OK, Server.OURS)
        with pytest.raises(ValueError, match="only our server"):
            Config("x", "x", Filter.ALWAYS, Route.OK, Server.NAIVE, workers=2)


class TestBootstrap:
    def test_envoy_alone_has_only_the_router_and_a_direct_response(self):
        """No ext_proc filter, no ext_proc cluster, no upstream, no access log: Envoy answers itself."""
        rendered = bootstrap(ROWS["envoy"], extproc=None, refused_port=9)
        hcm = manager(rendered)
        assert [f["name"] for f in hcm["http_filters"]] == ["envoy.filters.http.router"]
        assert "access_log" not in hcm
        (route,) = hcm["route_config"]["virtual_hosts"][0]["routes"]
        assert route["direct_response"]["status"] == 200
        assert clusters(rendered) == {}

    def test_always_on_calls_the_server_on_every_request(self):
        """The rendered always-on filter (and the annotation guard after it) points at the server under test."""
        rendered = bootstrap(ROWS["always"], extproc="127.0.0.1:5005", refused_port=9)
        names = [f["name"] for f in manager(rendered)["http_filters"]]
        assert names == [
            EXT_PROC_FILTER,
            "extproc-doctor.annotation-guard",
            "envoy.filters.http.router",
        ]
        endpoint = clusters(rendered)[NAME]["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert endpoint[0]["endpoint"]["address"]["socket_address"]["port_value"] == 5005

    def test_gated_failure_routes_to_the_refused_port(self):
        """The failing gated row keeps the rendered matchers and sends the request to a dead port."""
        rendered = bootstrap(ROWS["gated-fail"], extproc="127.0.0.1:5005", refused_port=9)
        names = [f["name"] for f in manager(rendered)["http_filters"]]
        assert "extproc-doctor.diagnose" in names
        upstream = clusters(rendered)["upstream"]["load_assignment"]["endpoints"][0]
        assert (
            upstream["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] == 9
        )

    def test_unix_sockets_become_pipe_endpoints(self):
        """Each worker's socket is one `pipe` endpoint of the ext_proc cluster."""
        paths = ["/tmp/s.sock.0", "/tmp/s.sock.1"]
        rendered = bootstrap(
            ROWS["always-unix-workers2"], extproc="127.0.0.1:1", refused_port=9, unix_paths=paths
        )
        endpoints = clusters(rendered)[NAME]["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert [e["endpoint"]["address"]["pipe"]["path"] for e in endpoints] == paths


class TestBeforeRow:
    def test_skipped_without_a_checkout(self, monkeypatch):
        """Without BENCH_BEFORE_REPO the always-before row is skipped, and the report says why."""
        monkeypatch.delenv(BEFORE_REPO, raising=False)
        outcome = Outcome()
        assert _supported([ROWS["always-before"], ROWS["always"]], outcome) == [ROWS["always"]]
        assert BEFORE_REPO in outcome.skipped["always-before"]

    def test_runs_the_server_of_the_checkout_it_names(self, monkeypatch, tmp_path):
        """The before server is `extproc serve` imported from the named checkout."""
        monkeypatch.setenv(BEFORE_REPO, str(tmp_path))
        before = ServerProcess(Server.BEFORE, tmp_path)
        ours = ServerProcess(Server.OURS, tmp_path)
        assert before.repo == tmp_path and ours.repo != tmp_path
        assert before.command[1:][:3] == ours.command[1:][:3] == ["-m", "extproc", "serve"]
