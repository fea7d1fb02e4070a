"""Speed of the packed XNOR-popcount conv, its GEMM and a packed model, each against a same-run baseline."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

import bnnbench
from bnnbench.kernels import binary_conv2d_packed, output_rows, pack_channels, pack_weights, popcount_peak_gops, xnor_gemm
from bnnbench.packed import export_packed, set_backend
from bnnbench.runners.bench import time_interleaved

from .helpers import fixture_best, threshold

# ImageNet ResNet-18, third stage: 256 -> 256 channels at 14x14, batch 1 (the headline shape)
CHANNELS, SIZE = 256, 14


def conv_case():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, CHANNELS, SIZE, SIZE, generator=g)
    w = torch.randn(CHANNELS, CHANNELS, 3, 3, generator=g).sign()
    return x, w, pack_weights(w)


def float_conv_best(x_pm1: torch.Tensor, w: torch.Tensor) -> float:
    """Best F.conv2d time of NCHW and channels-last inputs (the faster float baseline)."""
    x_cl = x_pm1.contiguous(memory_format=torch.channels_last)
    times = time_interleaved({"nchw": lambda: F.conv2d(x_pm1, w, padding=1), "cl": lambda: F.conv2d(x_cl, w, padding=1)}, 1.0)
    return min(t.best for t in times.values())


def test_packed_conv_speedup_over_float_conv(benchmark):
    x, w, packed = conv_case()
    x_pm1 = bnnbench.sign(x)
    assert torch.equal(binary_conv2d_packed(x, packed, 1, 1), F.conv2d(x_pm1, w, padding=1))
    before = float_conv_best(x_pm1, w)
    benchmark.pedantic(binary_conv2d_packed, args=(x, packed, 1, 1), rounds=200, warmup_rounds=10)
    baseline = min(before, float_conv_best(x_pm1, w))
    speedup = baseline / fixture_best(benchmark)
    benchmark.extra_info.update({"float_conv_s": baseline, "speedup": speedup})
    assert speedup >= threshold("BNNBENCH_PERF_MIN_CONV_SPEEDUP", 4.0)


def test_gemm_reaches_half_the_popcount_peak(benchmark):
    x, _, packed = conv_case()
    bits = pack_channels(x.numpy(), 1)
    offsets = packed.offsets(SIZE, SIZE, 1, 1)
    out = np.empty((output_rows(1, SIZE, SIZE), offsets.shape[1]), dtype=np.float32)
    benchmark.pedantic(xnor_gemm, args=(bits, (3, 3), 1, packed.panels, offsets, out), rounds=200, warmup_rounds=10)
    gops = 2 * SIZE * SIZE * CHANNELS * CHANNELS * 9 / fixture_best(benchmark) / 1e9
    peak = popcount_peak_gops()["peak"]
    benchmark.extra_info.update({"gemm_gops": gops, "popcount_peak_gops": peak, "share": gops / peak})
    assert gops / peak >= threshold("BNNBENCH_PERF_MIN_GEMM_SHARE", 0.5)


def test_packed_resnet18_speedup_over_its_float_path(benchmark):
    """ImageNet ResNet-18 + BiPer at 224x224, batch 1: the packed model against the same bits through F.conv2d."""
    model = bnnbench.build_model("resnet18", "biper", family="imagenet").eval()
    packed = export_packed(model)
    float_path = set_backend(copy.deepcopy(packed), "float")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(packed(x).argmax(1), float_path(x).argmax(1))
        before = time_interleaved({"float": lambda: float_path(x)}, 2.0)["float"].best
        benchmark.pedantic(packed, args=(x,), rounds=20, warmup_rounds=2)
        baseline = min(before, time_interleaved({"float": lambda: float_path(x)}, 2.0)["float"].best)
    speedup = baseline / fixture_best(benchmark)
    benchmark.extra_info.update({"float_path_s": baseline, "speedup": speedup})
    assert speedup >= threshold("BNNBENCH_PERF_MIN_MODEL_SPEEDUP", 1.5)
