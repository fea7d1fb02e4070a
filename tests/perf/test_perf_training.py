"""Cost of each binarizer in a training step, against the full-precision model on the same backbone."""

from __future__ import annotations

import pytest

import bnnbench
from bnnbench.runners.bench import time_interleaved
from bnnbench.runners.bench_train import StepSettings, training_step

from .helpers import fixture_best, threshold

BATCH = 32


@pytest.mark.parametrize("method", [m for m in bnnbench.list_methods() if m != "fp"])
def test_training_step_cost_relative_to_fp(benchmark, method):
    """One SGD step of CIFAR ResNet-20 (stage 2) with ``method`` takes at most a few times the fp step."""
    settings = StepSettings(batch=BATCH)
    step = training_step(method, settings)
    reference = training_step("fp", settings)
    before = time_interleaved({"fp": reference}, 1.0).get("fp").best
    benchmark.pedantic(step, rounds=10, warmup_rounds=1)
    baseline = min(before, time_interleaved({"fp": reference}, 1.0)["fp"].best)
    slowdown = fixture_best(benchmark) / baseline
    benchmark.extra_info.update({"fp_step_s": baseline, "slowdown_vs_fp": slowdown})
    assert slowdown <= threshold("BNNBENCH_PERF_MAX_STEP_SLOWDOWN", 4.0)
