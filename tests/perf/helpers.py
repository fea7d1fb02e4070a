"""Helpers of the performance tests: thresholds and pytest-benchmark's best time."""

from __future__ import annotations

import os

import pytest


def threshold(name: str, default: float) -> float:
    """A ratio threshold, overridable with the environment variable ``name``."""
    return float(os.environ.get(name, default))


def fixture_best(benchmark) -> float:
    """Best (minimum) seconds per call measured by pytest-benchmark."""
    if benchmark.stats is None:
        pytest.skip("benchmarks are disabled (--benchmark-disable); run with --benchmark-only")
    return benchmark.stats.stats.min
