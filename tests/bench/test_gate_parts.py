"""bench/gate_parts.py: its rows are the rendered gate's parts (no process is started)."""

from __future__ import annotations

from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

from bench.configs import CONFIGS, Route, bootstrap
from bench.gate_parts import PARTS, configs
from extproc.render.envoy_config import typed


def filters(rendered):
    (listener,) = rendered["static_resources"]["listeners"]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]


def test_rendered_part_is_what_the_gated_row_renders():
    """The `rendered` part puts before the router exactly what `ours, gated` does."""
    (part,) = [c for c in configs(["rendered"], [Route.OK]) if c.name == "rendered"]
    (gated,) = [c for c in CONFIGS if c.name == "gated"]
    mine = filters(bootstrap(part, extproc=None, refused_port=9))
    theirs = filters(bootstrap(gated, extproc="127.0.0.1:1", refused_port=9))
    assert mine == theirs


def test_every_part_is_a_valid_bootstrap_on_both_routes():
    """Each part types as an Envoy Bootstrap; the single composite never runs proxied."""
    rows = configs(list(PARTS), [Route.OK, Route.PROXIED])
    names = {c.name for c in rows}
    assert "one-composite-proxied" not in names and "one-composite" in names
    for row in rows:
        rendered = bootstrap(row, extproc=None, refused_port=9, upstream_port=10)
        assert typed(Bootstrap, rendered)["static_resources"]["listeners"]
        assert filters(rendered)[-1]["name"] == "envoy.filters.http.router"
