"""The fused per-output-channel standardisation (bnnbench.standardize): its value and gradient against float64
autograd, where it runs (bf16 autocast with the fused formulas) and where torch's formula stays, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

import bnnbench
from bnnbench import standardize
from bnnbench.functional import formulas as chosen_formulas, per_output_variance
from bnnbench.layers import BinaryConv2d, takes_fused_formulas
from bnnbench.method import standardized

SHAPES = [(16, 16, 3, 3), (64, 32, 3, 3), (10, 7), (3, 2)]
VARIANTS = [(0.0, 1.0), (1e-5, 2 * math.sqrt(2))]  # IR-Net/RBNN's; ReCU's eps and gain


def weights(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (0.05 * torch.randn(shape, generator=generator) + 0.01).requires_grad_()


def float64_reference(w: torch.Tensor, g: torch.Tensor, eps: float, gain: float):
    w64 = w.detach().double().requires_grad_()
    dims = tuple(range(1, w.dim()))
    z = w64 - w64.mean(dim=dims, keepdim=True)
    y = gain * z / torch.sqrt(z.var(dim=dims, keepdim=True) + eps)
    (grad,) = torch.autograd.grad(y, w64, g.double())
    return y.detach(), grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("eps", "gain"), VARIANTS)
def test_value_and_gradient_are_float64s_rounded_once(shape, eps, gain):
    w, g = weights(shape), torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert standardize.fuses(w)
        y = standardize.standardized(w, eps, gain)
    (grad,) = torch.autograd.grad(y, w, g)
    y64, grad64 = float64_reference(w, g, eps, gain)
    assert y.dtype == grad.dtype == torch.float32
    assert torch.equal(y, y64.float())  # the float64 value rounded once: within half an ulp of the exact one
    # within float32 rounding of the terms' size, gain g / std (the gradient itself vanishes for 2 elements a row)
    terms = gain * g.abs().max() / w.detach().double().std(dim=tuple(range(1, w.dim()))).min()
    torch.testing.assert_close(grad.double(), grad64, rtol=0, atol=4e-7 * terms.item())


def test_it_is_more_exact_than_torchs_float32_formula():
    w = weights((64, 64, 3, 3))
    y64, _ = float64_reference(w, torch.ones_like(w), 0.0, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = standardized(w).detach()
    torchs = standardized(w).detach()  # outside autocast: torch's float32 operators
    assert (fused.double() - y64).abs().max() < (torchs.double() - y64).abs().max()


def test_an_untracked_weight_gets_the_forward_alone():
    w = weights((8, 4, 3, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tracked = standardized(w)
        with torch.no_grad():
            untracked = standardized(w)
        detached = standardized(w.detach())
    assert tracked.grad_fn is not None and untracked.grad_fn is None and detached.grad_fn is None
    assert torch.equal(tracked.detach(), untracked) and torch.equal(untracked, detached)


def test_non_finite_values_stay_in_their_row():
    w = weights((4, 3, 3, 3)).detach()
    w[1, 0, 0, 0] = float("nan")
    w[2, 1, 1, 1] = float("inf")
    w.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = standardized(w)
    (grad,) = torch.autograd.grad(y, w, torch.ones_like(w))
    assert y[1:3].isnan().all() and torch.isfinite(y[[0, 3]]).all()
    assert grad[1:3].isnan().all() and torch.isfinite(grad[[0, 3]]).all()


def test_torchs_formula_stays_in_float32_with_torchs_bf16_formulas_and_elsewhere():
    w = weights((16, 8, 3, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16), chosen_formulas(bf16="torch"):
        assert not standardize.fuses(w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not standardize.fuses(w.double())
        assert not standardize.fuses(w.transpose(0, 1))  # not contiguous
        assert not standardize.fuses(torch.randn(5, 1))  # one element per channel
    assert not standardize.fuses(w)  # no autocast
    centered = w - w.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.equal(standardized(w), centered / per_output_variance(centered, root=True))


@pytest.mark.parametrize(("method", "tolerance"), [("irnet", 1e-4), ("recu", 1e-4), ("lcr-irnet", 1e-4), ("rbnn", 2**-7)])
def test_the_methods_weights_take_it_under_bf16_and_stay_close_to_torchs_formulas(method, tolerance, monkeypatch):
    """IR-Net, RBNN (and their LCR variants) and ReCU standardise through it under bf16 autocast with the fused
    formulas: the same binary weights as with torch's formulas but where a standardised weight lies within rounding
    of the threshold, gradients within float32 rounding of torch's (RBNN's: bf16 rounding, its rotation is a
    bf16 matmul under autocast either way)."""
    layer = BinaryConv2d(16, 32, 3, method=bnnbench.get_method(method))
    ran = []
    forward = standardize._forward
    monkeypatch.setattr(standardize, "_forward", lambda *a: (ran.append(a), forward(*a))[1])
    results = {}
    for formulas in ("torch", "fused"):
        layer.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16), chosen_formulas(bf16=formulas):
            w = layer.forward_weight()
        w.float().backward(torch.randn(w.shape, generator=torch.Generator().manual_seed(2)))
        results[formulas] = (w.detach().float(), layer.weight.grad.clone())
        assert bool(ran) is (formulas == "fused")
    (w_torch, g_torch), (w_fused, g_fused) = results["torch"], results["fused"]
    assert (w_torch != w_fused).float().mean() < 0.01
    torch.testing.assert_close(g_fused, g_torch, rtol=tolerance, atol=tolerance * g_torch.abs().max().item())


def test_irnet_records_its_bf16_formulas():
    assert takes_fused_formulas(torch.nn.Sequential(BinaryConv2d(4, 4, 3, method="irnet")), torch.bfloat16)
