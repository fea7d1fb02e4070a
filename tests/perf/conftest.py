"""Performance regression tests (pytest-benchmark); skipped by the default run (``--ignore=tests/perf``).

Run:      pytest tests/perf --benchmark-only
Save:     pytest tests/perf --benchmark-only --benchmark-autosave
Compare:  pytest tests/perf --benchmark-only --benchmark-compare --benchmark-compare-fail=min:10%

Every assertion is a ratio against a baseline timed in the same test (never an
absolute time); thresholds can be tightened on a quiet machine through the
environment variables BNNBENCH_PERF_MIN_CONV_SPEEDUP (default 4),
BNNBENCH_PERF_MIN_GEMM_SHARE (0.5), BNNBENCH_PERF_MIN_MODEL_SPEEDUP (1.5),
BNNBENCH_PERF_MAX_STEP_SLOWDOWN (4), BNNBENCH_PERF_MAX_PLAIN_STEP_SLOWDOWN (1.45),
BNNBENCH_PERF_MIN_KERNEL_THREAD_SCALING (1.5)
and the kernels' BNNBENCH_PERF_MIN_<KERNEL>_SPEEDUP (see test_perf_training.py).
"""

from __future__ import annotations

import pytest

from bnnbench.runners.bench import set_threads


@pytest.fixture(autouse=True)
def one_thread():
    """Timings with one thread in torch and numba, as ``bnnbench bench`` by default."""
    set_threads(1)

