"""Fidelity of the required binarizers (SPEC section 1), element by element.

Every reference below is written independently of the package: scalar Python
formulas applied element-wise (``elementwise``), or a closed-form gradient.
Tensors are float64 so that the kinks (|x| = 0.1, 1, t = 1.5) are exact.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import bnnbench
from bnnbench import BinaryConv2d, BinaryLinear, build_model, functional, get_method, list_methods, registry
from bnnbench.cli import main as cli_main

REQUIRED = ["sign-ste", "clip-ste", "polynomial", "reste", "recu", "biper"]
PROGRESS = [0.0, 0.5, 1.0]
STAGES = [1, 2]
DTYPE = torch.float64

# values at and next to every kink of the required surrogates, plus exact zeros
KINKS = [0.0, 0.0, -0.0, 1e-9, -1e-9, 0.1, -0.1, 0.1 - 1e-9, 0.1 + 1e-9, -0.1 - 1e-9, 0.5, -0.5,
         1.0, -1.0, 1 - 1e-9, 1 + 1e-9, -1 + 1e-9, -1 - 1e-9, 1.5, -1.5, 1.5 - 1e-9, 1.5 + 1e-9, -1.5 - 1e-9, 2.0, -3.0]


def kink_tensor(shape: tuple[int, ...] = (4, 3, 3, 3), seed: int = 0) -> torch.Tensor:
    """Random N(0, 1.5^2) values with the kink values written over the first entries."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=DTYPE) * 1.5
    flat = x.view(-1)
    flat[: len(KINKS)] = torch.tensor(KINKS, dtype=DTYPE)
    return x


def random_like(x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=gen, dtype=x.dtype)


def elementwise(fn: Callable[[float], float], x: torch.Tensor) -> torch.Tensor:
    """Apply a scalar Python function to every element."""
    return torch.tensor([fn(v) for v in x.detach().reshape(-1).tolist()], dtype=x.dtype).view(x.shape)


def sign_scalar(v: float) -> float:
    return 1.0 if v >= 0 else -1.0


# ---------------------------------------------------------------- scalar surrogates (SPEC table)
def ste(v: float) -> float:
    return 1.0


def clip(v: float) -> float:
    return 1.0 if abs(v) <= 1 else 0.0


def approx_sign(v: float) -> float:
    """Bi-Real ApproxSign: 2 + 2v on [-1, 0), 2 - 2v on [0, 1), 0 elsewhere."""
    if -1 <= v < 0:
        return 2 + 2 * v
    if 0 <= v < 1:
        return 2 - 2 * v
    return 0.0


def reste_o(p: float, o_end: float = 3.0) -> float:
    return 1 + (o_end - 1) * (1 - math.cos(math.pi * p / 2))


def reste_surrogate(p: float, t: float = 1.5) -> Callable[[float], float]:
    o = reste_o(p)

    def d(v: float) -> float:
        a = abs(v)
        if a <= 0.1:
            return 0.1 ** (1 / o) / 0.1
        if a <= t:
            return (1 / o) * a ** ((1 - o) / o)
        return 0.0

    return d


def recu_tau(p: float) -> float:
    a = (0.99 - 0.85) / (math.e - 1)
    return a * math.exp(p) + 0.85 - a


def weight_and_grad(method_name: str, w: torch.Tensor, progress: float, stage: int, **hparams):
    """Forward value, upstream gradient g and d<out, g>/dw of ``method.weight``."""
    method = get_method(method_name, **hparams)
    w = w.clone().requires_grad_(True)
    out = method.weight(w, progress=progress, stage=stage)
    g = random_like(out)
    out.backward(g)
    return out.detach(), g, w.grad


def activation_and_grad(method_name: str, a: torch.Tensor, progress: float):
    method = get_method(method_name)
    a = a.clone().requires_grad_(True)
    out = method.activation(a, progress=progress)
    g = random_like(out, seed=2)
    out.backward(g)
    return out.detach(), g, a.grad


def assert_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


# ====================================================================== weights
SIGN_FAMILY_WEIGHT = {"sign-ste": ste, "clip-ste": clip, "polynomial": approx_sign}


@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", list(SIGN_FAMILY_WEIGHT))
def test_sign_family_weight(name: str, stage: int, progress: float) -> None:
    w = kink_tensor()
    out, g, grad = weight_and_grad(name, w, progress, stage)
    if stage == 1:  # real weights while only the activations are binary
        assert_exact(out, w)
        assert_exact(grad, g)
        return
    assert_exact(out, elementwise(sign_scalar, w))
    assert_close(grad, g * elementwise(SIGN_FAMILY_WEIGHT[name], w))


def test_sign_of_zero_is_plus_one() -> None:
    w = torch.tensor([0.0, -0.0, 1e-30, -1e-30], dtype=DTYPE)
    for name in REQUIRED:
        method = get_method(name)
        a_out = method.activation(w.clone(), progress=0.0)
        assert a_out.tolist() == [1.0, 1.0, 1.0, -1.0], name
    assert bnnbench.sign(w).tolist() == [1.0, 1.0, 1.0, -1.0]


@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize("stage", STAGES)
def test_reste_weight(stage: int, progress: float) -> None:
    w = kink_tensor()
    out, g, grad = weight_and_grad("reste", w, progress, stage)
    if stage == 1:
        assert_exact(out, w)
        assert_exact(grad, g)
        return
    n = w.numel()
    scale = sum(abs(v) for v in w.reshape(-1).tolist()) / n
    signs = elementwise(sign_scalar, w)
    assert_close(out, signs * scale)
    # the layer scale mean|w| is not detached: out_i = sign(w_i) s(w), s = mean|w|
    # d<g, out>/dw_j = g_j s D(w_j) + (sum_i g_i sign(w_i)) d s / d w_j,  ds/dw_j = sgn(w_j)/n
    # (autograd's d|w|/dw is 0 at w = 0)
    torch_sgn = elementwise(lambda v: (v > 0) - (v < 0), w)
    expected = g * scale * elementwise(reste_surrogate(progress), w) + (g * signs).sum() * torch_sgn / n
    assert_close(grad, expected)


def test_reste_scale_gradient_is_present() -> None:
    """A detached scale would drop the second term above: check it is really there."""
    w = kink_tensor()
    _, g, grad = weight_and_grad("reste", w, 1.0, 2)
    scale = w.abs().mean()
    detached = g * scale * elementwise(reste_surrogate(1.0), w)
    assert (grad - detached).abs().max() > 1e-3


def recu_reference(w: torch.Tensor, progress: float, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and closed-form gradient of ReCU's weight (SPEC section 1), per output channel.

    z = w - mean_c(w); sigma = sqrt(V + eps), V = sum z^2 / (n - 1); z1 = c z / sigma, c = 2 sqrt 2;
    Q = -mean|z1| ln(2 - 2 tau) over the layer (constant); out = sign(clamp(z1, -Q, Q)).
    Backward: v = g 1{|z1| <= Q};  dz: c (v / sigma - z (v.z) / (sigma^3 (n - 1)));
    dw = dz - mean_c(dz).
    """
    c = 2 * math.sqrt(2)
    channels = w.reshape(w.shape[0], -1)
    gc = g.reshape(w.shape[0], -1)
    n = channels.shape[1]
    z = channels - channels.sum(dim=1, keepdim=True) / n
    sigma = torch.sqrt((z * z).sum(dim=1, keepdim=True) / (n - 1) + 1e-5)
    z1 = c * z / sigma
    q = -z1.abs().mean() * math.log(2 - 2 * recu_tau(progress))
    forward = elementwise(sign_scalar, torch.clamp(z1, -q, q))
    v = gc * (z1.abs() <= q).to(DTYPE)
    dz = c * (v / sigma - z * (v * z).sum(dim=1, keepdim=True) / (sigma**3 * (n - 1)))
    dw = dz - dz.sum(dim=1, keepdim=True) / n
    return forward.view(w.shape), dw.view(w.shape)


def recu_weights() -> torch.Tensor:
    """Kink tensor whose first channel holds small integers with mean exactly 0 (so z1 = 0 occurs)."""
    w = kink_tensor()
    w[0] = torch.tensor([0.0] + [s * k for k in range(1, 14) for s in (1, -1)], dtype=DTYPE).view(3, 3, 3)
    assert w[0].sum() == 0
    return w


@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize("stage", STAGES)
def test_recu_weight(stage: int, progress: float) -> None:
    w = recu_weights()
    out, g, grad = weight_and_grad("recu", w, progress, stage)
    if stage == 1:
        assert_exact(out, w)
        assert_exact(grad, g)
        return
    ref_out, ref_grad = recu_reference(w, progress, g)
    assert_exact(out, ref_out)
    assert out[0].view(-1)[0] == 1.0  # z1 = 0 exactly: sign(0) = +1
    assert_close(grad, ref_grad)


def test_recu_clamped_weights_get_zero_gradient() -> None:
    w = recu_weights()
    w[1, 0, 0, 0] = 40.0  # an outlier far beyond Q
    _, g, grad = weight_and_grad("recu", w, 0.0, 2)
    method = get_method("recu")
    z1 = method.standardize(w)
    q = method.threshold(z1, 0.0)
    clamped = z1.abs() > q
    assert clamped[1, 0, 0, 0] and clamped.sum() > 5
    _, ref_grad = recu_reference(w, 0.0, g)
    assert_close(grad, ref_grad)
    # an upstream gradient on the clamped outputs only reaches no latent weight at all
    w_leaf = w.clone().requires_grad_(True)
    method.weight(w_leaf, progress=0.0, stage=2).backward(torch.where(clamped, g, torch.zeros_like(g)))
    assert w_leaf.grad.abs().max() == 0


def test_invalid_stage_is_rejected() -> None:
    with pytest.raises(ValueError, match="stage must be 1"):
        get_method("biper").weight(kink_tensor(), stage=3)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("w0", [20.0, 5.0])
def test_biper_weight(stage: int, w0: float) -> None:
    w = kink_tensor() * 0.2
    out, g, grad = weight_and_grad("biper", w, 0.5, stage, w0=w0)
    sine = elementwise(lambda v: math.sin(w0 * v), w)
    expected_out = sine if stage == 1 else elementwise(sign_scalar, sine)  # Eq. 10 / Eq. 8
    assert_close(out, expected_out)
    assert_close(grad, g * elementwise(lambda v: w0 * math.cos(w0 * v), w))  # Eq. 9, both stages


def test_biper_zero_weight_is_plus_one() -> None:
    w = torch.tensor([0.0, math.pi / 20 * 1.5, -math.pi / 20 * 0.5], dtype=DTYPE)
    out = get_method("biper").weight(w, stage=2)
    assert out.tolist() == [1.0, -1.0, -1.0]


@pytest.mark.parametrize("stage", STAGES)
def test_biper_without_periodic_function(stage: int) -> None:
    w = kink_tensor()
    out, g, grad = weight_and_grad("biper", w, 0.0, stage, periodic=False)
    assert_exact(out, w if stage == 1 else elementwise(sign_scalar, w))
    assert_exact(grad, g)
    assert get_method("biper", periodic=False).regularizer(w, stage) is None


@pytest.mark.parametrize("stage,tau", [(1, 0.037), (2, 0.0468)])
def test_biper_regularizer(stage: int, tau: float) -> None:
    w0 = 20.0
    w = kink_tensor().requires_grad_(True)
    reg = get_method("biper").regularizer(w, stage)
    values = [math.sin(w0 * v) ** 2 for v in w.detach().reshape(-1).tolist()]
    assert reg.item() == pytest.approx(tau * sum(values) / len(values), rel=1e-12)
    reg.backward()
    # d/dw tau mean(sin^2(w0 w)) = tau 2 sin(w0 w) cos(w0 w) w0 / N
    expected = elementwise(lambda v: tau * 2 * math.sin(w0 * v) * math.cos(w0 * v) * w0 / w.numel(), w)
    assert_close(w.grad, expected)


@pytest.mark.parametrize("stage", STAGES)
def test_fp_is_identity(stage: int) -> None:
    w = kink_tensor()
    out, g, grad = weight_and_grad("fp", w, 0.5, stage)
    assert_exact(out, w)
    assert_exact(grad, g)
    out, g, grad = activation_and_grad("fp", w, 0.5)
    assert_exact(out, w)
    assert_exact(grad, g)


# ================================================================== activations
@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize(
    "name,surrogate",
    [
        ("sign-ste", lambda p: ste),
        ("clip-ste", lambda p: clip),
        ("polynomial", lambda p: approx_sign),
        ("reste", reste_surrogate),
        ("recu", lambda p: approx_sign),
        ("biper", lambda p: approx_sign),
    ],
)
def test_activation(name: str, surrogate, progress: float) -> None:
    a = kink_tensor((2, 3, 4, 5))
    out, g, grad = activation_and_grad(name, a, progress)
    assert_exact(out, elementwise(sign_scalar, a))
    assert_close(grad, g * elementwise(surrogate(progress), a))


# ==================================================================== schedules
def test_reste_schedule_values() -> None:
    method = get_method("reste")
    assert method.o(0.0) == 1.0
    assert method.o(0.5) == pytest.approx(1 + 2 * (1 - math.cos(math.pi / 4)), rel=1e-12)
    assert method.o(1.0) == pytest.approx(3.0, rel=1e-12)
    assert method.schedule(0.5) == {"o": method.o(0.5)}


def test_recu_schedule_values() -> None:
    method = get_method("recu")
    assert method.tau(0.0) == pytest.approx(0.85, rel=1e-12)
    assert method.tau(1.0) == pytest.approx(0.99, rel=1e-12)
    a = 0.14 / (math.e - 1)
    assert method.tau(0.5) == pytest.approx(a * math.exp(0.5) + 0.85 - a, rel=1e-12)
    assert method.schedule(0.5) == {"tau": method.tau(0.5)}


def test_reste_schedule_changes_backward() -> None:
    w = kink_tensor()
    _, _, grad_a0 = activation_and_grad("reste", w, 0.0)
    _, g, grad_a1 = activation_and_grad("reste", w, 1.0)
    # p = 0: o = 1, the estimator is the STE clipped at t = 1.5
    assert_close(grad_a0, g * elementwise(lambda v: 1.0 if abs(v) <= 1.5 else 0.0, w))
    assert (grad_a0 - grad_a1).abs().max() > 0.1
    _, _, grad_w0 = weight_and_grad("reste", w, 0.0, 2)
    _, _, grad_w1 = weight_and_grad("reste", w, 1.0, 2)
    assert (grad_w0 - grad_w1).abs().max() > 0.1


def test_recu_schedule_changes_backward_not_forward() -> None:
    w = recu_weights()
    out0, _, grad0 = weight_and_grad("recu", w, 0.0, 2)
    out1, _, grad1 = weight_and_grad("recu", w, 1.0, 2)
    assert_exact(out0, out1)  # clamping at +-Q never flips a sign
    assert (grad0 - grad1).abs().max() > 1e-3


# ================================================================== layer level
def reference_sign_approx(x: torch.Tensor) -> torch.Tensor:
    """sign(x) forward whose autograd derivative is Bi-Real's polynomial's: max(0, 2 - 2|x|)."""
    poly = torch.where(
        x < -1, -torch.ones_like(x), torch.where(x < 0, 2 * x + x * x, torch.where(x < 1, 2 * x - x * x, torch.ones_like(x)))
    )
    return torch.where(x >= 0, 1.0, -1.0).to(x).detach() + (poly - poly.detach())


@pytest.mark.parametrize("name", ["biper", "recu"])
def test_learned_alpha_scales_conv_output(name: str) -> None:
    torch.manual_seed(0)
    layer = BinaryConv2d(3, 4, 3, padding=1, method=name).to(DTYPE).eval()
    assert layer.alpha.shape == (4, 1, 1)
    x = torch.randn(2, 3, 6, 6, dtype=DTYPE)
    y = layer(x)
    method = get_method(name)
    w_b = method.weight(layer.weight.detach(), progress=0.0, stage=2)
    plain = F.conv2d(torch.where(x >= 0, 1.0, -1.0).to(DTYPE), w_b, padding=1)
    assert_close(y.detach(), plain * layer.alpha.detach())
    g = random_like(y)
    y.backward(g)
    # d<g, y>/d alpha_c = sum_{n,h,w} g * conv output
    assert_close(layer.alpha.grad, (g * plain).sum(dim=(0, 2, 3)).view(4, 1, 1))


@pytest.mark.parametrize("stage", [2, 1])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_learned_alpha_folds_into_the_weight_under_bf16_autocast(kind: str, stage: int) -> None:
    """Under bf16 autocast y = conv(a_b, w_b * alpha): in stage 2 bit for bit the exact y alpha rounded once to bfloat16
    (+-alpha products, integer multiples of alpha summed exactly in float32); alpha's, the weight's and the input's
    gradients within bfloat16's error of the float64 formula, as close to it as the output-scaling path's (within 10%)."""
    torch.manual_seed(0)
    if kind == "conv":
        layer = BinaryConv2d(64, 16, 3, padding=1, method="biper", stage=stage, act_norm=False)
        x = torch.randn(4, 64, 6, 6)
        ref_op, dims = (lambda a, w: F.conv2d(a, w, padding=1)), (0, 2, 3)
    else:
        layer = BinaryLinear(300, 16, method="biper", stage=stage, act_norm=False)
        x = torch.randn(8, 300)
        ref_op, dims = F.linear, (0,)
    g = torch.randn_like(ref_op(x, layer.weight.detach()))

    def run(fold: bool):
        layer.zero_grad()
        if not fold:
            layer.scale_placement = lambda x: "output"
        xa = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert (layer.scale_placement(xa) == "weight") is fold
            y = layer(xa)
        y.float().backward(g)
        if not fold:
            del layer.scale_placement
        return y, xa.grad, layer.alpha.grad.clone(), layer.weight.grad.clone()

    folded, plain = run(True), run(False)
    # float64 formula of the same bfloat16 operands: a_b, w_b and alpha as the layer casts them
    a = torch.where(x >= 0, 1.0, -1.0).double()
    weight = layer.weight.detach().double().requires_grad_(True)
    w = get_method("biper").weight(weight, stage=stage)
    alpha = layer.alpha.detach().bfloat16().double().requires_grad_(True)
    shape = (-1,) + (1,) * (len(dims) - 1) if kind == "conv" else (-1,)
    y_ref = ref_op(a, w) * alpha.view(shape)
    y_ref.backward(g.double())
    assert folded[0].dtype == torch.bfloat16
    if stage == 2:
        assert torch.equal(folded[0], y_ref.detach().float().bfloat16())
    for got, want in ((folded[0], y_ref), (folded[2], alpha.grad), (folded[3], weight.grad)):
        want = want.detach()
        torch.testing.assert_close(got.double().view_as(want), want, rtol=0.02, atol=0.02 * want.abs().max().item())
    error = [((got.double().view_as(want) - want).norm() / want.norm()).item() for got, want in ((folded[0], y_ref.detach()), (folded[2], alpha.grad))]
    error_plain = [((got.double().view_as(want) - want).norm() / want.norm()).item() for got, want in ((plain[0], y_ref.detach()), (plain[2], alpha.grad))]
    assert all(e <= 1.1 * p for e, p in zip(error, error_plain)), (error, error_plain)
    x32 = x.clone().requires_grad_(True)
    assert layer.scale_placement(x32) == "output"  # float32: the product of the output, the reference formulas' numbers


@pytest.mark.parametrize("stage", [2, 1])
def test_float32s_fused_formulas_scale_in_the_conv_keeping_the_forward(stage: int) -> None:
    """Float32 with the fused formulas: the conv multiplies its own output by alpha (the forward bit for bit the
    output-scaling path's: an exact stage-2 zero stays 0) and folds alpha into its backward's weight: the weight's
    and alpha's gradients within float32's rounding of the float64 formula, the input's of torch's.  A linear layer, torch's
    formulas and a layer with bias keep the product of the output; bfloat16's fused formulas fold into the weight."""
    torch.manual_seed(0)
    layer = BinaryConv2d(64, 16, 3, padding=1, method="biper", stage=stage, act_norm=False)
    x, g = torch.randn(4, 64, 6, 6), torch.randn(4, 16, 6, 6)

    def run(formulas: str):
        layer.zero_grad()
        xa = x.clone().requires_grad_(True)
        with functional.formulas(fp32=formulas):
            assert layer.scale_placement(xa) == ("conv" if formulas == "fused" else "output")
            y = layer(xa)
        y.backward(g)
        return y.detach(), xa.grad, layer.weight.grad.clone(), layer.alpha.grad.clone()

    fused, torchs = run("fused"), run("torch")
    assert torch.equal(fused[0], torchs[0])
    a = torch.where(x >= 0, 1.0, -1.0).double()
    weight = layer.weight.detach().double().requires_grad_(True)
    alpha = layer.alpha.detach().double().requires_grad_(True)
    (F.conv2d(a, get_method("biper").weight(weight, stage=stage), padding=1) * alpha).backward(g.double())
    # the input's: torch's formulas through the binarizer's surrogate (the reference, bit for bit) as the measure
    for got, want in zip(fused[1:], (torchs[1].double(), weight.grad, alpha.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    with functional.formulas(fp32="fused"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer.scale_placement(x) == "weight"
        with functional.formulas(bf16="torch"), torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer.scale_placement(x) == "output"
        assert BinaryLinear(8, 4, method="biper").scale_placement(torch.randn(2, 8)) == "output"
        assert BinaryConv2d(8, 4, 3, method="biper", bias=True).scale_placement(torch.randn(2, 8, 5, 5)) == "output"


def test_act_norm_backward_matches_autograd_reference() -> None:
    torch.manual_seed(0)
    layer = BinaryConv2d(3, 4, 3, padding=1, method="biper").to(DTYPE)
    assert layer.act_norm  # BiPer's default (upstream)
    x = torch.randn(2, 3, 5, 5, dtype=DTYPE) * 3.0
    w_b = get_method("biper").weight(layer.weight.detach(), stage=2)
    alpha = layer.alpha.detach()

    def run(train: bool, normalise: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        layer.train(train)
        xa = x.clone().requires_grad_(True)
        y = layer(xa)
        g = random_like(y)
        y.backward(g)
        xr = x.clone().requires_grad_(True)
        a0 = xr / torch.sqrt(xr.var(dim=(1, 2, 3), keepdim=True) + 1e-5) if normalise else xr
        y_ref = F.conv2d(reference_sign_approx(a0), w_b, padding=1) * alpha
        y_ref.backward(g)
        return y.detach(), y_ref.detach(), xa.grad, xr.grad

    y, y_ref, grad, grad_ref = run(train=True, normalise=True)
    assert_close(y, y_ref)  # forward: sign(a0) = sign(a)
    assert_close(grad, grad_ref)
    # the variance path matters: without it the gradient differs
    _, _, _, grad_no_var = run(train=True, normalise=False)
    assert (grad - grad_no_var).abs().max() > 1e-3
    # evaluation mode: no normalisation
    y, y_ref, grad, grad_ref = run(train=False, normalise=False)
    assert_close(y, y_ref)
    assert_close(grad, grad_ref)


def test_act_norm_off_uses_raw_input() -> None:
    torch.manual_seed(0)
    layer = BinaryConv2d(3, 4, 3, padding=1, method="biper", act_norm=False).to(DTYPE).train()
    x = (torch.randn(2, 3, 5, 5, dtype=DTYPE) * 0.4).requires_grad_(True)
    w_b = get_method("biper").weight(layer.weight.detach(), stage=2)
    y = layer(x)
    g = random_like(y)
    y.backward(g)
    xr = x.detach().clone().requires_grad_(True)
    (F.conv2d(reference_sign_approx(xr), w_b, padding=1) * layer.alpha.detach()).backward(g)
    assert_close(x.grad, xr.grad)


# ===================================================================== registry
def test_every_required_method_is_registered() -> None:
    names = list_methods()
    for name in REQUIRED + ["fp"]:
        assert name in names


def test_unknown_method_lists_valid_names() -> None:
    with pytest.raises(KeyError) as info:
        get_method("biperr")
    message = str(info.value)
    assert "unknown method 'biperr'" in message
    for name in REQUIRED + ["fp"]:
        assert name in message


def test_unknown_hparam_lists_valid_ones() -> None:
    with pytest.raises(TypeError) as info:
        get_method("biper", omega=3)
    message = str(info.value)
    assert "'omega'" in message and "w0=20.0" in message and "periodic=True" in message


def test_string_hparams_are_coerced() -> None:
    method = get_method("biper", w0="10", periodic="false", reg_tau_stage1="0")
    assert method.w0 == 10.0 and isinstance(method.w0, float)
    assert method.periodic is False
    assert method.reg_tau_stage1 == 0.0
    assert get_method("reste", o_end="2.5").o(1.0) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="periodic='maybe' is not a valid bool"):
        get_method("biper", periodic="maybe")
    with pytest.raises(ValueError, match="w0='fast' is not a valid float"):
        get_method("biper", w0="fast")


PLUGIN_NAME = "test-plugin-tanh"
PLUGIN_SOURCE = f'''
from __future__ import annotations

from dataclasses import dataclass

import torch

from bnnbench import Method, register_method


@register_method("{PLUGIN_NAME}")
@dataclass
class TanhSurrogate(Method):
    """sign forward, beta (1 - tanh^2(beta w)) backward."""

    beta: float = 2.0
    weight_backward = "beta (1 - tanh^2(beta w))"

    def weight_derivative(self, x, progress):
        return self.beta * (1 - torch.tanh(self.beta * x) ** 2)
'''


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch):
    """A private copy of the method table, so plugins registered here do not leak."""
    list_methods()  # load the built-ins before copying
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setenv("COLUMNS", "400")  # rich must not fold the method names
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("bnnbench_plugin_"):
            del sys.modules[name]


def write_plugin(tmp_path: Path) -> Path:
    path = tmp_path / "tanh_plugin.py"
    path.write_text(PLUGIN_SOURCE)
    return path


def test_cli_plugin_registers_method_in_process(tmp_path: Path, isolated_registry, capsys) -> None:
    path = write_plugin(tmp_path)
    assert PLUGIN_NAME not in list_methods()
    assert cli_main(["--plugin", str(path), "list", "--formulas"]) == 0
    out = capsys.readouterr().out
    assert PLUGIN_NAME in out and "beta=2.0" in out
    assert PLUGIN_NAME in list_methods()
    # the plugin method's backward is its own surrogate
    w = kink_tensor()
    out_w, g, grad = weight_and_grad(PLUGIN_NAME, w, 0.0, 2, beta="3")
    assert_exact(out_w, elementwise(sign_scalar, w))
    assert_close(grad, g * elementwise(lambda v: 3 * (1 - math.tanh(3 * v) ** 2), w))
    # and it builds a model that trains
    torch.manual_seed(0)
    model = build_model("resnet20", PLUGIN_NAME)
    assert model.spec.method == PLUGIN_NAME
    loss = F.cross_entropy(model(torch.randn(2, 3, 8, 8)), torch.tensor([1, 7]))  # small images: fast
    loss.backward()
    conv = model.stages[0][0].conv1
    assert torch.isfinite(loss) and conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_cli_missing_plugin_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert cli_main(["--plugin", str(tmp_path / "nope.py"), "list"]) == 2
    assert "nope.py" in capsys.readouterr().err


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, COLUMNS="400", OMP_NUM_THREADS="1", **extra)
    return env


def test_cli_plugin_in_subprocess(tmp_path: Path) -> None:
    path = write_plugin(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "bnnbench.cli", "--plugin", str(path), "list"],
        capture_output=True, text=True, env=_subprocess_env(), timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert PLUGIN_NAME in result.stdout and "biper" in result.stdout


def test_entry_point_group_registers_method(tmp_path: Path) -> None:
    """A distribution advertising ``bnnbench.methods`` entry points (one broken) on sys.path."""
    (tmp_path / "ep_tanh_method.py").write_text(PLUGIN_SOURCE.replace(PLUGIN_NAME, "ep-tanh"))
    dist = tmp_path / "bnnbench_ep_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bnnbench-ep-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[bnnbench.methods]\nep-tanh = ep_tanh_method\nbroken = ep_module_that_does_not_exist\n"
    )
    script = textwrap.dedent(
        """
        import torch
        import bnnbench
        names = bnnbench.list_methods()
        assert "ep-tanh" in names and "biper" in names, names
        m = bnnbench.get_method("ep-tanh")
        w = torch.tensor([0.0, 0.5, -2.0], dtype=torch.float64, requires_grad=True)
        m.weight(w).sum().backward()
        print("OK", w.grad.tolist())
        """
    )
    env = _subprocess_env(PYTHONPATH=os.pathsep.join(p for p in [str(tmp_path), os.environ.get("PYTHONPATH")] if p))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    grads = [float(v) for v in result.stdout.split("OK", 1)[1].strip(" []\n").split(",")]
    expected = [2 * (1 - math.tanh(2 * v) ** 2) for v in (0.0, 0.5, -2.0)]
    assert grads == pytest.approx(expected, rel=1e-6)
    # the broken entry point is reported and does not hide the built-ins
    assert "could not load method plugin 'broken'" in result.stderr
