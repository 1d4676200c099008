"""Timing helpers shared by the benchmarks: medians over repeats, printed as a table."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def median_ms(fn: Callable[[], object], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of `fn` in milliseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)


def print_table(title: str, rows: list[tuple[str, float, str]]) -> None:
    print(f"\n{title}")
    width = max(len(name) for name, _, _ in rows)
    for name, ms, note in rows:
        print(f"  {name:<{width}}  {ms:9.2f} ms  {note}")
