"""`python -m bench.gate_parts`: the rendered gate taken apart, each part its own Envoy, side by side.

Every row is serverless (clean traffic never calls the server): a gate built from
`extproc.render.envoy_config` and `extproc.render.gate`, with one part added, removed or
swapped, so the table says what each part costs against Envoy alone on the same route.
The rows run through bench.runner (alternating rounds, medians, per-round ratios).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from bench.configs import Config, Filter, Route
from bench.loadgen import run_wrk
from bench.runner import _CLOCK_TICKS, Deployment, Settings, _cpu_ticks, deployed, rotated
from extproc.config import Direction, Policy
from extproc.filter_config import annotation_guard_filter, ext_proc_filter, ext_proc_filters
from extproc.headers import native_removals
from extproc.render.envoy_config import doctor_filters, gated_filter
from extproc.render.gate import RESPONSE_CONDITIONS, Condition, HeaderTest, Phase, request_gate
from extproc.render.options import RenderMode

Filters = Callable[[str], list[dict[str, Any]]]


def _requests() -> tuple[Condition, ...]:
    return request_gate(Policy(), Direction.EDGE).conditions


def _responses() -> tuple[Condition, ...]:
    return tuple(condition for _, condition in RESPONSE_CONDITIONS)


def _hygiene(cluster: str, conditions: tuple[Condition, ...]) -> dict[str, Any]:
    return gated_filter("hygiene", conditions, ext_proc_filters(cluster, direction="edge"))


def _diagnose(cluster: str, conditions: tuple[Condition, ...]) -> dict[str, Any]:
    diagnose = ext_proc_filter(cluster, request_headers=False, direction="edge")
    return gated_filter("diagnose", conditions, [diagnose])


def _cheap(value_match: dict[str, Any]) -> dict[str, Any]:
    """A fixed status as `exact`, `5[0-9][0-9]` as `prefix: "5"`. (`.*` stays: xds's
    StringMatcher refuses an empty prefix, and Envoy runs no matcher on an absent header.)"""
    regex = value_match.get("safe_regex", {}).get("regex")
    if regex == "5[0-9][0-9]":
        return {"prefix": "5"}
    if regex is not None and regex.isdigit():
        return {"exact": regex}
    return value_match


def _swapped(node: Any, swap: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    if isinstance(node, dict):
        return {k: swap(v) if k == "value_match" else _swapped(v, swap) for k, v in node.items()}
    if isinstance(node, list):
        return [_swapped(v, swap) for v in node]
    return node


def cheap(build: Filters) -> Filters:
    return lambda cluster: _swapped(copy.deepcopy(build(cluster)), _cheap)


def _edge_guard() -> dict[str, Any]:
    """The guard as rendered at the edge: its request side removes what the policy strips there."""
    return annotation_guard_filter(native_removals(Policy(), Direction.EDGE))


def rendered(cluster: str) -> list[dict[str, Any]]:
    """What `extproc render envoy --mode gated` puts before the router: both gates and the guard."""
    gate = request_gate(Policy(), Direction.EDGE)
    doctor = doctor_filters(RenderMode.GATED, cluster, gate, Direction.EDGE)
    return [*doctor, _edge_guard()]


def _one(cluster: str, *conditions: Condition) -> list[dict[str, Any]]:
    return [_diagnose(cluster, conditions)]


STATUS_5XX = (HeaderTest(Phase.RESPONSE, ":status", "5[0-9][0-9]"),)

# name: (what it is, its filters, whether it can run on the proxied route). A proxied
# request carries x-envoy-expected-rq-timeout-ms at response time, which a single
# composite with request tests would match there (why the rendered gate has two).
PARTS: dict[str, tuple[str, Filters, bool]] = {
    "bare": ("bare gate: 1 composite, :status regex 5[0-9][0-9]",
             lambda c: _one(c, STATUS_5XX), True),
    "bare-prefix": ("bare gate, :status prefix \"5\"",
                    cheap(lambda c: _one(c, STATUS_5XX)), True),
    "diagnose": ("the diagnose gate alone (3 response conditions, regex)",
                 lambda c: [_diagnose(c, _responses())], True),
    "diagnose-cheap": ("the diagnose gate alone, prefix/exact",
                       cheap(lambda c: [_diagnose(c, _responses())]), True),
    "hygiene1": ("a hygiene gate with 1 request predicate",
                 lambda c: [_hygiene(c, _requests()[:1])], True),
    "hygiene": (f"the hygiene gate alone ({len(_requests())} request predicates, regex .*)",
                lambda c: [_hygiene(c, _requests())], True),
    "guard": ("the annotation guard alone (header_mutation), as rendered at the edge",
              lambda c: [_edge_guard()], True),
    "guard-responses": ("the guard's response side alone (no request removals)",
                        lambda c: [annotation_guard_filter(())], True),
    "two-gates": ("hygiene + diagnose, no guard (regex)",
                  lambda c: rendered(c)[:2], True),
    "two-gates-cheap": ("hygiene + diagnose, no guard, prefix/exact",
                        cheap(lambda c: rendered(c)[:2]), True),
    "rendered": ("as rendered: hygiene + diagnose + guard", rendered, True),
    "rendered-cheap": ("as rendered, prefix/exact matchers", cheap(rendered), True),
    "one-composite": ("request and response tests in one composite (reference only)",
                      lambda c: [_diagnose(c, _requests() + _responses())], False),
}  # fmt: skip


def configs(names: list[str], routes: list[Route]) -> list[Config]:
    found = []
    for route in routes:
        suffix = "-proxied" if route is Route.PROXIED else ""
        found.append(Config(f"envoy{suffix}", f"Envoy alone{suffix}", Filter.NONE, route))
        for name in names:
            title, filters, proxiable = PARTS[name]
            if route is Route.PROXIED and not proxiable:
                continue
            found.append(Config(f"{name}{suffix}", f"{title}{suffix}", Filter.BARE_GATE, route,
                                gate=filters))  # fmt: skip
    return found


@dataclass(frozen=True, slots=True)
class Run:
    config: str
    round: int
    rps: float
    envoy_cpu_us: float  # Envoy's CPU time (all threads) per completed request


def measure(deployments: list[Deployment], settings: Settings) -> list[Run]:
    """Each round runs wrk against every row once, starting one row later each round."""
    runs = []
    for round_ in range(settings.rounds):
        print(f"gate_parts: round {round_ + 1} of {settings.rounds}", flush=True)
        for d in rotated(deployments, round_):
            before = _cpu_ticks(d.envoy.pid)
            load = run_wrk(d.url, settings.connections, settings.duration)
            ticks = _cpu_ticks(d.envoy.pid) - before
            cpu_us = ticks / _CLOCK_TICKS * 1e6 / load.requests if load.requests else 0.0
            runs.append(Run(d.config.name, round_, load.rps, cpu_us))
    return runs


def table(rows: list[Config], runs: list[Run], reference: str) -> list[str]:
    """Medians, and per-round ratios to `reference` (Envoy alone on the same route)."""
    ref = {r.round: r for r in runs if r.config == reference}
    lines = []
    for config in rows:
        mine = [r for r in runs if r.config == config.name]
        rps = statistics.median(r.rps for r in mine)
        cpu = statistics.median(r.envoy_cpu_us for r in mine)
        vs = statistics.median(r.rps / ref[r.round].rps for r in mine)
        extra = statistics.median(r.envoy_cpu_us - ref[r.round].envoy_cpu_us for r in mine)
        lines.append(f"| {config.title} | {rps:,.0f} | {vs:.3f} | {cpu:.1f} | {extra:+.1f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gate_parts", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--only", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--routes", nargs="+", choices=["ok", "proxied"], default=["ok", "proxied"])
    args = parser.parse_args(argv)
    routes = [Route(r) for r in args.routes]
    rows = configs(args.only, routes)
    settings = Settings(rounds=args.rounds, duration=args.duration)
    with ExitStack() as stack:
        deployments = [stack.enter_context(deployed(c, None)) for c in rows]
        for d in deployments:
            d.probe()
            run_wrk(d.url, settings.connections, settings.warmup)
        runs = measure(deployments, settings)
    print(
        f"\nwrk -t2 -c{settings.connections} -d{args.duration:g}s, {args.rounds} rounds, "
        "medians; ratios and differences per round against Envoy alone on the same route\n"
    )
    print("| row | req/s @64 | vs Envoy alone | Envoy CPU µs/request | vs Envoy alone |")
    print("|---|---|---|---|---|")
    for route in routes:
        suffix = "-proxied" if route is Route.PROXIED else ""
        mine = [c for c in rows if c.route is route]
        print("\n".join(table(mine, runs, f"envoy{suffix}")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
