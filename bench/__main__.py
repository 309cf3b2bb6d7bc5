"""`python -m bench`: every configuration through a real Envoy, side by side; see bench/README.md."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import adapter
from bench.configs import CONFIGS, DIRECT
from bench.loadgen import tool_versions
from bench.report import (
    REFERENCE_DIRECT,
    REFERENCE_ENVOY,
    REFERENCE_NAIVE,
    as_json,
    markdown,
    summarize,
    svg_chart,
    targets,
)
from bench.runner import REPO, BenchError, Outcome, Settings, run
from extproc.lab.envoy import envoy_binary

RESULTS = REPO / "bench" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [c.name for c in CONFIGS] + [d.name for d in DIRECT]
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds of each throughput run (default: %(default)s)")  # fmt: skip
    parser.add_argument("--latency-duration", type=float, default=3.0,
                        help="seconds of each 1-connection run (default: %(default)s)")  # fmt: skip
    parser.add_argument("--connections", type=int, default=64,
                        help="connections of the throughput run (default: %(default)s)")  # fmt: skip
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds of unrecorded load per row first (default: %(default)s)")  # fmt: skip
    parser.add_argument("--only", nargs="+", choices=names, metavar="NAME",
                        help=f"only these rows: {', '.join(names)}")  # fmt: skip
    parser.add_argument("--tool", choices=("auto", "python"), default="auto",
                        help="auto: wrk and h2load when installed; python: the fallback generator")  # fmt: skip
    parser.add_argument("--output-dir", type=Path, default=RESULTS,
                        help="where latest.md and latest.json go (default: bench/results)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0 or args.latency_duration <= 0 or args.connections < 1:
        parser.error("--rounds, --duration, --latency-duration and --connections must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        rounds=args.rounds,
        duration=args.duration,
        latency_duration=args.latency_duration,
        connections=args.connections,
        warmup=args.warmup,
        tool=args.tool,
    )
    configs = [c for c in CONFIGS if not args.only or c.name in args.only]
    directs = [d for d in DIRECT if not args.only or d.name in args.only]
    try:
        outcome = run(configs, directs, settings, progress=lambda text: print(f"bench: {text}"))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    text, data = render(outcome, settings, configs, directs, argv)
    print("bench: the adapter alone, without gRPC")
    data["adapter_cpu_us_per_stream"] = costs = adapter.measure()
    text += "\n\n" + adapter.markdown(costs) + "\n"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(outcome, {c.name: c.title for c in configs}, settings.connections,
                     (REFERENCE_ENVOY, REFERENCE_NAIVE))  # fmt: skip
    (args.output_dir / "latest.svg").write_text(svg_chart(rows, settings.connections))
    text = text.replace("\n\n", "\n\n![the table as a chart](latest.svg)\n\n", 1)
    (args.output_dir / "latest.md").write_text(text)
    (args.output_dir / "latest.json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"\n{text}\nwritten: {args.output_dir / 'latest.md'}, {args.output_dir / 'latest.json'}")
    return 0


def render(
    outcome: Outcome, settings: Settings, configs: list[Any], directs: list[Any], argv: Any
) -> tuple[str, dict[str, Any]]:
    """The Markdown report and the JSON document of one run."""
    n = settings.connections
    envoy_rows = summarize(
        outcome, {c.name: c.title for c in configs}, n, (REFERENCE_ENVOY, REFERENCE_NAIVE)
    )
    # A direct row has no Envoy to compare with: its reference is the naive direct row.
    direct_rows = summarize(
        outcome, {d.name: d.title for d in directs}, n, (None, REFERENCE_DIRECT)
    )
    found = targets(envoy_rows, outcome.samples)
    meta = describe(settings, argv)
    return (
        markdown(envoy_rows, direct_rows, found, outcome, meta),
        as_json(envoy_rows, direct_rows, found, outcome, meta),
    )


def describe(settings: Settings, argv: list[str] | None) -> dict[str, Any]:
    """How, where and on what this run was made."""
    arguments = sys.argv[1:] if argv is None else argv
    command = os.environ.get("BENCH_COMMAND", "").strip() or shlex.join(
        ["python", "-m", "bench", *arguments]
    )
    return {
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs ({_cpu_model()}), Linux {platform.release()}",
        "python": platform.python_version(),
        "envoy": _envoy_version(),
        "commit": _commit(),
        "load_generators": tool_versions(),
        "settings": {
            "rounds": settings.rounds,
            "duration": settings.duration,
            "latency_duration": settings.latency_duration,
            "connections": settings.connections,
        },
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _envoy_version() -> str:
    out = _output([str(envoy_binary()), "--version"])
    # "<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    parts = out.rpartition("version:")[2].strip().split("/")
    return parts[1] if len(parts) > 2 else "unknown"


def _commit() -> str:
    sha = _output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).strip()
    if not sha:
        return "unknown"
    dirty = _output(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return f"{sha}{' + uncommitted changes' if dirty.strip() else ''}"


def _output(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return ""
    return done.stdout


if __name__ == "__main__":
    sys.exit(main())
