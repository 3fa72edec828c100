"""How long does a training step take? A median over repeats, warm-up excluded.

The median ignores the odd slow call (another process, a page fault); on CUDA
we synchronise so the time covers the work, not just the kernel launches.
"""
from __future__ import annotations

import statistics
import time

import torch

from ..errors import ConfigError


def measure_step_time(fn, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall-clock seconds of ``fn()`` after ``warmup`` untimed calls.

    The median ignores the odd slow call (another process, a page fault); on CUDA
    we synchronise so the time covers the work, not just the kernel launches.
    """
    if warmup < 0 or repeats < 1:
        raise ConfigError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
