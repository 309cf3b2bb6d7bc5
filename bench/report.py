"""Medians, ratios and the issue's targets, as a Markdown table and a JSON file.

Each number is the median over the rounds. A ratio is the median of the per-round
ratios, each taken between two rows measured in the same round, so it compares runs
that were side by side in time rather than two medians from different moments.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.runner import Outcome, Sample

REFERENCE_ENVOY = "envoy"
REFERENCE_NAIVE = "naive"
REFERENCE_DIRECT = "grpc-naive"


@dataclass(frozen=True, slots=True)
class Row:
    """One configuration, summarized."""

    name: str
    title: str
    rps: float  # at the throughput run's connections
    p50_1_ms: float
    p99_1_ms: float
    p50_n_ms: float
    p99_n_ms: float
    streams_per_request: float
    cpu_us_per_stream: float | None
    cpu_us_per_message: float | None
    peak_rss_mib: float | None
    vs_envoy: float | None
    vs_naive: float | None
    # Several server processes: the busiest one's share of the server's CPU (1.0: one did all).
    busiest_process_share: float | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """One of the issue's targets: the measured value against the bar."""

    name: str
    value: float
    bar: float
    higher_is_better: bool
    unit: str

    @property
    def met(self) -> bool:
        return self.value >= self.bar if self.higher_is_better else self.value <= self.bar

    def verdict(self) -> str:
        if self.met:
            return "met"
        gap = self.bar - self.value if self.higher_is_better else self.value - self.bar
        return f"missed by {gap:.2f}{self.unit}"


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def _runs(samples: Sequence[Sample], name: str, connections: int) -> list[Sample]:
    return [s for s in samples if s.config == name and s.connections == connections]


def _ratio(samples: Sequence[Sample], name: str, reference: str, connections: int) -> float | None:
    """Median over rounds of rps(name) / rps(reference) in the same round."""
    mine = {s.round: s.load.rps for s in _runs(samples, name, connections)}
    theirs = {s.round: s.load.rps for s in _runs(samples, reference, connections)}
    ratios = [mine[r] / theirs[r] for r in mine.keys() & theirs.keys() if theirs[r] > 0]
    return median(ratios) if ratios else None


def summarize(
    outcome: Outcome,
    titles: dict[str, str],
    connections: int,
    references: tuple[str | None, str | None],
) -> list[Row]:
    """One Row per configuration in `titles` that has samples, in that order.

    `references` names the rows the ratios are taken against: Envoy alone and the naive
    servicer (None: no such column).
    """
    samples = outcome.samples
    envoy, naive = references
    rows = []
    for name, title in titles.items():
        many, one = _runs(samples, name, connections), _runs(samples, name, 1)
        if not many or not one:
            continue
        requests = sum(s.load.requests for s in many)
        per_stream = [c for s in many if (c := s.cpu_us_per_stream) is not None]
        per_message = [c for s in many if (c := s.cpu_us_per_message) is not None]
        shares = [b for s in many if (b := s.busiest_share) is not None]
        rss = outcome.peak_rss_kib.get(name)
        rows.append(
            Row(
                name=name,
                title=title,
                rps=median(s.load.rps for s in many),
                p50_1_ms=median(s.load.p50_ms for s in one),
                p99_1_ms=median(s.load.p99_ms for s in one),
                p50_n_ms=median(s.load.p50_ms for s in many),
                p99_n_ms=median(s.load.p99_ms for s in many),
                streams_per_request=sum(s.streams for s in many) / requests if requests else 0.0,
                cpu_us_per_stream=median(per_stream) if per_stream else None,
                cpu_us_per_message=median(per_message) if per_message else None,
                peak_rss_mib=rss / 1024 if rss else None,
                vs_envoy=_ratio(samples, name, envoy, connections) if envoy else None,
                vs_naive=_ratio(samples, name, naive, connections) if naive else None,
                busiest_process_share=median(shares) if shares else None,
            )
        )
    return rows


def targets(rows: Sequence[Row], samples: Sequence[Sample]) -> list[Target]:
    """The issue's targets that this run's rows can answer."""
    by_name = {row.name: row for row in rows}
    found: list[Target] = []
    if "gated" in by_name and (gated := by_name["gated"].vs_envoy) is not None:
        found.append(
            Target("gated, clean traffic: throughput vs Envoy alone", gated, 0.85, True, "")
        )
    if "always" in by_name and "naive" in by_name and (ratio := by_name["always"].vs_naive):
        always, naive = by_name["always"], by_name["naive"]
        found.append(Target("always-on: throughput vs the naive servicer", ratio, 1.15, True, ""))
        found.append(
            Target("always-on: p50 at 1 connection minus the naive servicer's",
                   always.p50_1_ms - naive.p50_1_ms, 0.0, False, " ms")
        )  # fmt: skip
    found += _http_targets(by_name, samples)
    if "gated-fail" in by_name and "envoy-fail" in by_name:
        delta = _paired_delta(samples, "gated-fail", "envoy-fail")
        found.append(
            Target("a diagnosis: p50 at 1 connection over the same failure without the filter",
                   delta, 1.0, False, " ms")
        )  # fmt: skip
    return found


def _paired(samples: Sequence[Sample], name: str, reference: str, connections: int) -> float | None:
    return _ratio(samples, name, reference, connections)


def _http_targets(by_name: dict[str, Row], samples: Sequence[Sample]) -> list[Target]:
    """Issue 12's targets: the HTTP lane, the bare gate, the proxied route, gRPC parity."""
    found: list[Target] = []
    n = max((s.connections for s in samples), default=1)
    if {"always-http", "naive"} <= by_name.keys():
        if (ratio := _paired(samples, "always-http", "naive", n)) is not None:
            found.append(Target("http always-on, clean: throughput vs the naive grpc servicer",
                                ratio, 1.5, True, "x"))  # fmt: skip
        found.append(Target("http always-on: p50 at 1 connection vs the naive grpc servicer's",
                            _p50_ratio(samples, "always-http", "naive"), 0.65, False, "x"))  # fmt: skip
    if {"always-http", "naive-http"} <= by_name.keys() and (
        ratio := _paired(samples, "always-http", "naive-http", n)
    ) is not None:
        found.append(Target("http always-on, clean: throughput vs naive-http", ratio, 0.85,
                            True, "x"))  # fmt: skip
    if {"always-http-fail", "envoy-fail"} <= by_name.keys():
        found.append(Target("http diagnosis: failing p50 at 1 connection over no filter",
                            _paired_delta(samples, "always-http-fail", "envoy-fail"), 0.6,
                            False, " ms"))  # fmt: skip
    if {"gated", "bare-gate", "envoy"} <= by_name.keys():
        gated, bare = by_name["gated"].vs_envoy, by_name["bare-gate"].vs_envoy
        if gated is not None and bare is not None:
            found.append(Target("gated, clean: throughput vs Envoy alone, below the bare gate's",
                                bare - gated, 0.05, False, ""))  # fmt: skip
    if {"gated-proxied", "envoy-proxied"} <= by_name.keys() and (
        ratio := _paired(samples, "gated-proxied", "envoy-proxied", n)
    ) is not None:
        found.append(Target("gated, clean, proxied route: throughput vs Envoy alone", ratio,
                            0.93, True, ""))  # fmt: skip
    if by_name.get("always") and (ratio := by_name["always"].vs_naive) is not None:
        found.append(Target("grpc always-on: throughput vs the naive servicer", ratio, 1.0,
                            True, "x"))  # fmt: skip
    return found


def _p50_ratio(samples: Sequence[Sample], name: str, reference: str) -> float:
    """Median over rounds of p50(name) / p50(reference), one connection, same round."""
    mine = {s.round: s.load.p50_ms for s in _runs(samples, name, 1)}
    theirs = {s.round: s.load.p50_ms for s in _runs(samples, reference, 1)}
    return median(mine[r] / theirs[r] for r in mine.keys() & theirs.keys() if theirs[r] > 0)


def _paired_delta(samples: Sequence[Sample], name: str, reference: str) -> float:
    """Median over rounds of p50(name) - p50(reference), one connection, same round."""
    mine = {s.round: s.load.p50_ms for s in _runs(samples, name, 1)}
    theirs = {s.round: s.load.p50_ms for s in _runs(samples, reference, 1)}
    return median(mine[r] - theirs[r] for r in mine.keys() & theirs.keys())


def _cell(value: float | None, fmt: Callable[[float], str]) -> str:
    return "-" if value is None else fmt(value)


def _table(rows: Sequence[Row], connections: int, unit: str, *, direct: bool) -> list[str]:
    """Direct rows have no Envoy to compare with, and compare with the naive direct row."""
    names = [
        "configuration", f"{unit}/s @{connections}", "vs Envoy alone", "vs naive",
        "p50 @1", "p99 @1", f"p50 @{connections}", f"p99 @{connections}",
        "calls per request", "server CPU µs/call", "server CPU µs/message", "server peak RSS",
    ]  # fmt: skip
    if direct:
        del names[2]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in rows:
        cells = [
            r.title,
            f"{r.rps:,.0f}",
            _cell(r.vs_envoy, "{:.2f}".format),
            _cell(r.vs_naive, "{:.2f}x".format),
            f"{r.p50_1_ms:.3f} ms",
            f"{r.p99_1_ms:.3f} ms",
            f"{r.p50_n_ms:.2f} ms",
            f"{r.p99_n_ms:.2f} ms",
            f"{r.streams_per_request:.2f}",
            _cell(r.cpu_us_per_stream, "{:.0f}".format),
            _cell(r.cpu_us_per_message, "{:.0f}".format),
            _cell(r.peak_rss_mib, "{:.0f} MiB".format),
        ]
        if direct:
            del cells[2]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(
    envoy_rows: Sequence[Row],
    direct_rows: Sequence[Row],
    found: Sequence[Target],
    outcome: Outcome,
    meta: dict[str, Any],
) -> str:
    """The report: how it was made, the Envoy table, the targets, the direct gRPC table."""
    n = meta["settings"]["connections"]
    lines = [
        f"Command: `{meta['command']}`  ",
        f"{meta['date']}, {meta['machine']}, Envoy {meta['envoy']}, Python {meta['python']}, "
        f"commit {meta['commit']}  ",
        f"{meta['settings']['rounds']} rounds, alternating; {meta['settings']['duration']:g} s at "
        f"{n} connections, {meta['settings']['latency_duration']:g} s at 1; "
        f"load: {outcome.tools['throughput']} @{n}, {outcome.tools['latency']} @1; "
        "medians over the rounds.",
        "",
        *_table(envoy_rows, n, "req", direct=False),
    ]
    for row in envoy_rows:
        if row.busiest_process_share is not None:
            lines.append(
                f"\n{row.title}: the busiest server process did "
                f"{row.busiest_process_share:.0%} of the server's CPU work at {n} connections."
            )
    if found:
        lines += ["", "| target | measured | bar | verdict |", "|---|---|---|---|"]
        for t in found:
            sign = ">=" if t.higher_is_better else "<="
            lines.append(
                f"| {t.name} | {t.value:.2f}{t.unit} | {sign} {t.bar:g}{t.unit} | {t.verdict()} |"
            )
    if direct_rows:
        lines += ["", "Direct gRPC, no Envoy (`python -m bench.grpc_load`, the ghz data file):", ""]
        lines += _table(direct_rows, n, "streams", direct=True)
    for name, why in outcome.skipped.items():
        lines.append(f"\nSkipped `{name}`: {why}.")
    return "\n".join(lines) + "\n"


def as_json(
    envoy_rows: Sequence[Row],
    direct_rows: Sequence[Row],
    found: Sequence[Target],
    outcome: Outcome,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Everything: the settings, each row's medians, the targets, and every raw sample."""
    return {
        **meta,
        "tools": outcome.tools,
        "rows": [asdict(r) for r in envoy_rows],
        "direct": [asdict(r) for r in direct_rows],
        "targets": [{**asdict(t), "met": t.met, "verdict": t.verdict()} for t in found],
        "peak_rss_kib": outcome.peak_rss_kib,
        "skipped": outcome.skipped,
        "samples": [
            {
                **asdict(s),
                "rps": s.load.rps,
                "cpu_us_per_stream": s.cpu_us_per_stream,
                "cpu_us_per_message": s.cpu_us_per_message,
            }
            for s in outcome.samples
        ],
    }


def svg_chart(rows: Sequence[Row], connections: int) -> str:
    """The table as a chart: one bar per row, req/s at `connections`, p50 at 1 connection
    written beside it. Plain SVG, written by hand: no plotting dependency."""
    bar_h, gap, left, width = 22, 8, 330, 420
    top = 40
    height = top + len(rows) * (bar_h + gap) + 20
    peak = max((r.rps for r in rows), default=1.0) or 1.0
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 170}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<text x="10" y="20" font-size="14" font-weight="bold">req/s at {connections} '
        "connections (bar) and p50 at 1 connection</text>",
    ]
    for i, r in enumerate(rows):
        y = top + i * (bar_h + gap)
        w = max(1.0, r.rps / peak * width)
        colour = (
            "#4a7ebb"
            if "http" in r.name
            else "#999999"
            if r.name.startswith(("envoy", "bare"))
            else "#e08a2c"
        )
        out += [
            f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{_escape(r.title)}</text>',
            f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}"/>',
            f'<text x="{left + w + 6:.1f}" y="{y + 15}">{r.rps:,.0f} · {r.p50_1_ms:.2f} ms</text>',
        ]
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
