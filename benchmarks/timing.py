"""Shared timing helper for the benchmark scripts (imported as ``timing``: scripts run from benchmarks/)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def time_calls(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
               sync: Callable[[], None] = lambda: None) -> dict[str, dict[str, float]]:
    """Seconds per call for each function, as {"median_s", "min_s"}. Calls go round-robin over the
    functions so load spikes from other processes hit all of them alike; ``sync`` brackets each call
    (torch.cuda.synchronize on a GPU)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(s), "min_s": min(s)} for name, s in samples.items()}
