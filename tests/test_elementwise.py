"""The one-pass kernels of bnnbench.elementwise give, bit for bit, what the torch formulas they replace give."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import bnnbench.elementwise as elementwise
import bnnbench.functional as functional
from bnnbench import omp

EDGES = [0.0, -0.0, float("nan"), -float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45, 1e-39, -1e-39, 3.0, -3.0]
EDGES += [1.0, -1.0, 1.0 + 2**-23, -(1.0 + 2**-23), 1.0 - 2**-24, 0.5, -0.5, 0.9999, 1e-30, 3e38, -3e38]

FORMULAS = {
    "sign": (elementwise.SIGN, lambda x: torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))),
    "approx_sign_derivative": (elementwise.APPROX_SIGN_DERIVATIVE, lambda x: (2 - 2 * x.abs()).clamp(min=0)),
    "clip_derivative": (elementwise.CLIP_DERIVATIVE, lambda x: (x.abs() <= 1).to(x.dtype)),
}
GRADIENTS = {  # kernel, derivative: the kernel is grad * derivative(x), two torch operators
    "approx_sign_gradient": (elementwise.APPROX_SIGN_GRADIENT, FORMULAS["approx_sign_derivative"][1]),
    "clip_gradient": (elementwise.CLIP_GRADIENT, FORMULAS["clip_derivative"][1]),
}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape, strides and values, NaN where NaN."""
    return a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and torch.equal(a.isnan(), b.isnan()) and torch.equal(
        a.nan_to_num(0.0), b.nan_to_num(0.0)
    )


def inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    """Edge values, every bfloat16 bit pattern, odd shapes, channels_last and a strided view."""
    generator = torch.Generator().manual_seed(0)
    every_bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return [
        torch.tensor(EDGES).to(dtype),
        every_bf16.to(dtype),
        (3 * torch.randn(3, 5, 7, 11, generator=generator)).to(dtype),
        (torch.randn(4, 6, 5, 3, generator=generator)).to(dtype).contiguous(memory_format=torch.channels_last),
        torch.randn(0, 3, dtype=dtype),
        (torch.randn(6, 9, generator=generator)).to(dtype)[:, ::2],  # not dense: the torch formula
    ]


@DTYPES
@pytest.mark.parametrize("name", list(FORMULAS))
def test_kernel_equals_its_torch_formula_bit_for_bit(name, dtype):
    kernel, formula = FORMULAS[name]
    for x in inputs(dtype):
        out = elementwise.unary(kernel, x)
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            assert out is None
            continue
        assert out is not None and identical(out, formula(x)), (name, x.shape)


def gradients_like(x: torch.Tensor, seed: int) -> torch.Tensor:
    """A gradient of x's shape, dtype and strides: random values with edge values (NaN, infinities, zeros) among them."""
    generator = torch.Generator().manual_seed(seed)
    grad = 4 * torch.randn(x.shape, generator=generator)
    edges = torch.tensor(EDGES)
    flat = grad.view(-1)
    flat[: min(flat.numel(), edges.numel())] = edges[: flat.numel()]
    return torch.empty_like(x).copy_(grad.flip(0) if grad.dim() else grad)


@DTYPES
@pytest.mark.parametrize("name", list(GRADIENTS))
def test_gradient_kernel_equals_grad_times_the_torch_derivative_bit_for_bit(name, dtype):
    kernel, derivative = GRADIENTS[name]
    for seed, x in enumerate(inputs(dtype)):
        grad = gradients_like(x, seed)
        out = elementwise.apply(kernel, x, grad)
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            assert out is None
            continue
        assert out is not None and identical(out, grad * derivative(x)), (name, x.shape)


@DTYPES
@pytest.mark.parametrize("derivative", ["approx", "clip", "identity", "other"])
def test_surrogate_sign_backward_is_grad_times_the_derivative_bit_for_bit(derivative, dtype):
    """Known derivatives run as one kernel, the STE hands the gradient on and keeps nothing, any other
    derivative runs as the torch formula: the gradient is grad * derivative(x) in every case."""
    function = {
        "approx": functional.approx_sign_derivative,
        "clip": functional.clip_derivative,
        "identity": functional.identity_derivative,
        "other": lambda x: 1 - x.tanh() ** 2,
    }[derivative]
    for seed, x in enumerate(inputs(dtype)[:4]):
        leaf = x.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
            out = functional.surrogate_sign(leaf, function)
        assert (saved == []) == (derivative == "identity")
        grad = gradients_like(x, seed)
        (fast,) = torch.autograd.grad(out, leaf, grad)
        assert identical(out.detach(), functional.sign(x)) and identical(fast, grad * function(x)), (derivative, x.shape)


@DTYPES
def test_the_public_functions_use_the_kernels_and_keep_their_formulas(dtype, monkeypatch):
    x = inputs(dtype)[2]
    fast = [functional.sign(x), functional.approx_sign_derivative(x), functional.clip_derivative(x)]
    monkeypatch.setattr(elementwise, "covered", lambda x: False)
    reference = [functional.sign(x), functional.approx_sign_derivative(x), functional.clip_derivative(x)]
    assert all(identical(a, b) for a, b in zip(fast, reference))


def test_tracked_other_dtype_and_compiled_inputs_fall_back_to_torch():
    tracked = torch.randn(4, requires_grad=True)
    assert elementwise.unary(elementwise.SIGN, tracked) is None
    with torch.no_grad():
        assert elementwise.unary(elementwise.SIGN, tracked) is not None
    assert elementwise.unary(elementwise.SIGN, torch.randn(4, dtype=torch.float64)) is None
    assert elementwise.unary(elementwise.SIGN, torch.randn(4, dtype=torch.float16)) is None
    assert torch.equal(functional.sign(tracked), torch.where(tracked >= 0, 1.0, -1.0))


@DTYPES
@pytest.mark.parametrize("shape", [(128, 16, 32, 32), (5, 3, 7, 9), (3, 2), (2, 1, 1, 2), (7, 33000)])
def test_per_sample_variance_is_torchs_var_bit_for_bit(shape, dtype, monkeypatch):
    monkeypatch.setattr(omp, "PARALLEL_WORK", 1)  # on 2 threads, the samples split between them
    generator = torch.Generator().manual_seed(1)
    x = (2.5 * torch.randn(*shape, generator=generator) + 0.75).to(dtype)
    wide = (torch.randn(*shape, generator=generator) * 1e30 - 3e29).to(dtype)  # chains far from their start
    non_finite = x.clone()
    for sample, value in zip(range(shape[0]), (math.inf, math.nan, -math.inf)):
        non_finite[sample].view(-1)[-1] = value  # NaN variances, as torch writes them
    dims = tuple(range(1, x.dim()))
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for t in (x, wide, non_finite):
                variance = elementwise.per_sample_variance(t)
                if threads > 1 and x[0].numel() >= elementwise.REDUCTION_GRAIN:
                    assert variance is None  # torch splits such a sample across threads: not covered
                    continue
                expected = t.var(dim=dims, keepdim=True)
                bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
                assert variance is not None and identical(variance, expected), (shape, threads)
                assert torch.equal(variance.view(bits), expected.view(bits))  # NaN's bits too
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("root", [False, True], ids=["var", "std"])
@pytest.mark.parametrize("shape", [(16, 3, 3, 3), (64, 64, 3, 3), (10, 64), (5, 2)])
def test_per_output_variance_is_torchs_var_and_std_with_their_gradients_bit_for_bit(shape, root):
    """functional.per_output_variance (a weight's per-channel var or std from one Welford pass; IR-Net, RBNN, ReCU)
    gives torch's values and autograd's gradients, bit for bit, a channel of equal values (std 0) included; a
    float64 or one-element row takes torch's own reduction."""
    generator = torch.Generator().manual_seed(sum(shape))
    w = (torch.randn(*shape, generator=generator) * 0.05 + 0.01).requires_grad_(True)
    with torch.no_grad():
        w[1] = 0.25
    grad = torch.randn(shape[0], *([1] * (len(shape) - 1)), generator=generator)
    dims = tuple(range(1, len(shape)))
    expected = w.std(dim=dims, keepdim=True) if root else w.var(dim=dims, keepdim=True)
    (expected_grad,) = torch.autograd.grad(expected, w, grad)
    value = functional.per_output_variance(w, root=root)
    assert type(value.grad_fn).__name__ == "_PerOutputVarianceBackward"
    (value_grad,) = torch.autograd.grad(value, w, grad)
    assert torch.equal(value, expected)
    assert torch.equal(value_grad.view(torch.int32), expected_grad.view(torch.int32))  # NaN's bits too (std 0)
    with torch.no_grad():
        assert torch.equal(functional.per_output_variance(w, root=root), expected)
    wide = w.detach().double().requires_grad_(True)
    assert functional.per_output_variance(wide, root=root).grad_fn.name().startswith(("StdBackward", "VarBackward"))


@pytest.mark.parametrize("n", [1, 63, 65, 40_000, 3 * 65_536 + 77])
def test_clamp_and_sign_is_torchs_clamp_and_the_sign_bit_for_bit(n, monkeypatch):
    """The hardtanh's clamp with the next layer's signs in one pass: torch's ``clamp_(-1, 1)`` bit for bit (every
    bfloat16 pattern; NaN's bits too, which torch's vector loop and its scalar tail write differently; float32 NaN
    payloads, signed zeros), and :func:`functional.sign`'s values, on 1 and 2 threads and channels_last."""
    monkeypatch.setattr(omp, "PARALLEL_WORK", 1)
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    generator = torch.Generator().manual_seed(n)
    bf16 = every[torch.randint(0, 65536, (n,), generator=generator)]
    fp32 = torch.randn(n, generator=generator) * 2
    fp32[::3] = -0.0
    fp32.view(torch.int32)[1::7] = torch.randint(0x7F800001, 0x7FFFFFFF, fp32[1::7].shape, generator=generator, dtype=torch.int32)
    channels_last = every[torch.randint(0, 65536, (4, 8, 9, 9), generator=generator)].contiguous(memory_format=torch.channels_last)
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for x in (bf16, fp32, channels_last, every):
                bits = torch.int16 if x.dtype == torch.bfloat16 else torch.int32
                clamped = x.clone()
                signs = elementwise.clamp_and_sign(clamped)
                assert torch.equal(clamped.view(bits), x.clone().clamp_(-1.0, 1.0).view(bits))
                assert torch.equal(signs.view(bits), functional.sign(x).view(bits)) and signs.stride() == x.stride()
    finally:
        torch.set_num_threads(previous)
    assert elementwise.clamp_and_sign(torch.randn(4, dtype=torch.float64)) is None
    assert elementwise.clamp_and_sign(torch.randn(4, 6)[:, ::2]) is None


def test_welfords_quotient_from_the_reciprocal_is_the_division():
    """a / n from 1 / n and two fmas (the variance's update) is the correctly rounded quotient wherever that is
    normal or zero: random a over the exponent range and whole n, n = 1, zeros, and a within an ulp of n times a
    rounding midpoint (the hardest case: a / n then lies closest to one)."""
    from numba import njit

    @njit
    def mismatches(a, n):  # pragma: no cover - compiled
        count = 0
        for i in range(a.size):
            count += elementwise._quotient(a[i], n[i], 1.0 / n[i]) != a[i] / n[i]
        return count

    @njit
    def times_midpoint(n, q, half_ulp):  # pragma: no cover - compiled
        return np.array([elementwise.fma(n[i], q[i], n[i] * half_ulp[i]) for i in range(n.size)])  # n (q + ulp/2), rounded once

    rng = np.random.default_rng(5)
    size = 400_000
    a = (1.0 + rng.random(size)) * 2.0 ** rng.integers(-900, 1000, size) * rng.choice([-1.0, 1.0], size)
    n = rng.integers(1, 1 << 15, size).astype(np.float64)
    assert mismatches(a, n) == 0 and mismatches(a, np.floor(n * 2.0**25)) == 0 and mismatches(a, np.ones(size)) == 0
    assert mismatches(np.zeros(7), np.arange(1.0, 8.0)) == 0
    q = (1.0 + rng.random(size)) * 2.0 ** rng.integers(-20, 20, size)
    near = times_midpoint(n, q, np.spacing(q) / 2)
    assert np.count_nonzero(near != n * q) > size // 10  # the midpoints moved many products off n q
    for a in (near, np.nextafter(near, np.inf), np.nextafter(near, -np.inf)):
        assert mismatches(a, n) == 0


def test_per_sample_variance_covers_only_what_it_reproduces():
    assert elementwise.per_sample_variance(torch.randn(4, 1)) is None  # one element per sample: torch's NaN/inf path
    assert elementwise.per_sample_variance(torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)) is None
    assert elementwise.per_sample_variance(torch.randn(4, 6)[:, ::2]) is None
    assert elementwise.per_sample_variance(torch.randn(4, 6, dtype=torch.float64)) is None


@DTYPES
def test_normalized_surrogate_sign_matches_autograd_through_the_formula(dtype, monkeypatch):
    """act_norm's forward and gradient (kernel variance, reused temporaries) against autograd through
    surrogate_sign(x / sqrt(var + eps)) with every kernel off, on an odd shape: the same values, bit for bit (bf16
    with torch's formulas)."""
    generator = torch.Generator().manual_seed(2)
    x = (1.5 * torch.randn(3, 5, 7, 6, generator=generator)).to(dtype)
    grad = torch.randn(3, 5, 7, 6, generator=generator).to(dtype)
    fast_leaf = x.clone().requires_grad_()
    with functional.formulas(bf16="torch"):  # the fused bf16 formulas: tests/test_act_norm_fused.py
        fast = functional.normalized_surrogate_sign(fast_leaf, functional.approx_sign_derivative, 1e-5)
    fast.backward(grad)
    monkeypatch.setattr(elementwise, "covered", lambda x: False)
    leaf = x.clone().requires_grad_()
    a0 = leaf / torch.sqrt(leaf.var(dim=(1, 2, 3), keepdim=True) + 1e-5)
    reference = functional.surrogate_sign(a0, functional.approx_sign_derivative)
    reference.backward(grad)
    assert identical(fast.detach(), reference.detach())
    assert identical(fast_leaf.grad, leaf.grad)


@pytest.mark.parametrize("into", [torch.float32, torch.bfloat16], ids=["to-fp32", "to-bf16"])
@DTYPES
def test_signs_packed_in_bits_unpack_to_the_same_values_shape_and_strides(dtype, into):
    generator = torch.Generator().manual_seed(3)
    for shape, memory_format in [((3, 5, 7, 3), torch.contiguous_format), ((2, 3, 5, 5), torch.channels_last), ((13,), None), ((0, 4), None)]:
        a = functional.sign(torch.randn(*shape, generator=generator)).to(dtype)
        if memory_format is not None:
            a = a.contiguous(memory_format=memory_format)
        packed = elementwise.pack_signs(a)
        assert packed is not None and packed.dtype == torch.uint8 and packed.numel() == (a.numel() + 7) // 8
        assert identical(elementwise.unpack_signs(packed, a.shape, a.stride(), into), a.to(into))
    assert elementwise.pack_signs(torch.ones(4, 6)[:, ::2]) is None


def test_the_conv_of_signs_keeps_one_bit_per_input_and_the_same_gradients():
    """The binary layer's conv saves a +-1 input it knows nothing of packed (8x less than int8) and gives F.conv2d's
    gradients bit for bit."""
    generator = torch.Generator().manual_seed(4)
    a = functional.sign(torch.randn(3, 4, 9, 7, generator=generator)).requires_grad_()
    weight = torch.randn(5, 4, 3, 3, generator=generator, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        out = functional.conv2d_of_signs(a, weight, None, (1, 1), (1, 1), (1, 1), 1)
    assert saved[0].dtype == torch.uint8 and saved[0].numel() == (a.numel() + 7) // 8
    grad = torch.randn(out.shape, generator=generator)
    fast = torch.autograd.grad(out, (a, weight), grad)
    reference = torch.autograd.grad(torch.nn.functional.conv2d(a, weight, None, 1, 1), (a, weight), grad)
    assert all(torch.equal(f, r) for f, r in zip(fast, reference))


@pytest.mark.parametrize("binarizer", ["sign", "shifted", "normalized"])
@pytest.mark.parametrize("changed", [None, "signs", "source"])
@DTYPES
def test_the_conv_of_a_binarizers_signs_keeps_its_input_and_the_same_gradients(binarizer, changed, dtype):
    """A binarizer's output is the sign of its input, which its own backward keeps: the conv keeps that input and
    makes the signs again (nothing packed), unless the signs or the input changed in place since (then it packs
    the signs as they are); the gradients are autograd's through F.conv2d, bit for bit, either way."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 9, 7, generator=generator).to(dtype).requires_grad_()
    shift = (0.3 * torch.randn(4, 1, 1, generator=generator)).requires_grad_()
    weight = torch.randn(5, 4, 3, 3, generator=generator).to(dtype).requires_grad_()
    grad = torch.randn(3, 5, 9, 7, generator=generator).to(dtype)

    def gradients(conv):
        source = x * 1  # a tensor of the graph that may change in place
        a = {
            "sign": lambda: functional.surrogate_sign(source, functional.approx_sign_derivative),
            "shifted": lambda: functional.surrogate_sign(source, functional.approx_sign_derivative, shift),
            "normalized": lambda: functional.normalized_surrogate_sign(source, functional.approx_sign_derivative, 1e-5),
        }[binarizer]()
        if changed == "signs":
            a = a.mul_(1)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
            out = conv(a, weight, None, (1, 1), (1, 1), (1, 1), 1)
        if changed == "source":
            with torch.no_grad():
                source.mul_(1)  # its values the same, its version not: the backward of the binarizer refuses it
        return saved, out, a

    saved, out, a = gradients(functional.conv2d_of_signs)
    packed = [t for t in saved if t.dtype == torch.uint8]
    assert (packed != []) == (changed == "signs")
    if changed == "source":
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(out, (x, weight), grad)
        return
    fast = torch.autograd.grad(out, (x, weight), grad)
    _, out, a = gradients(torch.nn.functional.conv2d)
    reference = torch.autograd.grad(out, (x, weight), grad)
    assert all(identical(f, r) for f, r in zip(fast, reference))
