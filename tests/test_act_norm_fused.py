"""act_norm's fused backward (bnnbench.act_norm_fused): for bfloat16 activations the gradient of the formula, through
the division and the variance, within bfloat16's rounding of the float64 one, closer to it than torch's eager
bfloat16 formula; for float32 ones with the opt-in fused fp32 formulas within float32's; on every torch thread
count; a derivative given as a function gets the same; NaN propagates to its sample only; each dtype takes it
only with its fused formulas (bfloat16's default, float32's not: float32 keeps the bit-exact path by default)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnnbench import act_norm_fused, functional
from bnnbench.elementwise import r
from bnnbench.registry import get_method

EPS = 1e-5


def rbnn_like(x: torch.Tensor) -> torch.Tensor:
    """A surrogate without a registered formula (evaluated by torch on a0): 1 - |x| inside [-1, 1]."""
    return ((x.abs() <= 1).to(x.dtype) * (1 - x.abs())).to(x.dtype)


def _triangle(x: np.float32, peak: np.float32, slope: np.float32) -> np.float32:
    v = r(peak - r(slope * abs(x)))
    return np.float32(0.0) if v < np.float32(0.0) else v


triangle = functional.ParametrizedSurrogate(lambda x: (1.3 - 0.8 * x.abs()).clamp(min=0), _triangle, lambda: (1.3, 0.8))
"""A surrogate with parameters, as RBNN's is: evaluated in the sweep."""


def float64_gradient(x: torch.Tensor, grad: torch.Tensor, derivative) -> torch.Tensor:
    """d/dx of sum(g d(a0) a0) with d held constant: the surrogate's gradient through a0 = x / sqrt(var(x) + eps)."""
    xr = x.detach().double().requires_grad_(True)
    a0 = xr / torch.sqrt(xr.var(dim=tuple(range(1, x.dim())), keepdim=True) + EPS)
    (grad.double() * derivative(a0).detach() * a0).sum().backward()
    return xr.grad


def gradient(x: torch.Tensor, grad: torch.Tensor, derivative, fused: bool, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as patch:
        patch.setattr(act_norm_fused, "covers", act_norm_fused.covers if fused else (lambda x: False))
        xa = x.detach().clone().requires_grad_(True)
        functional.normalized_surrogate_sign(xa, derivative, EPS).backward(grad)
    return xa.grad


def float32_gradient(x: torch.Tensor, grad: torch.Tensor, derivative, formulas: str) -> torch.Tensor:
    """x's gradient of act_norm with float32's ``formulas``: the fused sweep or the bit-exact reproduction of torch's."""
    xa = x.detach().clone().requires_grad_(True)
    with functional.formulas(fp32=formulas):
        functional.normalized_surrogate_sign(xa, derivative, EPS).backward(grad)
    return xa.grad


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("derivative", [functional.approx_sign_derivative, rbnn_like, triangle], ids=["formula", "tensor", "parametrized"])
@pytest.mark.parametrize("shape", [(6, 16, 9, 9), (3, 5), (40, 64, 4, 4)])
def test_the_gradient_is_the_formulas_within_bf16_rounding_and_closer_than_eager_bf16(shape, derivative, count, threads, monkeypatch):
    generator = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=generator) * 3 + 0.5).bfloat16()
    grad = torch.randn(shape, generator=generator).bfloat16()
    threads(count)
    fused = gradient(x, grad, derivative, True, monkeypatch)
    eager = gradient(x, grad, derivative, False, monkeypatch)  # torch's bf16 formula, bit for bit
    want = float64_gradient(x, grad, derivative)
    assert fused.dtype == torch.bfloat16 and fused.shape == x.shape
    torch.testing.assert_close(fused.double(), want, rtol=2**-7, atol=2**-7 * want.abs().max().item())
    assert relative_error(fused, want) < 0.004  # about bfloat16's unit roundoff
    assert relative_error(fused, want) <= relative_error(eager, want)
    # the variance's term is in it: the division's alone is further from the result than the rounding
    root = torch.sqrt(x.double().var(dim=tuple(range(1, x.dim())), keepdim=True) + EPS)
    division_only = grad.double() * derivative(x.double() / root) / root
    assert relative_error(fused, division_only) > 1.5 * relative_error(fused, want)


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("derivative", [functional.approx_sign_derivative, rbnn_like, triangle], ids=["formula", "tensor", "parametrized"])
@pytest.mark.parametrize("shape", [(6, 16, 9, 9), (3, 5), (40, 64, 4, 4)])
def test_float32_with_fused_formulas_is_the_formula_within_float32_rounding(shape, derivative, count, threads):
    """The opt-in fused fp32 formulas: within float32's rounding of the float64 gradient (as torch's formula is, bit
    for bit reproduced by the default path), not equal to torch's (the sweep ran), the variance's term in it."""
    generator = torch.Generator().manual_seed(sum(shape) + 1)
    x = torch.randn(shape, generator=generator) * 3 + 0.5
    grad = torch.randn(shape, generator=generator)
    threads(count)
    fused = float32_gradient(x, grad, derivative, "fused")
    torchs = float32_gradient(x, grad, derivative, "torch")
    want = float64_gradient(x, grad, derivative)
    assert fused.dtype == torch.float32 and fused.shape == x.shape
    assert relative_error(fused, want) < 2e-6 and relative_error(torchs, want) < 2e-6
    torch.testing.assert_close(fused.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert not torch.equal(fused, torchs)
    root = torch.sqrt(x.double().var(dim=tuple(range(1, x.dim())), keepdim=True) + EPS)
    division_only = grad.double() * derivative(x.double() / root) / root
    assert relative_error(fused, division_only) > 100 * relative_error(fused, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_same_on_one_and_two_threads(dtype, threads, monkeypatch):
    generator = torch.Generator().manual_seed(3)
    x, grad = torch.randn(7, 3, 33, 33, generator=generator).to(dtype), torch.randn(7, 3, 33, 33, generator=generator).to(dtype)
    results = []
    for count in (1, 2):
        threads(count)
        with functional.formulas(bf16="fused", fp32="fused"):
            results.append(gradient(x, grad, functional.approx_sign_derivative, True, monkeypatch))
    assert torch.equal(*results)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_non_finite_sample_gives_nan_there_and_leaves_the_others(dtype, monkeypatch):
    x = torch.randn(3, 4, 5, 5).to(dtype)
    x[1, 2, 3, 4] = float("inf")
    grad = torch.randn(3, 4, 5, 5).to(dtype)
    with functional.formulas(fp32="fused"):
        got = gradient(x, grad, functional.approx_sign_derivative, True, monkeypatch)
    assert got[1].isnan().all()
    assert torch.isfinite(got[[0, 2]]).all()


def test_dense_bfloat16_and_float32_are_covered_and_the_forward_keeps_the_sign():
    x = torch.randn(2, 3, 4)
    assert act_norm_fused.covers(x) and act_norm_fused.covers(x.bfloat16()) and not act_norm_fused.covers(x.double())
    assert not act_norm_fused.covers(x.bfloat16().transpose(1, 2)) and not act_norm_fused.covers(x[:, :1, :1])
    for dtype in (torch.bfloat16, torch.float32):
        with functional.formulas(fp32="fused"):
            y = functional.normalized_surrogate_sign(x.to(dtype).requires_grad_(True), functional.approx_sign_derivative, EPS)
        assert torch.equal(y, torch.where(x.to(dtype) >= 0, 1.0, -1.0).to(dtype))


@pytest.mark.parametrize(
    "dtype, chosen, sweeps",
    [(torch.float32, None, False), (torch.float32, "fused", True), (torch.bfloat16, None, True), (torch.bfloat16, "torch", False)],
    ids=["fp32-default", "fp32-fused", "bf16-default", "bf16-torch"],
)
def test_a_dtype_takes_the_sweep_only_with_its_fused_formulas(dtype, chosen, sweeps, monkeypatch):
    calls = []
    sweep = act_norm_fused.backward
    monkeypatch.setattr(act_norm_fused, "backward", lambda *a, **k: calls.append(1) or sweep(*a, **k))
    xa = torch.randn(4, 3, 5, 5).to(dtype).requires_grad_(True)
    choice = {"bf16": chosen} if dtype == torch.bfloat16 else {"fp32": chosen}
    with functional.formulas(**choice):
        functional.normalized_surrogate_sign(xa, functional.approx_sign_derivative, EPS).backward(torch.randn(4, 3, 5, 5).to(dtype))
    assert bool(calls) is sweeps


def test_the_tensor_path_sweeps_the_moments_once_and_gets_what_the_kernel_would(monkeypatch):
    generator = torch.Generator().manual_seed(5)
    x, grad = (torch.randn(5, 8, 7, 7, generator=generator) * 2).bfloat16(), torch.randn(5, 8, 7, 7, generator=generator).bfloat16()
    calls = []
    sweep = act_norm_fused.moments
    monkeypatch.setattr(act_norm_fused, "moments", lambda *a: calls.append(1) or sweep(*a))
    got = gradient(x, grad, rbnn_like, True, monkeypatch)
    assert calls == [1]
    known = sweep(x, EPS)
    surrogate = rbnn_like(x.float() / act_norm_fused.roots(known, x))
    assert torch.equal(got, act_norm_fused.backward(x, grad, EPS, surrogate=surrogate))  # the kernel's own sweep of them


def test_a_parametrized_surrogate_is_evaluated_in_the_sweep_not_by_torch(monkeypatch):
    x, grad = torch.randn(4, 3, 6, 6).bfloat16(), torch.randn(4, 3, 6, 6).bfloat16()
    monkeypatch.setattr(act_norm_fused, "moments", lambda *a: pytest.fail("the tensor path ran"))
    xa = x.clone().requires_grad_(True)
    functional.normalized_surrogate_sign(xa, triangle, EPS).backward(grad)
    assert torch.isfinite(xa.grad).all() and xa.grad.abs().sum() > 0


@pytest.mark.parametrize("progress", [0.0, 0.4, 1.0, torch.tensor(0.75)], ids=["0", "0.4", "1", "tensor"])
def test_rbnn_activation_formula_is_its_surrogate_and_the_bf16_sweep_takes_it(progress, monkeypatch):
    method = get_method("rbnn")
    formula, parameters = method.activation_formula(progress)
    points = torch.linspace(-1.5, 1.5, 301)
    want = method.activation_derivative(points, progress)
    got = torch.tensor([float(formula(np.float32(v), *(np.float32(p) for p in parameters()))) for v in points.tolist()])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    generator = torch.Generator().manual_seed(9)
    x, grad = (torch.randn(6, 16, 8, 8, generator=generator) * 2).bfloat16(), torch.randn(6, 16, 8, 8, generator=generator).bfloat16()
    monkeypatch.setattr(act_norm_fused, "moments", lambda *a: pytest.fail("RBNN's surrogate went through the tensor path"))
    xa = x.clone().requires_grad_(True)
    method.activation(xa, progress=progress, normalize=EPS).backward(grad)
    monkeypatch.undo()
    want = float64_gradient(x, grad, lambda a: method.activation_derivative(a, progress))
    assert relative_error(xa.grad, want) < 0.004
