"""How long does a training step take? Medians over repeats, warm-up excluded.

:func:`compare_step_times` is the fair comparison of several methods the
notebooks and benchmarks use: interleaved rounds, process CPU time on a CPU (a
shared machine's other jobs do not inflate it), ratios to a reference. The
median ignores the odd slow call; on CUDA we synchronise so the time covers
the work, not just the kernel launches.
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


def compare_step_times(steps: dict, repeats: int = 5, warmup: int = 1, reference: str | None = None):
    """Time several training steps fairly: interleaved, warm-up excluded, process CPU time.

    ``steps`` maps a method name to a function that runs one training step of that method
    (forward, backward, optimizer step). Each round calls every function once, starting
    with a different one each round, so a slow spell of a shared machine hits every method
    alike; the first ``warmup`` rounds are not counted (allocations, lazy init). On a CPU
    the time is the process's CPU time (``time.process_time``), which other processes do not
    inflate; on CUDA it is synchronised wall-clock time. Run it with no memory tracker
    active: the tracker slows every operation down.

    Returns a DataFrame indexed by method: ``seconds`` (median), ``spread`` (max - min over
    the counted rounds), ``clock`` and, with ``reference``, ``ratio`` (seconds / the reference's).
    """
    import pandas as pd

    if not steps:
        raise ConfigError("compare_step_times needs at least one step function, got none")
    if warmup < 0 or repeats < 1:
        raise ConfigError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    if reference is not None and reference not in steps:
        raise ConfigError(f"reference={reference!r} is not one of the timed methods {list(steps)}")
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    clock = time.perf_counter if cuda else time.process_time
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    names = list(steps)
    times = {name: [] for name in names}
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync()
            t0 = clock()
            steps[name]()
            sync()
            if r >= warmup:
                times[name].append(clock() - t0)
    table = pd.DataFrame({"seconds": {n: statistics.median(t) for n, t in times.items()},
                          "spread": {n: max(t) - min(t) for n, t in times.items()}})
    table["clock"] = "CUDA wall" if cuda else "process CPU"
    if reference is not None:
        table["ratio"] = table.seconds / table.seconds[reference]
    table.index.name = "method"
    return table
