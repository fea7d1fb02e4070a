"""Cost of each binarizer in a training step, against the full-precision model on the same backbone."""

from __future__ import annotations

import os

import pytest

import bnnbench
from bnnbench.runners.bench_train import StepSettings, training_step
from bnnbench.runners.train import bf16_hardware

from .helpers import interleaved_bests, skip_if_busy, speedup_over, thread_scaling, threshold

BATCH = 32
# Methods whose binarizer is only the one-pass kernels (sign, grad * ApproxSign/clip derivative, the conv remaking the signs):
# 1.19-1.31x the fp step at this batch in fp32 (2026-12-01 23:10 UTC, with the surrogate products in one pass and
# the conv remaking the signs; 1.18-1.29x earlier on a loaded machine), 1.3-1.5x before the kernels.
PLAIN = ("sign-ste", "clip-ste", "polynomial", "bireal", "dorefa", "xnor", "lqnet")


@pytest.mark.parametrize("method", [m for m in bnnbench.list_methods() if m != "fp"])
def test_training_step_cost_relative_to_fp(benchmark, method):
    """One SGD step of CIFAR ResNet-20 (stage 2) with ``method`` takes at most a few times the fp step; the plain
    binarizers at most 1.45x."""
    settings = StepSettings(batch=BATCH)
    step = training_step(method, settings)
    reference = training_step("fp", settings)
    bests = interleaved_bests(benchmark, {"method": step, "fp": reference}, "method", rounds=10, warmup_rounds=1, budget_s=3.0)
    slowdown = bests["method"] / bests["fp"]
    benchmark.extra_info["slowdown_vs_fp"] = slowdown
    if method in PLAIN:
        assert slowdown <= threshold("BNNBENCH_PERF_MAX_PLAIN_STEP_SLOWDOWN", 1.45)
    assert slowdown <= threshold("BNNBENCH_PERF_MAX_STEP_SLOWDOWN", 4.0)


def test_sign_fast_path_beats_the_boolean_mask(benchmark):
    """bnnbench.sign (the one-pass kernel) against the where/ones_like formula it replaced, same values."""
    import torch

    x = torch.randn(128, 16, 32, 32)

    def reference() -> torch.Tensor:
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    assert torch.equal(bnnbench.sign(x), reference())
    speedup = speedup_over(benchmark, lambda: bnnbench.sign(x), reference)
    benchmark.extra_info.update({"speedup_vs_where": speedup})
    assert speedup >= threshold("BNNBENCH_PERF_MIN_SIGN_SPEEDUP", 10.0)


@pytest.mark.skipif(not bf16_hardware(), reason="this CPU has no AVX512-BF16/AMX-BF16: bf16 autocast is off by default here")
def test_bf16_autocast_speeds_up_the_fp_step_where_the_cpu_has_bf16(benchmark):
    """On CPUs with bf16 hardware runs default to bf16 autocast: it must pay for the full-precision step."""
    fp32 = training_step("fp", StepSettings(batch=BATCH, amp=False))
    bf16 = training_step("fp", StepSettings(batch=BATCH, amp=True))
    speedup = speedup_over(benchmark, bf16, fp32, rounds=10, warmup_rounds=1)
    benchmark.extra_info.update({"bf16_speedup": speedup})
    assert speedup >= threshold("BNNBENCH_PERF_MIN_BF16_SPEEDUP", 1.2)


@pytest.mark.skipif(not bf16_hardware(), reason="this CPU has no AVX512-BF16/AMX-BF16: runs stay NCHW here by default")
@pytest.mark.parametrize("method", ["fp", "sign-ste", "biper", "dsq", "reactnet", "rad"])
def test_channels_last_speeds_up_the_bf16_step_where_it_is_the_default(benchmark, method):
    """Under bf16 autocast on bf16 hardware runs default to channels_last: it must pay for fp and for the binary layer's
    kernels that take it (act_norm, DSQ, ReActNet's shift, RAD's moments).  Measured 2026-12-04 on Intel Xeon 6/167
    (AVX512-BF16, AMX), 1 thread: at this batch fp 1.25x, sign-STE 1.21x, BiPer, DSQ and RAD 1.16x, ReActNet 1.14x
    (23:05 UTC); at batch 128 fp 1.31x, the binary steps 1.14-1.26x.  A format lost on the way (a mixed-format
    backward, a kernel falling back to torch's formulas) made them 0.5-1.0x."""
    last = training_step(method, StepSettings(batch=BATCH, amp=True, channels_last=True))
    nchw = training_step(method, StepSettings(batch=BATCH, amp=True, channels_last=False))
    speedup = speedup_over(benchmark, last, nchw, rounds=10, warmup_rounds=1)
    benchmark.extra_info.update({"channels_last_speedup": speedup})
    assert speedup >= threshold("BNNBENCH_PERF_MIN_CHANNELS_LAST_SPEEDUP", 1.05)


def _formulas():
    import torch

    from bnnbench import elementwise

    dims = (1, 2, 3)
    return {
        # name: (fast, the torch formula it replaces, minimum speed-up; measured 2026-12-01 on 1 thread of the
        # Xeon (AMX) machine, load 2.4: sign 2.4x fp32 / 6.8x bf16, ApproxSign 3.9x / 4.7x, variance 5.0x / 6.2x, bits 0.9x int8;
        # the variance with its divisions from the reciprocal, idle: 7.3x / 7.6x, 2026-12-02 03:24 UTC)
        "sign": (lambda x: elementwise.unary(elementwise.SIGN, x), lambda x: torch.nan_to_num(x, nan=-1.0).sign_().add_(0.5).sign_(), 1.6),
        "approx_sign_derivative": (
            lambda x: elementwise.unary(elementwise.APPROX_SIGN_DERIVATIVE, x),
            lambda x: (2 - 2 * x.abs()).clamp(min=0),
            2.0,
        ),
        # grad * ApproxSign in one pass (the gradient is x itself here) against the derivative's formula and the
        # product: 12.9x fp32 / 2.9x bf16 (2026-12-01, 23:12 UTC, the same Xeon, idle)
        "approx_sign_gradient": (
            lambda x: elementwise.apply(elementwise.APPROX_SIGN_GRADIENT, x, x),
            lambda x: x * (2 - 2 * x.abs()).clamp(min=0),
            1.5,
        ),
        "per_sample_variance": (elementwise.per_sample_variance, lambda x: x.var(dim=dims, keepdim=True), 4.0),
        "signs_in_bits": (
            lambda x: elementwise.unpack_signs(elementwise.pack_signs(x), x.shape, x.stride(), x.dtype),
            lambda x: x.to(torch.int8).to(x.dtype),
            0.6,
        ),
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["sign", "approx_sign_derivative", "approx_sign_gradient", "per_sample_variance", "signs_in_bits"])
def test_elementwise_kernel_beats_the_torch_formula_it_replaces(benchmark, name, dtype):
    """Each one-pass kernel of the binary layer against its torch formula on a ResNet-20 activation, same values."""
    import torch

    fast, formula, floor = _formulas()[name]
    x = bnnbench.sign(torch.randn(128, 16, 32, 32)) if name == "signs_in_bits" else torch.randn(128, 16, 32, 32)
    x = x.to(getattr(torch, dtype))
    assert torch.equal(fast(x), formula(x))
    speedup = speedup_over(benchmark, lambda: fast(x), lambda: formula(x))
    benchmark.extra_info.update({"speedup_vs_torch": speedup})
    assert speedup >= threshold(f"BNNBENCH_PERF_MIN_{name.upper()}_SPEEDUP", floor)


@pytest.mark.parametrize(
    "name, floor",
    # FDA's series in blocks 3.8x its torch formula, SwishSign's derivative (one pass for both arguments, the cosh
    # skipping the saturated elements, the tail fused) 2.2x (2026-12-04 02:11 UTC, Intel Xeon 6/207, AVX-512 with VPOPCNTDQ, no AMX, 1 thread, fp32,
    # a 128 x 16 x 32 x 32 activation 44% at +-1); SwishSign's 1.45-1.47x in three runs on the 6/167 Xeon (AVX512-BF16
    # and AMX, 2026-12-04 20:25 UTC), whose torch formula runs faster
    [("fda", 2.0), ("swish-sign", 1.3)],
)
def test_float32_surrogate_of_a_saturated_activation_beats_its_torch_formula(benchmark, name, floor):
    """FDA's Fourier series and SwishSign's derivative in float32, on an activation the hardtanh saturated as a
    ResNet-20's is (some 44% of it at +-1), against the torch formula each replaces, the same bits."""
    import torch

    from bnnbench.methods import fda, swish_sign

    fast, formula = {
        "fda": (lambda x: fda.fourier_sign_derivative(x, 0.1, 13, 18), lambda x: fda._fourier(x, 0.1, 13, 18)),
        "swish-sign": (lambda x: swish_sign.swish_sign_derivative(x, 5.0), lambda x: swish_sign._swish_sign(x, 5.0)),
    }[name]
    x = (1.3 * torch.randn(128, 16, 32, 32, generator=torch.Generator().manual_seed(0))).clamp_(-1, 1)
    assert torch.equal(fast(x), formula(x))
    speedup = speedup_over(benchmark, lambda: fast(x), lambda: formula(x))
    benchmark.extra_info.update({"speedup_vs_torch": speedup})
    assert speedup >= threshold(f"BNNBENCH_PERF_MIN_{name.upper().replace('-', '_')}_FLOAT32_SPEEDUP", floor)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_surrogate_takes_the_gradient_faster_than_its_value_then_product(benchmark, dtype):
    """IR-Net's surrogate backward on a ResNet-20 activation: the gradient multiplied in the derivative's last
    pass (elementwise.multiplying: bf16's lookup, float32's last kernel) against the derivative and torch's
    product, same bits."""
    import torch

    from bnnbench import elementwise
    from bnnbench.methods import irnet

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 16, 32, 32, generator=generator).to(getattr(torch, dtype))
    grad = torch.randn(x.shape, generator=generator).to(x.dtype)

    def fused() -> torch.Tensor:
        with elementwise.multiplying(x, grad) as product:
            value = irnet.ede_derivative(x, 1.0, 3.0)
        assert product.is_result(value)
        return value

    def separate() -> torch.Tensor:
        return grad * irnet.ede_derivative(x, 1.0, 3.0)

    assert torch.equal(fused(), separate())
    speedup = speedup_over(benchmark, fused, separate)
    benchmark.extra_info.update({"speedup_vs_separate": speedup})
    # measured on the same Xeon, one thread: bf16 1.5x in a probe on an idle machine (2026-12-01 23:20 UTC), 1.26x
    # in this test with both cores training (00:12 UTC), 1.26-1.28x idle (12-02 03:24 UTC); float32 1.27-2.1x (three
    # runs, 03:24-03:26 UTC)
    assert speedup >= threshold("BNNBENCH_PERF_MIN_SURROGATE_PRODUCT_SPEEDUP", 1.1)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_rads_fused_moments_beat_autograd_through_the_formula(benchmark, dtype):
    """RAD's distribution loss, forward and backward, on a ResNet-20 activation: its fused moments
    (methods/rad.py) against autograd through the formula, same loss and gradient."""
    import torch

    from bnnbench.methods import rad

    a = (torch.randn(128, 16, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.7).clamp(-1, 1).to(getattr(torch, dtype))

    def formula(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        dims = (0, 2, 3)
        mean = x.mean(dim=dims)
        std = (((x - mean.view(1, -1, 1, 1)) ** 2).mean(dim=dims) + 1e-10).abs().sqrt()
        l1 = (2 - mean.abs() - std).clamp(min=0).pow(2).mean() + (std - 4).clamp(min=0).pow(2).mean()
        return l1 + (mean.pow(2) - std.pow(2)).clamp(min=0).mean()

    def gradient(loss_of) -> torch.Tensor:
        leaf = a.clone().requires_grad_()
        loss_of(leaf).backward()
        return leaf.grad

    from bnnbench.functional import formulas

    with formulas(bf16="torch"):  # _ChannelMoments, bit for bit the formula
        assert torch.equal(gradient(rad.distribution_loss), gradient(formula))
    want = gradient(formula)  # bfloat16 by default: the fused moments, within bfloat16's rounding of it
    torch.testing.assert_close(gradient(rad.distribution_loss), want, rtol=2**-7, atol=2**-8 * want.abs().max().item())
    speedup = speedup_over(benchmark, lambda: gradient(rad.distribution_loss), lambda: gradient(formula))
    benchmark.extra_info.update({"speedup_vs_formula": speedup})
    # measured on the same Xeon, one thread, idle: 2.4x bf16, 2.1x float32 (2026-12-02 03:24 UTC)
    assert speedup >= threshold("BNNBENCH_PERF_MIN_RAD_MOMENTS_SPEEDUP", 1.6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_reactnets_fused_threshold_gradient_beats_torchs_sum(benchmark, dtype):
    """ReActNet's sign(a + beta) backward on a ResNet-20 activation: the gradients to a and beta in one pass
    (elementwise.shifted_approx_sign_backward, the fused formulas) against the kernel writing the float32 products
    and torch's sum of them (torch's formulas), the same gradient to a."""
    import torch

    from bnnbench import elementwise, functional

    generator = torch.Generator().manual_seed(2)
    a = torch.randn(128, 16, 32, 32, generator=generator).to(getattr(torch, dtype))
    grad = torch.randn(128, 16, 32, 32, generator=generator).to(a.dtype)
    beta = torch.randn(16, 1, 1, generator=generator) * 0.3

    def fused() -> tuple[torch.Tensor, torch.Tensor]:
        return elementwise.shifted_approx_sign_backward(a, beta, grad)

    def torchs() -> tuple[torch.Tensor, torch.Tensor]:
        products, to_a = functional._shifted(elementwise.SHIFTED_APPROX_SIGN_GRAD, a, beta, (grad,))
        return to_a, products.sum_to_size(beta.shape)

    assert torch.equal(fused()[0], torchs()[0])
    speedup = speedup_over(benchmark, fused, torchs)
    benchmark.extra_info.update({"speedup_vs_torch_formulas": speedup})
    # measured 2026-12-04 on the 6/167 Xeon (AVX512-BF16, AMX), 1 thread: 1.88x bf16, 2.47x float32 (20:27 UTC, this shape)
    assert speedup >= threshold("BNNBENCH_PERF_MIN_SHIFTED_GRADIENT_SPEEDUP", 1.3)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_act_norm_backward_scales_to_two_torch_threads(benchmark, dtype):
    """act_norm's backward sweep (the largest kernel of a step) on torch's 2 OpenMP threads against 1
    (bnnbench.omp), same bits; skipped when other work keeps a CPU busy."""
    import torch

    from bnnbench import act_norm, elementwise, functional, omp

    if not omp.available():
        pytest.skip("torch runs no libgomp pool in this process")
    skip_if_busy()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 16, 32, 32, generator=generator).to(getattr(torch, dtype))
    grad = torch.randn(x.shape, generator=generator).to(x.dtype)
    root = torch.sqrt(elementwise.per_sample_variance(x) + 1e-5)
    formula = functional._FORMULAS[functional.approx_sign_derivative]
    sweep = lambda: act_norm.backward(x, root, grad, formula)  # noqa: E731
    expected = sweep()
    torch.set_num_threads(2)
    try:
        assert all(torch.equal(a, b) for a, b in zip(sweep(), expected))
    finally:
        torch.set_num_threads(1)
    scaling = thread_scaling(benchmark, sweep, torch.set_num_threads, rounds=50)
    assert scaling >= threshold("BNNBENCH_PERF_MIN_KERNEL_THREAD_SCALING", 1.5)


def test_fused_bf16_act_norm_beats_torchs_bf16_formulas(benchmark):
    """act_norm under bf16, what a step pays for it (the forward's statistics and the backward): the fused float32
    sweeps (bnnbench.act_norm_fused) against the bit-exact reproduction of torch's bf16 formulas (the variance,
    then the sweep of bnnbench.act_norm), on a ResNet-20 layer's activation."""
    import torch

    from bnnbench import act_norm, act_norm_fused, elementwise, functional

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 16, 32, 32, generator=generator).bfloat16()
    grad = torch.randn(x.shape, generator=generator).bfloat16()
    formula = functional._FORMULAS[functional.approx_sign_derivative]

    def torchs() -> tuple[torch.Tensor, torch.Tensor]:
        return act_norm.backward(x, torch.sqrt(elementwise.per_sample_variance(x) + 1e-5), grad, formula)

    def fused() -> torch.Tensor:
        return act_norm_fused.backward(x, grad, 1e-5, formula=formula)

    exact = sum(t.double() for t in torchs())
    assert ((fused().double() - exact).norm() / exact.norm()).item() < 0.01  # the same gradient, bf16 apart
    speedup = speedup_over(benchmark, fused, torchs)
    benchmark.extra_info.update({"speedup_vs_torch_formulas": speedup})
    assert speedup >= threshold("BNNBENCH_PERF_MIN_FUSED_ACT_NORM_SPEEDUP", 3.0)


# measured 2026-12-02 13:50 UTC on the 6/167 Xeon, idle, 1 thread: BiPer 1.31x, RBNN 1.33x, RAD 1.11x, DSQ 1.05-1.06x;
# 14:47 UTC, RAD's binarizer and moments in one node: BiPer 1.33x, RBNN 1.30x, RAD 1.19x, DSQ 1.05x
@pytest.mark.parametrize(("method", "floor"), [("biper", 1.15), ("rbnn", 1.15), ("rad", 1.10), ("dsq", 1.02)])
def test_fused_bf16_formulas_speed_up_the_step(benchmark, method, floor):
    """A step under bf16 autocast with the fused formulas (the default: act_norm and alpha, RAD's moments, DSQ's
    soft quantizer) against torch's bf16 formulas."""
    fused = training_step(method, StepSettings(batch=BATCH, amp=True))
    torchs = training_step(method, StepSettings(batch=BATCH, amp=True, bf16_formulas="torch"))
    speedup = speedup_over(benchmark, fused, torchs, rounds=10, warmup_rounds=1)
    benchmark.extra_info.update({"speedup_vs_torch_formulas": speedup})
    # without bf16 hardware (runs there default to fp32) torch emulates the bf16 convs, which then take most of the
    # step: measured 2026-12-04 on the 6/207 Xeon (AVX-512, no AVX512-BF16/AMX), BiPer 1.09x, RBNN 1.13x, RAD 1.06x
    # (the same with the code before the fused fp32 formulas, 06f5ebd), DSQ 1.02x (one run below 1.02x); there they
    # need only not be slower (0.97: the rounds' noise)
    assert speedup >= threshold("BNNBENCH_PERF_MIN_FUSED_STEP_SPEEDUP", floor if bf16_hardware() else 0.97)


# measured 2026-12-04 on the 6/207 Xeon (AVX-512, no bf16 hardware), idle, 1 thread, step vs fp's in bnnbench bench
# train: BiPer 1.41x -> 1.19x, RBNN 1.55x -> 1.23x, RAD 1.34x -> 1.17x, DSQ 1.36x -> 1.18x, FDA 1.66x -> 1.33x,
# SwishSign 1.52x -> 1.18x, ReSTE 1.41x -> 1.34x; this test's speed-ups at batch 32, 04:33 UTC: BiPer 1.18x, RBNN
# 1.19x, RAD 1.08x, DSQ 1.10x, FDA 1.24x, SwishSign 1.22x, ReSTE 1.09x
@pytest.mark.parametrize(
    ("method", "floor"),
    [("biper", 1.10), ("rbnn", 1.10), ("rad", 1.03), ("dsq", 1.04), ("fda", 1.12), ("swish-sign", 1.12), ("reste", 1.03)],
)
def test_fused_fp32_formulas_speed_up_the_step(benchmark, method, floor):
    """A float32 step with --fp32-formulas fused (act_norm's sweeps, alpha in the conv, the methods' own fused
    formulas) against torch's fp32 formulas (the default, bit for bit the reference)."""
    fused = training_step(method, StepSettings(batch=BATCH, fp32_formulas="fused"))
    torchs = training_step(method, StepSettings(batch=BATCH))
    speedup = speedup_over(benchmark, fused, torchs, rounds=10, warmup_rounds=1)
    benchmark.extra_info.update({"speedup_vs_torch_formulas": speedup})
    assert speedup >= threshold("BNNBENCH_PERF_MIN_FUSED_FP32_STEP_SPEEDUP", floor)
