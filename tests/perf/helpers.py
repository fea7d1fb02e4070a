"""Helpers of the performance tests: thresholds and pytest-benchmark's best time."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest


def threshold(name: str, default: float) -> float:
    """A ratio threshold, overridable with the environment variable ``name``."""
    return float(os.environ.get(name, default))


def fixture_best(benchmark) -> float:
    """Best (minimum) seconds per call measured by pytest-benchmark."""
    if benchmark.stats is None:
        pytest.skip("benchmarks are disabled (--benchmark-disable); run with --benchmark-only")
    return benchmark.stats.stats.min


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


def speedup_over(benchmark, fast, reference, rounds: int = 20, warmup_rounds: int = 2) -> float:
    """How many times faster ``fast`` (timed by pytest-benchmark) runs than ``reference`` (timed in the same
    session just before and just after it, the better of the two)."""
    from bnnbench.runners.bench import time_interleaved

    before = time_interleaved({"reference": reference}, 1.0)["reference"].best
    benchmark.pedantic(fast, rounds=rounds, warmup_rounds=warmup_rounds)
    baseline = min(before, time_interleaved({"reference": reference}, 1.0)["reference"].best)
    return baseline / fixture_best(benchmark)


def thread_scaling(benchmark, call: Callable[[], Any], set_threads: Callable[[int], None], rounds: int, budget_s: float = 2.0) -> float:
    """How many times faster ``call`` runs on 2 threads than on 1 (``set_threads(n)`` switches; 1 is restored):
    pytest-benchmark times the 2-thread call; the ratio is of the best calls of the two counts timed in
    alternating blocks for ``budget_s`` (the 2-thread best also over the fixture's rounds), so that a slow
    spell of the machine's second CPU, which this guest cannot see (a sibling thread busy on the host), falls
    on both counts alike instead of on one measurement."""
    from bnnbench.runners.bench import time_interleaved

    @contextmanager
    def threads(n: int) -> Iterator[None]:
        set_threads(n)
        try:
            yield
        finally:
            set_threads(1)

    timings = time_interleaved({"one": call, "two": call}, budget_s, settings={"one": lambda: threads(1), "two": lambda: threads(2)})
    with threads(2):
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=3)
    one, two = timings["one"].best, min(timings["two"].best, fixture_best(benchmark))
    benchmark.extra_info.update({"one_thread_s": one, "two_threads_s": two, "scaling": one / two})
    return one / two
