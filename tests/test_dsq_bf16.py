"""DSQ's soft quantizer backward on bfloat16 activations with the fused bf16 formulas (bnnbench.methods.dsq.
_fused_gradients): one float32 pass, within bfloat16's rounding of the float64 gradients to x, u and alpha;
its tanh (bnnbench.elementwise.tanh_float32) within a few float32 ulps; the same on one and two threads; the choice made in the forward's context.
torch's formulas (``formulas(bf16="torch")``) keep the bit-exact path (tests/test_fused_surrogates.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numba import njit

import bnnbench
import bnnbench.methods.dsq as dsq
from bnnbench.elementwise import tanh_float32
from bnnbench.functional import formulas as chosen_formulas


@njit
def _tanh_of(z, out):
    for i in range(z.size):
        out[i] = tanh_float32(z[i])


def test_the_float32_tanh_is_within_a_few_ulps():
    z = np.concatenate([np.linspace(-12, 12, 100001, dtype=np.float32), np.array([0.0, -0.0, 1e-30, -1e-8, 7.9, 8.0, 1e4, np.inf, -np.inf], np.float32)])
    out = np.empty_like(z)
    _tanh_of(z, out)
    want = np.tanh(z.astype(np.float64))
    ulps = np.abs(out - want) / np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    assert ulps.max() <= 8
    assert np.all(np.abs(out) <= 1) and out[-2] == 1 and out[-1] == -1


def gradients(x: torch.Tensor, grad: torch.Tensor, u: float, alpha: float, formulas: str | None) -> tuple[torch.Tensor, ...]:
    """(out, to x, to u, to alpha) of DSQ's activation; formulas None: float64 autograd through the formula."""
    method = bnnbench.get_method("dsq")
    dtype = torch.float64 if formulas is None else x.dtype
    leaf = x.to(dtype).clone().requires_grad_()
    lu, la = torch.tensor(u, requires_grad=True, dtype=dtype), torch.tensor(alpha, requires_grad=True, dtype=dtype)
    with chosen_formulas(bf16=formulas or "torch"):
        out = method.activation(leaf, 0.5, u=lu, alpha=la)
    out.backward(grad.to(dtype))  # outside the context: the forward chose
    return out.detach(), leaf.grad, lu.grad, la.grad


def inputs(seed: int, shape=(16, 8, 9, 9)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * 0.9).bfloat16()
    x.view(-1)[::11] = 1.0  # at the clipping value
    return x, torch.randn(shape, generator=generator).bfloat16()


def float64_gradients(x: torch.Tensor, grad: torch.Tensor, scalars: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    """Autograd in float64 through s tanh(k clip(x, -u, u)) (clip as ``inclusive_clip``, -u its own leaf), to x, u,
    -u, s and k: the kernel's gradients, exactly."""
    leaves = [x.double().requires_grad_()] + [torch.tensor(float(v), dtype=torch.float64, requires_grad=True) for v in scalars]
    lx, lu, ln, ls, lk = leaves
    soft = ls * torch.tanh(lk * torch.where(lx.abs() <= lu, lx, torch.where(lx >= 0, lu, ln)))
    return torch.autograd.grad(soft, leaves, grad.double())


@pytest.mark.parametrize("u, alpha", [(1.0, 0.2), (0.37, 0.99), (2.5, 1e-4), (0.8, 0.55)])
def test_the_kernels_gradients_are_the_formulas_within_rounding(u, alpha):
    """To x within bfloat16's rounding, to u, -u, s and k (float32 sums) within float32's, at the scalars a bfloat16
    layer computes with (s and k from u and alpha in bfloat16, as autograd builds them)."""
    x, grad = inputs(int(100 * u))
    bu, balpha = torch.tensor(u).bfloat16(), torch.tensor(alpha).bfloat16()
    s_, k_ = dsq.soft_quantizer_scales(bu, balpha)
    scalars = tuple(np.float32(float(v)) for v in (bu, -bu, s_, k_))
    got = dsq._fused_gradients(x, grad, scalars)
    want = float64_gradients(x, grad, scalars)
    assert got[0].dtype == torch.bfloat16
    torch.testing.assert_close(got[0].double(), want[0], rtol=2**-8, atol=2**-9 * want[0].abs().max().item())
    scale = (grad.double().abs() * x.double().abs().clamp(min=1)).sum().item()  # how large a sum's terms are
    for g, w in zip(got[1:], want[1:]):  # each rounded once to the scalar's bfloat16 at the end
        assert abs(g.double().item() - w.item()) <= 2**-8 * abs(w.item()) + 1e-5 * scale


def test_the_method_takes_it_under_the_fused_formulas_no_further_from_float64_than_torchs():
    x, grad = inputs(7)
    fused = gradients(x, grad, 1.0, 0.2, "fused")
    eager = gradients(x, grad, 1.0, 0.2, "torch")
    bu, balpha = torch.tensor(1.0).bfloat16(), torch.tensor(0.2).bfloat16()
    s_, k_ = dsq.soft_quantizer_scales(bu, balpha)
    want = float64_gradients(x, grad, (bu, -bu, s_, k_))[0]
    assert torch.equal(fused[0], eager[0])  # the forward: sign(x)
    assert (fused[1].double() - want).norm() <= (eager[1].double() - want).norm()


def test_the_same_on_one_and_two_threads(threads):
    x, grad = inputs(3, (7, 3, 5, 5))
    results = []
    for count in (1, 2):
        threads(count)
        results.append(gradients(x, grad, 1.0, 0.2, "fused"))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_torchs_formulas_take_the_bit_exact_path_and_differ_from_the_fused(monkeypatch):
    x, grad = inputs(5)
    calls = []
    monkeypatch.setattr(dsq, "_fused_gradients", lambda *a: calls.append(1) or pytest.fail("fused under torch's formulas"))
    torch_grads = gradients(x, grad, 1.0, 0.2, "torch")
    monkeypatch.undo()
    fused = gradients(x, grad, 1.0, 0.2, "fused")
    assert not calls and not torch.equal(torch_grads[1], fused[1])


@pytest.mark.parametrize("u, alpha", [(1.0, 0.2), (0.37, 0.99), (2.5, 1e-4)])
def test_float32_with_fused_formulas_is_the_formula_within_float32_rounding(u, alpha, threads, monkeypatch):
    """--fp32-formulas fused: a float32 x takes the one-pass kernel too (its tanh within a few ulps), its gradients
    within float32's rounding of the float64 formula's, the same on 1 and 2 threads; torch's formulas (the default)
    do not take it."""
    x, grad = (t.float() for t in inputs(int(100 * u) + 1))
    s_, k_ = dsq.soft_quantizer_scales(torch.tensor(u), torch.tensor(alpha))
    scalars = tuple(np.float32(float(v)) for v in (u, -u, s_, k_))
    results = []
    for count in (1, 2):
        threads(count)
        results.append(dsq._fused_gradients(x, grad, scalars))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    got, want = results[0], float64_gradients(x, grad, scalars)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-6 * want[0].abs().max().item())
    scale = (grad.double().abs() * x.double().abs().clamp(min=1)).sum().item()
    for g, w in zip(got[1:], want[1:]):
        assert abs(g.double().item() - w.item()) <= 1e-5 * abs(w.item()) + 1e-6 * scale
    calls = []
    kernel = dsq._fused_gradients
    monkeypatch.setattr(dsq, "_fused_gradients", lambda *a: calls.append(1) or kernel(*a))
    for chosen in ("torch", "fused"):
        leaf = x.clone().requires_grad_()
        with chosen_formulas(fp32=chosen):
            out = bnnbench.get_method("dsq").activation(leaf, 0.5, u=torch.tensor(u, requires_grad=True), alpha=torch.tensor(alpha, requires_grad=True))
        out.backward(grad)
        assert len(calls) == (chosen == "fused")
