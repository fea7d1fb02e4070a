"""act_norm's float32 backward for bfloat16 activations (bnnbench.act_norm_bf16): the gradient of the formula, through
the division and the variance, within bfloat16's rounding of the float64 one, closer to it than torch's eager
bfloat16 formula, on every torch thread count; a derivative given as a function gets the same; NaN propagates
to its sample only; float32 keeps the bit-exact path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnnbench import act_norm_bf16, functional
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
        patch.setattr(act_norm_bf16, "covers", act_norm_bf16.covers if fused else (lambda x: False))
        xa = x.detach().clone().requires_grad_(True)
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


def test_the_same_on_one_and_two_threads(threads, monkeypatch):
    generator = torch.Generator().manual_seed(3)
    x, grad = torch.randn(7, 3, 33, 33, generator=generator).bfloat16(), torch.randn(7, 3, 33, 33, generator=generator).bfloat16()
    results = []
    for count in (1, 2):
        threads(count)
        results.append(gradient(x, grad, functional.approx_sign_derivative, True, monkeypatch))
    assert torch.equal(*results)


def test_a_non_finite_sample_gives_nan_there_and_leaves_the_others(monkeypatch):
    x = torch.randn(3, 4, 5, 5).bfloat16()
    x[1, 2, 3, 4] = float("inf")
    grad = torch.randn(3, 4, 5, 5).bfloat16()
    got = gradient(x, grad, functional.approx_sign_derivative, True, monkeypatch)
    assert got[1].isnan().all()
    assert torch.isfinite(got[[0, 2]]).all()


def test_only_bfloat16_takes_it_and_the_forward_keeps_the_sign():
    x = torch.randn(2, 3, 4)
    assert not act_norm_bf16.covers(x) and act_norm_bf16.covers(x.bfloat16())
    assert not act_norm_bf16.covers(x.bfloat16().transpose(1, 2)) and not act_norm_bf16.covers(x.bfloat16()[:, :1, :1])
    y = functional.normalized_surrogate_sign(x.bfloat16().requires_grad_(True), functional.approx_sign_derivative, EPS)
    assert torch.equal(y, torch.where(x.bfloat16() >= 0, 1.0, -1.0).bfloat16())


def test_the_tensor_path_sweeps_the_moments_once_and_gets_what_the_kernel_would(monkeypatch):
    generator = torch.Generator().manual_seed(5)
    x, grad = (torch.randn(5, 8, 7, 7, generator=generator) * 2).bfloat16(), torch.randn(5, 8, 7, 7, generator=generator).bfloat16()
    calls = []
    sweep = act_norm_bf16.moments
    monkeypatch.setattr(act_norm_bf16, "moments", lambda *a: calls.append(1) or sweep(*a))
    got = gradient(x, grad, rbnn_like, True, monkeypatch)
    assert calls == [1]
    known = sweep(x, EPS)
    surrogate = rbnn_like(x.float() / act_norm_bf16.roots(known, x))
    assert torch.equal(got, act_norm_bf16.backward(x, grad, EPS, surrogate=surrogate))  # the kernel's own sweep of them


def test_a_parametrized_surrogate_is_evaluated_in_the_sweep_not_by_torch(monkeypatch):
    x, grad = torch.randn(4, 3, 6, 6).bfloat16(), torch.randn(4, 3, 6, 6).bfloat16()
    monkeypatch.setattr(act_norm_bf16, "moments", lambda *a: pytest.fail("the tensor path ran"))
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
    monkeypatch.setattr(act_norm_bf16, "moments", lambda *a: pytest.fail("RBNN's surrogate went through the tensor path"))
    xa = x.clone().requires_grad_(True)
    method.activation(xa, progress=progress, normalize=EPS).backward(grad)
    monkeypatch.undo()
    want = float64_gradient(x, grad, lambda a: method.activation_derivative(a, progress))
    assert relative_error(xa.grad, want) < 0.004
