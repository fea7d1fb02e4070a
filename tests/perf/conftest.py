"""Performance regression tests (pytest-benchmark); skipped by the default run (``--ignore=tests/perf``).

Run:      pytest tests/perf --benchmark-only
Save:     pytest tests/perf --benchmark-only --benchmark-autosave
Compare:  pytest tests/perf --benchmark-only --benchmark-compare --benchmark-compare-fail=min:10%

Every assertion is a ratio against a baseline timed in the same test (never an
absolute time); thresholds can be tightened on a quiet machine through the
environment variables below.
"""

from __future__ import annotations

import os

import pytest

from bnnbench.runners.bench import set_threads


def threshold(name: str, default: float) -> float:
    """A ratio threshold, overridable with the environment variable ``name``."""
    return float(os.environ.get(name, default))


@pytest.fixture(autouse=True)
def one_thread():
    """Timings with one thread in torch and numba, as ``bnnbench bench`` by default."""
    set_threads(1)


def fixture_best(benchmark) -> float:
    """Best (minimum) seconds per call measured by pytest-benchmark."""
    if benchmark.stats is None:
        pytest.skip("benchmarks are disabled (--benchmark-disable); run with --benchmark-only")
    return benchmark.stats.stats.min
