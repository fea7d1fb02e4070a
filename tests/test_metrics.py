"""Training diagnostics: hand-computed values, the Laplace theory, flips, dead weights and gradient norms."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import bnnbench
from bnnbench import BinaryConv2d, BinaryLinear, build_model, get_method
from bnnbench.metrics import (
    FlipTracker,
    LayerDiagnostics,
    dead_mask,
    flip_rate,
    model_diagnostics,
    optimal_scale,
    qe_l1_upstream,
    quantization_error,
    relative_quantization_error,
    sign_bits,
)
from bnnbench.theory import gamma_laplace, qe_laplace


def _laplace(shape: torch.Size, b: float, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).laplace(0.0, b, tuple(shape))).float()


def test_quantization_error_by_hand_symmetric():
    w_hat = torch.tensor([0.5, -0.5, 1.0, -1.0])
    assert optimal_scale(w_hat).item() == pytest.approx(0.75)
    # residuals -0.25, 0.25, 0.25, -0.25
    assert quantization_error(w_hat).item() == pytest.approx(0.0625)


def test_quantization_error_by_hand_with_a_zero():
    w_hat = torch.tensor([0.2, -0.6, 0.0, 1.0])
    # gamma = 0.45; sign(0) = +1: residuals -0.25, -0.15, -0.45, 0.55
    assert optimal_scale(w_hat).item() == pytest.approx(0.45)
    assert quantization_error(w_hat).item() == pytest.approx((0.0625 + 0.0225 + 0.2025 + 0.3025) / 4)
    # |0.2 - 1|, |-0.6 + 1|, |0 - 1|, |1 - 1|
    assert qe_l1_upstream(w_hat).item() == pytest.approx((0.8 + 0.4 + 1.0 + 0.0) / 4)
    assert relative_quantization_error(w_hat).item() == pytest.approx(0.1475 / 0.35)


def test_binary_tensor_has_zero_error():
    w_hat = torch.tensor([0.3, -0.3, 0.3, -0.3])
    assert quantization_error(w_hat).item() == 0.0


@pytest.mark.parametrize("w0,b", [(20.0, 0.05), (5.0, 0.1), (30.0, 0.1), (10.0, 0.02)])
def test_biper_layer_with_laplace_weights_follows_the_closed_form(w0, b):
    layer = BinaryConv2d(256, 256, 3, padding=1, method=get_method("biper", w0=w0))
    layer.weight.data = _laplace(layer.weight.shape, b, seed=7)
    (diag,) = model_diagnostics(nn.Sequential(layer)).layers
    w_hat = torch.sin(w0 * layer.weight.detach().double())
    n = w_hat.numel()
    residual_sq = (w_hat.abs() - w_hat.abs().mean()).pow(2)
    assert abs(diag.qe - qe_laplace(w0 * b)) < 5 * residual_sq.std().item() / math.sqrt(n)
    assert abs(diag.gamma - gamma_laplace(w0 * b)) < 5 * w_hat.abs().std().item() / math.sqrt(n)
    assert abs(diag.laplace_b - b) < 5 * b / math.sqrt(n)  # std|w| = b for Laplace


def test_flip_rate_of_a_known_change():
    before = torch.linspace(-1, 1, 1000) + 1e-3  # no exact zeros
    after = before.clone()
    flipped = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:137]
    after[flipped] = -after[flipped]
    assert flip_rate(sign_bits(before), sign_bits(after)) == pytest.approx(137 / 1000)
    assert flip_rate(sign_bits(before), sign_bits(before * 2)) == 0.0


@pytest.mark.parametrize("method", ["sign-ste", "biper", "recu"])
def test_flip_tracker_counts_negated_weights(method):
    torch.manual_seed(0)
    small = BinaryConv2d(8, 8, 3, method=method)
    large = BinaryConv2d(16, 16, 3, method=method)
    model = nn.Sequential(small, large)
    # +-0.01: away from zero, from the zeros of sin(w0 w) (BiPer), and from any channel mean (ReCU centres
    # each channel, and a mean |m| < 0.01 leaves the sign of +-0.01 - m unchanged)
    for layer in (small, large):
        layer.weight.data = 0.01 * torch.where(torch.rand_like(layer.weight) < 0.5, 1.0, -1.0)
    tracker = FlipTracker(model)
    k_small, k_large = 100, 1000
    with torch.no_grad():
        small.weight.view(-1)[:k_small].neg_()
        large.weight.view(-1)[:k_large].neg_()
    n_small, n_large = small.weight.numel(), large.weight.numel()
    assert tracker.flip_rates() == pytest.approx({"0": k_small / n_small, "1": k_large / n_large})
    summary = model_diagnostics(model, tracker).summary()
    assert summary["flip_rate"] == pytest.approx((k_small + k_large) / (n_small + n_large))
    tracker.snapshot()
    assert set(tracker.flip_rates().values()) == {0.0}


def recu_clamped_share(w: torch.Tensor, tau: float) -> float:
    """ReCU's clamped share computed here from its definition (SPEC section 1), in float64."""
    z = w.double().flatten(1)
    z = z - z.mean(dim=1, keepdim=True)
    z1 = z / (torch.sqrt(z.var(dim=1, keepdim=True) + 1e-5) / (2 * math.sqrt(2)))
    q = -z1.abs().mean() * math.log(2 - 2 * tau)
    return (z1.abs() > q).double().mean().item()


@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
def test_dead_share_of_recu_is_its_clamped_share(progress):
    method = get_method("recu")
    w = _laplace(torch.Size([128, 128, 3, 3]), 0.05, seed=3)
    dead = dead_mask(method, w, progress, stage=2, generator=torch.Generator().manual_seed(0))
    share = dead.double().mean().item()
    assert share == pytest.approx(recu_clamped_share(w, method.tau(progress)), abs=20 / w.numel())
    # for Laplace weights ReCU clamps the two tails beyond the tau-quantile: 2 (1 - tau)
    assert share == pytest.approx(2 * (1 - method.tau(progress)), abs=0.01)
    # the clamped elements are exactly those at +-Q after pre_sign
    x = method.pre_sign(w, progress)
    assert torch.equal(dead, x.abs() == x.abs().max())


def test_backpropagating_ones_would_miss_recu_dead_weights():
    """Why dead_mask uses a Jacobian-vector product: the standardisation feeds every weight some gradient."""
    method = get_method("recu")
    w = _laplace(torch.Size([16, 16, 3, 3]), 0.05, seed=4).requires_grad_()
    method.binarize_weight(w, 0.0).backward(torch.ones_like(w))
    assert (w.grad == 0).sum() == 0
    assert dead_mask(method, w, 0.0).any()


@pytest.mark.parametrize(
    "method,dead_where",
    [
        ("clip-ste", lambda w: w.abs() > 1.0),  # 1{|w| <= 1}
        ("polynomial", lambda w: w.abs() >= 1.0),  # max(0, 2 - 2|w|)
        ("reste", lambda w: w.abs() > 1.5),  # 0 beyond t = 1.5
        ("sign-ste", torch.zeros_like),
        ("biper", torch.zeros_like),  # w0 cos(w0 w) has no exact zero on this grid
        ("fp", torch.zeros_like),
    ],
)
def test_dead_share_of_elementwise_methods(method, dead_where):
    w = torch.linspace(-2.0, 2.0, 4001).reshape(1, -1)  # includes exactly +-1 and +-1.5
    dead = dead_mask(get_method(method), w, 0.5, stage=2)
    assert torch.equal(dead, dead_where(w).bool())
    # stage 1 uses real weights (sin(w0 w) for BiPer): nothing is dead
    assert not dead_mask(get_method(method), w, 0.5, stage=1).any()


def test_grad_norm_and_no_side_effects():
    torch.manual_seed(0)
    model = build_model("resnet20", "biper")
    before = model_diagnostics(model)
    assert all(math.isnan(d.grad_norm) for d in before.layers) and math.isnan(before.summary()["grad_norm"])
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    layers = dict(bnnbench.binary_layers(model))
    grads = {name: layer.weight.grad.clone() for name, layer in layers.items()}
    rng = torch.get_rng_state()
    diagnostics = model_diagnostics(model)
    assert torch.equal(torch.get_rng_state(), rng)
    norms = {}
    for d in diagnostics.layers:
        assert torch.equal(layers[d.layer].weight.grad, grads[d.layer])
        norms[d.layer] = torch.linalg.norm(grads[d.layer]).item()
        assert d.grad_norm == pytest.approx(norms[d.layer], rel=1e-6)
    assert diagnostics.summary()["grad_norm"] == pytest.approx(math.sqrt(sum(v * v for v in norms.values())), rel=1e-6)


@pytest.mark.parametrize("method", bnnbench.list_methods())
def test_every_method_gives_complete_rows_and_summary(method):
    torch.manual_seed(0)
    model = build_model("resnet20", method)
    tracker = FlipTracker(model)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    diagnostics = model_diagnostics(model, tracker)
    n_layers = len(list(bnnbench.binary_layers(model)))
    table = pd.DataFrame(diagnostics.rows()).pivot(index="layer", columns="metric", values="value")
    assert table.shape == (n_layers, len(LayerDiagnostics.METRICS))
    assert np.isfinite(table.to_numpy()).all()
    summary = diagnostics.summary()
    assert summary["n_layers"] == n_layers and all(math.isfinite(v) for v in summary.values())
    assert summary["qe_l1_upstream"] == pytest.approx(table["qe_l1_upstream"].sum())
    assert summary["qe"] == pytest.approx(table["qe"].mean())
    assert summary["flip_rate"] == 0.0  # nothing changed since the snapshot


def test_model_level_shares_are_weighted_by_layer_size():
    small = BinaryLinear(1, 10, method="clip-ste")
    large = BinaryLinear(10, 30, method="clip-ste")
    small.weight.data.fill_(2.0)  # all dead (|w| > 1)
    large.weight.data.fill_(0.5)  # none dead
    summary = model_diagnostics(nn.Sequential(small, large)).summary()
    assert summary["dead_share"] == pytest.approx(10 / 310)


def test_model_without_binary_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="no binary layers"):
        model_diagnostics(nn.Linear(2, 2)).summary()
