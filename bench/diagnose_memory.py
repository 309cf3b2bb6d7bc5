"""Peak memory and time of `extproc diagnose -` on a large generated log.

Not a test: it prints numbers. The log repeats real lines recorded from Envoy 1.40
(tests/corpus/lines/recorded.yaml) up to the size asked for, and is piped into a fresh
`extproc diagnose -` process whose peak RSS (ru_maxrss of the child) is reported, for
several sizes so that growth can be seen:

    .venv/bin/python -m bench.diagnose_memory 25 50 100
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def make_log(path: Path, megabytes: int) -> int:
    """Write a log of about `megabytes` MB from the recorded lines; its line count."""
    records = yaml.safe_load((ROOT / "tests/corpus/lines/recorded.yaml").read_text())
    block = "".join(str(r["line"]).replace("\n", " ") + "\n" for r in records).encode()
    repeats = megabytes * 1_000_000 // len(block) + 1
    with path.open("wb") as out:
        for _ in range(repeats):
            out.write(block)
    return repeats * len(records)


def measure(megabytes: int) -> tuple[int, float, float]:
    """(lines, seconds, peak RSS in MB) of one `extproc diagnose -` run."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "access.log"
        lines = make_log(log, megabytes)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        with log.open("rb") as stdin:
            subprocess.run(
                [sys.executable, "-m", "extproc", "diagnose", "-", "--json"],
                stdin=stdin,
                stdout=subprocess.DEVNULL,
                check=True,
            )
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest child so far: runs go from small to large.
    return lines, seconds, max(peak, before) / 1024


def main(sizes: list[int]) -> None:
    print(f"{'MB':>5} {'lines':>10} {'seconds':>8} {'peak RSS MB':>12} {'us/line':>8}")
    for mb in sorted(sizes):
        lines, seconds, peak = measure(mb)
        print(f"{mb:>5} {lines:>10} {seconds:>8.1f} {peak:>12.1f} {seconds / lines * 1e6:>8.1f}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [10, 100])
