"""The repeat timer the benchmarks share: wall seconds of each run of a function, the device synchronised
after each (a GPU kernel launch returns before the work is done)."""
from __future__ import annotations

import time


def run_seconds(fn, repeats: int, warm_up: bool = True, sync=None) -> tuple[list[float], object]:
    """Seconds of each of `repeats` calls of `fn`, after one untimed call (`warm_up`: page faults of fresh
    outputs, thread pool start, kernel compilation), and what the last call returned."""
    sync = sync or (lambda: None)
    if warm_up:
        fn()
        sync()
    runs, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync()
        runs.append(time.perf_counter() - t0)
    return runs, out


def median(runs: list[float]) -> float:
    return sorted(runs)[len(runs) // 2]
