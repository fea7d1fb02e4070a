"""Cost of each binarizer in a training step, against the full-precision model on the same backbone."""

from __future__ import annotations

import pytest

import bnnbench
from bnnbench.runners.bench import time_interleaved
from bnnbench.runners.bench_train import StepSettings, training_step
from bnnbench.runners.train import bf16_hardware

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


def test_sign_fast_path_beats_the_boolean_mask(benchmark):
    """bnnbench.sign (four vectorised passes) against the where/ones_like formula it replaced, same values."""
    import torch

    x = torch.randn(128, 16, 32, 32)

    def reference() -> torch.Tensor:
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    assert torch.equal(bnnbench.sign(x), reference())
    before = time_interleaved({"reference": reference}, 1.0)["reference"].best
    benchmark.pedantic(lambda: bnnbench.sign(x), rounds=20, warmup_rounds=2)
    baseline = min(before, time_interleaved({"reference": reference}, 1.0)["reference"].best)
    speedup = baseline / fixture_best(benchmark)
    benchmark.extra_info.update({"speedup_vs_where": speedup})
    assert speedup >= threshold("BNNBENCH_PERF_MIN_SIGN_SPEEDUP", 1.5)


@pytest.mark.skipif(not bf16_hardware(), reason="this CPU has no AVX512-BF16/AMX-BF16: bf16 autocast is off by default here")
def test_bf16_autocast_speeds_up_the_fp_step_where_the_cpu_has_bf16(benchmark):
    """On CPUs with bf16 hardware runs default to bf16 autocast: it must pay for the full-precision step."""
    fp32 = training_step("fp", StepSettings(batch=BATCH, amp=False))
    bf16 = training_step("fp", StepSettings(batch=BATCH, amp=True))
    before = time_interleaved({"fp32": fp32}, 1.0)["fp32"].best
    benchmark.pedantic(bf16, rounds=10, warmup_rounds=1)
    baseline = min(before, time_interleaved({"fp32": fp32}, 1.0)["fp32"].best)
    speedup = baseline / fixture_best(benchmark)
    benchmark.extra_info.update({"bf16_speedup": speedup})
    assert speedup >= threshold("BNNBENCH_PERF_MIN_BF16_SPEEDUP", 1.2)
