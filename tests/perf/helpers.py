"""Helpers of the performance tests: thresholds, a busy machine, and ratios of calls timed in alternating blocks."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import pytest


def threshold(name: str, default: float) -> float:
    """A ratio threshold, overridable with the environment variable ``name``."""
    return float(os.environ.get(name, default))


def busy_cpus(interval_s: float = 0.5) -> float:
    """How many CPUs other work keeps busy: the machine's non-idle CPU time over ``interval_s``, measured
    from /proc/stat while this process sleeps (so its own work does not count, as it would in the load
    average).  Where /proc/stat is missing, the 1-minute load average."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(interval_s)
        total1, idle1 = sample()
    except OSError:
        return os.getloadavg()[0]
    elapsed = total1 - total0
    return 0.0 if elapsed <= 0 else (os.cpu_count() or 1) * (1 - (idle1 - idle0) / elapsed)


def skip_if_busy() -> None:
    """Skip a 2-thread measurement while other work keeps more than half a CPU busy (it would measure that work)."""
    busy = busy_cpus()
    if busy > 0.5:
        pytest.skip(f"other work keeps {busy:.1f} CPUs busy: a 2-thread time would measure it")


def interleaved_bests(
    benchmark,
    calls: dict[str, Callable[[], Any]],
    timed: str,
    rounds: int,
    warmup_rounds: int = 2,
    budget_s: float = 2.0,
    settings: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, float]:
    """The best call of each of ``calls``, timed in alternating blocks for ``budget_s``, so that a slow spell of
    the machine (on a guest, also one it cannot see, as a host's sibling thread busy) falls on every contender
    alike; a ratio of two of them is then the ratio of one measurement.  pytest-benchmark times ``calls[timed]``
    too (within ``settings[timed]``), for its report and comparisons: a time measured apart from the others is
    never in the ratio."""
    from bnnbench.runners.bench import time_interleaved

    settings = settings or {}
    bests = {name: t.best for name, t in time_interleaved(calls, budget_s, settings=settings).items()}
    with settings[timed]() if timed in settings else nullcontext():
        benchmark.pedantic(calls[timed], rounds=rounds, warmup_rounds=warmup_rounds)
    benchmark.extra_info.update({f"{name}_s": best for name, best in bests.items()})
    return bests


def speedup_over(benchmark, fast, reference, rounds: int = 20, warmup_rounds: int = 2, budget_s: float = 2.0) -> float:
    """How many times faster ``fast`` runs than ``reference`` (:func:`interleaved_bests`)."""
    bests = interleaved_bests(benchmark, {"fast": fast, "reference": reference}, "fast", rounds, warmup_rounds, budget_s)
    return bests["reference"] / bests["fast"]


def thread_scaling(benchmark, call: Callable[[], Any], set_threads: Callable[[int], None], rounds: int, budget_s: float = 2.0) -> float:
    """How many times faster ``call`` runs on 2 threads than on 1 (``set_threads(n)`` switches; 1 is restored
    after each block), :func:`interleaved_bests`."""

    @contextmanager
    def threads(n: int) -> Iterator[None]:
        set_threads(n)
        try:
            yield
        finally:
            set_threads(1)

    settings = {"one": lambda: threads(1), "two": lambda: threads(2)}
    bests = interleaved_bests(benchmark, {"one": call, "two": call}, "two", rounds, 3, budget_s, settings)
    scaling = benchmark.extra_info["scaling"] = bests["one"] / bests["two"]
    return scaling
