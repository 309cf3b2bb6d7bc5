"""How work grows with input: the best of several timings at size n and at 8n, in one run.

No absolute threshold: a linear cost grows about 8x from n to 8n, a quadratic one 64x,
so the ratio of the two tells them apart on any machine. Time is this thread's CPU time
(`time.thread_time`): on a loaded machine wall time also counts while other processes
hold the CPU, CPU time only our own work. Each size is timed several times,
interleaved, and the minimum kept (cache misses and interrupts only ever add time); n is
doubled first until one run takes long enough that the timer's resolution and the
call's fixed cost do not matter. A ratio over the limit is measured again (at most
`ATTEMPTS` times): a cost that really is quadratic stays near 64 every time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

Input = TypeVar("Input")

GROWTH = 8
# A linear cost gives about 8; a quadratic one 64. Generous for noise, far below 64.
LINEAR_RATIO = 20.0
REPEATS = 7
ATTEMPTS = 3  # whole measurements; the lowest ratio counts (noise only ever adds time)
MIN_SECONDS = 0.003
MAX_N = 1 << 20


def _cpu_seconds(run: Callable[[], object]) -> float:
    start = time.thread_time()
    run()
    return time.thread_time() - start


def growth(
    work: Callable[[Input], object], build: Callable[[int], Input], n: int = 4096
) -> tuple[int, float]:
    """(n, time at 8n / time at n) for `work(build(size))`, n grown until a run is measurable."""
    small = build(n)
    while n < MAX_N and _cpu_seconds(lambda: work(small)) < MIN_SECONDS:  # noqa: B023 (called at once)
        n *= 2
        small = build(n)
    large = build(GROWTH * n)
    ratio = float("inf")
    for _ in range(ATTEMPTS):
        best_small = best_large = float("inf")
        for _ in range(REPEATS):
            best_small = min(best_small, _cpu_seconds(lambda: work(small)))
            best_large = min(best_large, _cpu_seconds(lambda: work(large)))
        ratio = min(ratio, best_large / max(best_small, 1e-9))
        if ratio < LINEAR_RATIO:
            break
    return n, ratio
