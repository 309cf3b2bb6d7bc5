"""The configurations the benchmark compares, as data, and the Envoy bootstrap of each.

Every Envoy configuration starts from the standalone bootstrap that `extproc render envoy`
produces, so the benchmark measures what users deploy; then it is re-pointed for the
bench: the listener on a free loopback port, the ext_proc cluster at the server under
test, the access log removed (it would measure Envoy's log writing, the same in every
row), and the route either answered by Envoy itself (a direct 200, so no upstream is
the bottleneck) or sent to a port where nothing listens (Envoy's refused-upstream 503).
"Envoy alone" is the same bootstrap without the doctor's filters.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from extproc.filter_config import GRPC, HTTP, ext_proc_filter, ext_proc_pipe_cluster
from extproc.render import RenderMode, RenderOptions
from extproc.render.envoy_bootstrap import LISTENER, UPSTREAM_CLUSTER, render_bootstrap
from extproc.render.envoy_config import gated_filter, http_connection_manager
from extproc.render.gate import HeaderTest, Phase
from extproc.render.options import NAME

__all__ = ["CONFIGS", "DIRECT", "LISTENER", "Config", "Direct", "Filter", "Route", "Server"]


class Server(enum.StrEnum):
    """Which ext_proc server a configuration runs."""

    NAIVE = "naive"  # bench/naive_servicer.py: continues everything
    NAIVE_HTTP = "naive-http"  # bench/naive_http.py: the same over http_service
    OURS = "ours"  # extproc serve, default policy
    # extproc serve from another checkout (BENCH_BEFORE_REPO): the code before a change,
    # measured in the same rounds as the code after it.
    BEFORE = "before"


class Filter(enum.StrEnum):
    """How Envoy calls the server."""

    NONE = "none"  # Envoy alone
    ALWAYS = "always"  # every request: `extproc render envoy --mode always`
    GATED = "gated"  # only what the matchers pick: `--mode gated`
    BARE_GATE = "bare-gate"  # one composite, one `:status` matcher: the least a gate costs


class Route(enum.StrEnum):
    """What answers the request."""

    OK = "ok"  # Envoy's direct response, 200
    REFUSED = "refused"  # an upstream port where nothing listens: Envoy's 503, flag UF
    PROXIED = "proxied"  # a second Envoy answers 200: client Envoy -> upstream, as a sidecar


@dataclass(frozen=True, slots=True)
class Config:
    """One row of the table: an Envoy, maybe a server, and the traffic it gets."""

    name: str
    title: str
    filter: Filter
    route: Route
    server: Server | None = None
    # `extproc serve --workers N`, and whether it listens on a Unix socket (Envoy: `pipe`).
    workers: int = 1
    unix_socket: bool = False
    # How Envoy calls the server: gRPC, or the HTTP lane (two single-phase filters).
    transport: str = GRPC
    # A serverless gate's HTTP filters (before the router), given the ext_proc cluster's
    # name; None: `bare_gate`. bench/gate_parts.py measures the rendered gate's parts so.
    gate: Callable[[str], list[dict[str, Any]]] | None = None
    # `extproc serve --ui-listen`: the live page on, recording every diagnosis.
    page: bool = False

    def __post_init__(self) -> None:
        serverless = (Filter.NONE, Filter.BARE_GATE)
        if (self.server is None) != (self.filter in serverless):
            raise ValueError(f"{self.name}: a server goes with a filter, and only then")
        if (self.workers > 1 or self.unix_socket or self.page) and self.server is not Server.OURS:
            raise ValueError(f"{self.name}: only our server has workers, Unix sockets, a page")

    @property
    def needs(self) -> tuple[str, ...]:
        """What `extproc serve --help` must mention for this row to run."""
        return (
            ("--workers",) * (self.workers > 1)
            + ("unix:",) * self.unix_socket
            + ("--ui-listen",) * self.page
        )

    @property
    def expected_status(self) -> int:
        return 503 if self.route is Route.REFUSED else 200

    @property
    def annotated(self) -> bool:
        """Whether each response should carry x-extproc-diagnosis (the server ran on it)."""
        return self.server is Server.OURS and self.route is Route.REFUSED

    @property
    def streams_per_request(self) -> int:
        """Calls Envoy makes to the server per request (upstream requests of its cluster):
        a gRPC stream, or one POST per phase over HTTP."""
        if self.filter is Filter.ALWAYS:
            return 2 if self.transport == HTTP else 1
        if self.filter is Filter.GATED and self.route is Route.REFUSED:
            return 1
        return 0

    @property
    def messages_per_stream(self) -> int:
        """ProcessingRequest messages in one call: both phases in a gRPC stream of an
        always-on filter, one in a response-only stream or in a POST."""
        return 2 if self.filter is Filter.ALWAYS and self.transport == GRPC else 1


@dataclass(frozen=True, slots=True)
class Direct:
    """A row of the direct gRPC table: a server loaded by bench/grpc_load.py, no Envoy."""

    name: str
    title: str
    server: Server


CONFIGS: tuple[Config, ...] = (
    Config("envoy", "Envoy alone", Filter.NONE, Route.OK),
    Config("naive", "naive servicer, always-on", Filter.ALWAYS, Route.OK, Server.NAIVE),
    Config("always", "ours, always-on", Filter.ALWAYS, Route.OK, Server.OURS),
    Config("always-before", "ours from BENCH_BEFORE_REPO, always-on", Filter.ALWAYS, Route.OK,
           Server.BEFORE),
    Config("naive-http", "naive HTTP server, always-on (http_service)", Filter.ALWAYS, Route.OK,
           Server.NAIVE_HTTP, transport=HTTP),
    Config("always-http", "ours over HTTP, always-on", Filter.ALWAYS, Route.OK, Server.OURS,
           transport=HTTP),
    # Over the HTTP lane the page costs a clean request one thing: the request phase carries
    # the sample's fields in our metadata namespace instead of the prebuilt continue.
    Config("always-http-page", "ours over HTTP, always-on, live page on", Filter.ALWAYS,
           Route.OK, Server.OURS, transport=HTTP, page=True),
    Config("always-http-fail", "ours over HTTP, always-on, refused upstream", Filter.ALWAYS,
           Route.REFUSED, Server.OURS, transport=HTTP),
    Config("bare-gate", "a bare gate (one composite, one :status matcher)", Filter.BARE_GATE,
           Route.OK),
    Config("gated", "ours, gated, clean traffic", Filter.GATED, Route.OK, Server.OURS),
    Config("gated-fail", "ours, gated, refused upstream", Filter.GATED, Route.REFUSED, Server.OURS),
    Config("envoy-fail", "Envoy alone, refused upstream", Filter.NONE, Route.REFUSED),
    Config("envoy-proxied", "Envoy alone, proxied to an upstream Envoy", Filter.NONE,
           Route.PROXIED),
    Config("gated-proxied", "ours, gated, proxied to an upstream Envoy", Filter.GATED,
           Route.PROXIED, Server.OURS),
    # The live page on and off side by side: a clean request pays nothing for it, a failure
    # one O(1) record (bench/page_memory.py measures its memory).
    Config("always-page", "ours, always-on, live page on", Filter.ALWAYS, Route.OK, Server.OURS,
           page=True),
    Config("gated-fail-page", "ours, gated, refused upstream, live page on", Filter.GATED,
           Route.REFUSED, Server.OURS, page=True),
    Config(
        "always-workers2", "ours, always-on, --workers 2", Filter.ALWAYS, Route.OK, Server.OURS,
        workers=2,
    ),
    Config(
        "always-unix", "ours, always-on, Unix socket", Filter.ALWAYS, Route.OK, Server.OURS,
        unix_socket=True,
    ),
    Config(
        "always-unix-workers2", "ours, always-on, Unix socket, --workers 2", Filter.ALWAYS,
        Route.OK, Server.OURS, workers=2, unix_socket=True,
    ),
)  # fmt: skip

DIRECT: tuple[Direct, ...] = (
    Direct("grpc-naive", "naive servicer, direct gRPC", Server.NAIVE),
    Direct("grpc-ours", "ours, direct gRPC", Server.OURS),
)


def bootstrap(
    config: Config,
    *,
    extproc: str | None,
    refused_port: int,
    unix_paths: Sequence[str] = (),
    upstream_port: int | None = None,
) -> dict[str, Any]:
    """The Envoy bootstrap of `config`.

    `extproc` is the server's HOST:PORT (None: no server); `unix_paths`, if any, replace it
    with `ext_proc_pipe_cluster`: one `pipe` endpoint per socket (a worker each), which
    Envoy balances streams over. `upstream_port`: the upstream Envoy of a proxied row.
    """
    mode = RenderMode.GATED if config.filter is Filter.GATED else RenderMode.ALWAYS
    options = RenderOptions(
        mode=mode,
        extproc_address=extproc or "127.0.0.1:1",
        envoy_listen="127.0.0.1:0",
        upstream=f"127.0.0.1:{upstream_port or refused_port}",
        transport=config.transport,
    )
    rendered = render_bootstrap(options)
    manager = _connection_manager(rendered)
    manager.pop("access_log", None)
    if config.filter is Filter.NONE:
        manager["http_filters"] = manager["http_filters"][-1:]  # the router only
        _drop_cluster(rendered, NAME)
    if config.filter is Filter.BARE_GATE:
        filters = config.gate(NAME) if config.gate else [bare_gate(NAME)]
        manager["http_filters"] = [*filters, manager["http_filters"][-1]]
    if config.route is Route.OK:
        (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
        del route["route"]
        route["direct_response"] = {"status": 200, "body": {"inline_string": "ok"}}
        _drop_cluster(rendered, UPSTREAM_CLUSTER)
    if unix_paths:
        _drop_cluster(rendered, NAME)
        rendered["static_resources"]["clusters"].append(ext_proc_pipe_cluster(NAME, unix_paths))
    return rendered


def bare_gate(cluster: str) -> dict[str, Any]:
    """The least a gate costs: one composite whose one matcher tests `:status` for a 5xx,
    creating a response-only ext_proc filter when it matches (never, on clean traffic)."""
    condition = (HeaderTest(Phase.RESPONSE, ":status", "5[0-9][0-9]"),)
    diagnose = ext_proc_filter(cluster, request_headers=False, direction="edge")
    return gated_filter("bench.bare-gate", (condition,), [diagnose])


def upstream_bootstrap() -> dict[str, Any]:
    """The upstream of a proxied row: an Envoy answering 200 itself, as an app would."""
    route = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
    }
    manager = http_connection_manager(
        "upstream",
        [],
        route_config={"virtual_hosts": [{"name": "app", "domains": ["*"], "routes": [route]}]},
    )
    listener = {
        "name": "upstream",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [manager]}],
    }
    return {"static_resources": {"listeners": [listener]}}


def _connection_manager(bootstrap: dict[str, Any]) -> dict[str, Any]:
    (listener,) = bootstrap["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (manager,) = chain["filters"]
    typed_config: dict[str, Any] = manager["typed_config"]
    return typed_config


def _drop_cluster(bootstrap: dict[str, Any], name: str) -> None:
    resources = bootstrap["static_resources"]
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] != name]
