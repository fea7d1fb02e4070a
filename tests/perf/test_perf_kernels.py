"""Speed of the packed XNOR-popcount conv, its GEMM and packed models, each against a same-run baseline.

Floors depend on the popcount ISA the kernels are compiled for (AVX-512
VPOPCNTDQ or not) and sit well below what ``bnnbench bench conv|model``
measures, so that a loaded shared machine does not fail them.  The
environment variables named in :data:`FLOORS` (BNNBENCH_PERF_MIN_CONV_SPEEDUP,
..._GEMM_SHARE, ..._MODEL_SPEEDUP, ..._CHAINED_SPEEDUP, ..._THREAD_SCALING)
override them, e.g. to tighten them on a quiet machine.
"""

from __future__ import annotations

import copy
import os

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bnnbench
from bnnbench.kernels import binary_conv2d_packed, measure_peak, pack_channels, pack_weights, popcount_isa, xnor_gemm
from bnnbench.kernels.isa import AVX512_VPOPCNTDQ
from bnnbench.packed import chain_in_bits, export_packed, set_backend
from bnnbench.runners.bench_model import randomise_batchnorm

from .helpers import interleaved_bests, skip_if_busy, thread_scaling, threshold

# ImageNet ResNet-18, third stage: 256 -> 256 channels at 14x14, batch 1 (the headline shape)
CHANNELS, SIZE = 256, 14
AVX512 = popcount_isa() == AVX512_VPOPCNTDQ
# floors by ISA: (AVX-512 VPOPCNTDQ, otherwise); measured on 2026-12-01: 12x, 0.90, 4.9x, 7.4x, 1.6-2.0x (AVX-512 Xeon)
FLOORS = {
    "BNNBENCH_PERF_MIN_CONV_SPEEDUP": (7.0, 4.0),
    "BNNBENCH_PERF_MIN_GEMM_SHARE": (0.7, 0.5),
    "BNNBENCH_PERF_MIN_MODEL_SPEEDUP": (3.0, 1.5),
    "BNNBENCH_PERF_MIN_CHAINED_SPEEDUP": (4.5, 2.0),
    "BNNBENCH_PERF_MIN_THREAD_SCALING": (1.4, 1.4),
}


def floor(name: str) -> float:
    avx512, other = FLOORS[name]
    return threshold(name, avx512 if AVX512 else other)


def conv_case():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, CHANNELS, SIZE, SIZE, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(CHANNELS, CHANNELS, 3, 3, generator=g).sign()
    return x, w, pack_weights(w)


def test_packed_conv_speedup_over_float_conv(benchmark):
    """The packed conv against F.conv2d of the same signs, NCHW and channels-last inputs (the faster counts)."""
    x, w, packed = conv_case()
    x_pm1 = bnnbench.sign(x)
    x_nchw = x_pm1.contiguous()
    assert torch.equal(binary_conv2d_packed(x, packed, 1, 1), F.conv2d(x_pm1, w, padding=1))
    calls = {
        "packed": lambda: binary_conv2d_packed(x, packed, 1, 1),
        "float_nchw": lambda: F.conv2d(x_nchw, w, padding=1),
        "float_channels_last": lambda: F.conv2d(x_pm1, w, padding=1),
    }
    bests = interleaved_bests(benchmark, calls, "packed", rounds=300, warmup_rounds=10)
    baseline = min(bests["float_nchw"], bests["float_channels_last"])
    speedup = baseline / bests["packed"]
    benchmark.extra_info.update({"speedup": speedup, "isa": popcount_isa()})
    assert speedup >= floor("BNNBENCH_PERF_MIN_CONV_SPEEDUP"), f"packed {bests['packed']:.2e} s, F.conv2d {baseline:.2e} s"


def test_gemm_share_of_the_popcount_peak(benchmark):
    """The GEMM's binary GOPS over the fastest peak loop's, the two timed in alternating blocks."""
    x, _, packed = conv_case()
    bits = pack_channels(x.numpy(), 1)
    offsets = packed.offsets(SIZE, SIZE, 1, 1)
    out = np.empty((SIZE * SIZE, offsets.shape[1]), dtype=np.float32)
    loop = measure_peak(0.5).fastest
    panels = packed.panels()
    calls = {"gemm": lambda: xnor_gemm(bits, (3, 3), 1, panels, offsets, out), "peak": loop.call()}
    bests = interleaved_bests(benchmark, calls, "gemm", rounds=300, warmup_rounds=10)
    peak = loop.ops_per_call / bests["peak"] / 1e9
    gops = 2 * SIZE * SIZE * CHANNELS * CHANNELS * 9 / bests["gemm"] / 1e9
    benchmark.extra_info.update({"gemm_gops": gops, "popcount_peak_gops": peak, "share": gops / peak, "isa": popcount_isa()})
    assert gops / peak >= floor("BNNBENCH_PERF_MIN_GEMM_SHARE")


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 CPUs")
def test_packed_conv_scales_to_two_threads(benchmark):
    """One thread against two (numba), best of many calls each, interleaved; skipped when other work keeps a CPU busy."""
    skip_if_busy()
    x, _, packed = conv_case()
    scaling = thread_scaling(benchmark, lambda: binary_conv2d_packed(x, packed, 1, 1), numba.set_num_threads, rounds=300)
    assert scaling >= floor("BNNBENCH_PERF_MIN_THREAD_SCALING")


@pytest.fixture(scope="module")
def resnet18():
    """ImageNet ResNet-18 + BiPer with trained-looking BatchNorm, packed, its float path and its chain in bits."""
    model = bnnbench.build_model("resnet18", "biper", family="imagenet").eval()
    randomise_batchnorm(model, torch.Generator().manual_seed(0))
    packed = export_packed(model)
    return {"model": model, "packed": packed, "float": set_backend(copy.deepcopy(packed), "float"), "chained": chain_in_bits(packed)}


@pytest.mark.parametrize("contender,floor_name", [("packed", "BNNBENCH_PERF_MIN_MODEL_SPEEDUP"), ("chained", "BNNBENCH_PERF_MIN_CHAINED_SPEEDUP")])
def test_packed_resnet18_speedup_over_its_float_path(benchmark, resnet18, contender, floor_name):
    """224x224, batch 1, channels-last input: a packed model against the same bits through F.conv2d (NCHW, its faster layout)."""
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    fast, float_path = resnet18[contender], resnet18["float"]
    with torch.no_grad():
        assert torch.equal(fast(x_cl).argmax(1), resnet18["model"](x).argmax(1))
        bests = interleaved_bests(benchmark, {"fast": lambda: fast(x_cl), "float": lambda: float_path(x)}, "fast", rounds=30, budget_s=4.0)
    speedup = bests["float"] / bests["fast"]
    benchmark.extra_info.update({"speedup": speedup, "isa": popcount_isa()})
    assert speedup >= floor(floor_name)
