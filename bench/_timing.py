"""Timing helpers shared by the bench scripts (not a benchmark itself)."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so wall-clock timings cover it (no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], Any], device: torch.device, repeat: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` (at least 1) runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(repeat, 1)):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeat: int, warmup: int,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per variant; one call of each variant per round (so load changes hit every variant alike).

    ``clock``: wall time by default; ``time.process_time`` counts only this process's CPU time (steadier on a
    shared machine with one thread; with more threads it also counts their idle spinning)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(repeat, 1)):
        for key, f in fns.items():
            t0 = clock()
            f()
            sync(device)
            times[key].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
