"""Helpers of the performance tests: thresholds and pytest-benchmark's best time."""

from __future__ import annotations

import os
import time

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
