"""Fidelity of the methods of issue 17 (dsq, rad, lqnet, rbnn) and of the interface they use.

Every reference is written here, independently of the package: scalar Python formulas per
element (``elementwise``) or closed-form gradients, in float64, at and next to the kinks, for
both stages and for training progress p = 0, 0.5, 1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_methods import (
    DTYPE,
    PROGRESS,
    STAGES,
    activation_and_grad,
    assert_close,
    assert_exact,
    clip,
    elementwise,
    kink_tensor,
    random_like,
    sign_scalar,
)

import bnnbench
from bnnbench import BinaryConv2d, BinaryLinear, build_model, get_method, list_methods, regularization_loss, set_progress
from bnnbench.errors import ConfigError
from bnnbench.method import Method, straight_through
from bnnbench.registry import register_method

MORE = ["dsq", "rad", "lqnet", "rbnn"]
WEIGHT_SHAPES = [(4, 3, 3, 3), (5, 7)]


def leaf(value, dtype=DTYPE) -> torch.Tensor:
    return torch.as_tensor(value, dtype=dtype).clone().requires_grad_(True)


def weight_with(name: str, w: torch.Tensor, progress: float, stage: int, tensors: dict[str, torch.Tensor], **hparams):
    """Forward, upstream gradient g, and the gradients to w and to every tensor in ``tensors``."""
    method = get_method(name, **hparams)
    w = w.clone().requires_grad_(True)
    out = method.weight(w, progress=progress, stage=stage, **tensors)
    g = random_like(out)
    out.backward(g)
    return out.detach(), g, w.grad


def test_new_methods_are_registered_listed_and_fit_80_columns(monkeypatch, capsys) -> None:
    for name in MORE:
        assert name in list_methods()
    monkeypatch.setenv("COLUMNS", "80")
    from bnnbench.cli import main

    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 80
    for name in MORE:
        assert any(line.split()[:1] == [name] for line in lines), name


@pytest.mark.parametrize("name", MORE)
def test_stage_one_weights_are_real(name: str) -> None:
    w = kink_tensor()
    layer = BinaryConv2d(3, 4, 3, method=name, stage=1)
    method = layer.method
    w = w.clone().requires_grad_(True)
    out = method.weight(w, progress=0.5, stage=1, **layer.weight_tensors())
    g = random_like(out)
    out.backward(g)
    assert_exact(out.detach(), w.detach())
    assert_exact(w.grad, g)


# ========================================================================== dsq
def dsq_s_k(alpha: float, u: float) -> tuple[float, float]:
    """s = 1/(1 - alpha), k = ln(2/alpha - 1) / Delta with Delta = 2u (DSQ at one interval)."""
    return 1.0 / (1.0 - alpha), math.log(2.0 / alpha - 1.0) / (2.0 * u)


def dsq_phi_and_partials(v: float, alpha: float, u: float) -> tuple[float, float, float, float]:
    """phi(clip v), d phi/dv, d phi/du, d phi/dalpha at one element (clip inclusive: |v| <= u passes v)."""
    s, k = dsq_s_k(alpha, u)
    inside = abs(v) <= u
    c = v if inside else math.copysign(u, v) if v != 0 else u
    th = math.tanh(k * c)
    phi = s * th
    dphi_dv = s * k * (1 - th * th) if inside else 0.0
    # k = ln(2/alpha - 1) / (2u): dk/du = -k/u, dk/dalpha = -1 / (u alpha (2 - alpha)); s' = 1/(1 - alpha)^2
    # inside: c = v; beyond: c = +-u and k c is constant in u
    dphi_du = s * (1 - th * th) * v * (-k / u) if inside else 0.0
    dc_part = c * (-1.0 / (u * alpha * (2 - alpha)))
    dphi_dalpha = th / (1 - alpha) ** 2 + s * (1 - th * th) * dc_part
    return phi, dphi_dv, dphi_du, dphi_dalpha


@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("alpha,u", [(0.2, 1.0), (0.05, 1.5), (0.6, 0.5)])
def test_dsq_weight(progress: float, shape, alpha: float, u: float) -> None:
    """u sign(w) forward; d/dw = u s k (1 - tanh^2(k w)) inside [-u, u] (|w| = u included), 0 beyond;
    d/du = sum g (sign w + u dphi/du); d/dalpha = sum g u dphi/dalpha.  No schedule: the same at every p."""
    w = kink_tensor(shape)
    tensors = {"u": leaf(u), "alpha": leaf(alpha), "u_init": torch.ones((), dtype=DTYPE)}
    out, g, grad = weight_with("dsq", w, progress, 2, tensors)
    assert_close(out, u * elementwise(sign_scalar, w))
    parts = [dsq_phi_and_partials(v, alpha, u) for v in w.reshape(-1).tolist()]
    dv = torch.tensor([p[1] for p in parts], dtype=DTYPE).view(w.shape)
    du = torch.tensor([p[2] for p in parts], dtype=DTYPE).view(w.shape)
    da = torch.tensor([p[3] for p in parts], dtype=DTYPE).view(w.shape)
    signs = elementwise(sign_scalar, w)
    assert_close(grad, g * u * dv)
    torch.testing.assert_close(tensors["u"].grad, (g * (signs + u * du)).sum(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tensors["alpha"].grad, (g * u * da).sum(), rtol=1e-10, atol=1e-10)


def test_dsq_weight_kinks_at_the_clipping_value() -> None:
    """At exactly |w| = u the gradient reaches w (inclusive clip); just beyond it is 0."""
    u = 0.5
    w = torch.tensor([0.5, -0.5, 0.5 + 1e-9, -0.5 - 1e-9, 0.5 - 1e-9, 0.0], dtype=DTYPE)
    _, g, grad = weight_with("dsq", w, 0.0, 2, {"u": leaf(u), "alpha": leaf(0.2)})
    s, k = dsq_s_k(0.2, u)
    edge = u * s * k * (1 - math.tanh(k * u) ** 2)
    expected = torch.tensor([edge, edge, 0.0, 0.0, u * s * k * (1 - math.tanh(k * (u - 1e-9)) ** 2), u * s * k], dtype=DTYPE)
    assert_close(grad, g * expected)


def test_dsq_soft_quantizer_reaches_the_bounds_and_alpha_sets_the_edge_slope() -> None:
    """phi(+-u) = +-1 (Q_S is continuous at l and u); alpha = 1 - tanh(k Delta / 2)."""
    for alpha, u in [(0.2, 1.0), (0.01, 2.0), (0.5, 0.3)]:
        phi, *_ = dsq_phi_and_partials(u, alpha, u)
        assert phi == pytest.approx(1.0, abs=1e-12)
        s, k = dsq_s_k(alpha, u)
        assert 1 - math.tanh(k * 2 * u / 2) == pytest.approx(alpha, abs=1e-12)


@pytest.mark.parametrize("progress", PROGRESS)
def test_dsq_activation_with_its_initial_parameters(progress: float) -> None:
    """sign(a) forward; s k (1 - tanh^2(k a)) 1{|a| <= 1} backward at alpha = 0.2, u = 1 (no value scale)."""
    a = kink_tensor((2, 3, 4, 5))
    out, g, grad = activation_and_grad("dsq", a, progress)
    assert_exact(out, elementwise(sign_scalar, a))
    assert_close(grad, g * elementwise(lambda v: dsq_phi_and_partials(v, 0.2, 1.0)[1], a))


def test_dsq_activation_learns_alpha_and_u() -> None:
    a = kink_tensor((2, 3, 4, 5)).requires_grad_(True)
    u, alpha = leaf(1.5), leaf(0.1)
    out = get_method("dsq").activation(a, progress=0.5, u=u, alpha=alpha)
    g = random_like(out)
    out.backward(g)
    parts = [dsq_phi_and_partials(v, 0.1, 1.5) for v in a.detach().reshape(-1).tolist()]
    pick = lambda i: torch.tensor([p[i] for p in parts], dtype=DTYPE).view(a.shape)  # noqa: E731
    assert_exact(out.detach(), elementwise(sign_scalar, a))
    assert_close(a.grad, g * pick(1))
    torch.testing.assert_close(u.grad, (g * pick(2)).sum(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(alpha.grad, (g * pick(3)).sum(), rtol=1e-10, atol=1e-10)


def test_dsq_clamps_alpha_and_refuses_act_norm() -> None:
    w = torch.tensor([0.3, -0.2], dtype=DTYPE)
    out_hi, *_ = weight_with("dsq", w, 0.0, 2, {"u": leaf(1.0), "alpha": leaf(1.5)})  # clamped to 0.9999: finite
    assert torch.isfinite(out_hi).all()
    with pytest.raises(ConfigError, match="act_norm"):
        BinaryConv2d(3, 4, 3, method="dsq", act_norm=True)


def test_dsq_layer_initialises_its_bound_once_at_the_first_stage_two_progress() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", "dsq", stage=1)
    layer = model.stages[0][0].conv1
    set_progress(model, 0.0)
    assert float(layer.weight_state_u_init) == 0.0  # stage 1: real weights, nothing to initialise
    bnnbench.set_stage(model, 2)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    set_progress(model, 0.0)
    expected = 3.0 * layer.weight.detach().std()
    assert float(layer.weight_params["u"].detach()) == pytest.approx(float(expected), rel=1e-6)
    assert float(layer.weight_state_u_init) == 1.0
    with torch.no_grad():
        layer.weight.mul_(2.0)
    set_progress(model, 0.5)  # later epochs (and resumed runs) keep the learned bound
    assert float(layer.weight_params["u"].detach()) == pytest.approx(float(expected), rel=1e-6)
    assert torch.equal(layer.forward_weight().abs(), layer.weight_params["u"].detach().expand_as(layer.weight))


# ========================================================================== rad
def rad_layer_loss(a: torch.Tensor) -> float:
    """The official Distrloss_layer, per channel with Python scalars: L1 + L2."""
    c = a.shape[1]
    mus, sds = [], []
    for ch in range(c):
        values = a[:, ch].reshape(-1).tolist()
        mu = sum(values) / len(values)
        var = sum((v - mu) ** 2 for v in values) / len(values) + 1e-10
        mus.append(mu)
        sds.append(math.sqrt(var))
    l1 = sum(max(0.0, min(2 - m - s, 2 + m - s)) ** 2 for m, s in zip(mus, sds)) / c
    l1 += sum(max(0.0, s - 4) ** 2 for s in sds) / c
    l2 = sum(max(0.0, m * m - s * s) for m, s in zip(mus, sds)) / c
    return l1 + l2


def rad_input(seed: int = 0) -> torch.Tensor:
    """Channels that trigger each term: narrow, shifted (mu^2 > sigma^2), wide (sigma > 4), ordinary."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 4, 5, 5, generator=gen, dtype=DTYPE)
    a[:, 0] *= 0.1
    a[:, 1] = a[:, 1] * 0.3 + 2.0
    a[:, 2] *= 6.0
    return a


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("progress", PROGRESS)
def test_rad_weight_and_activation(stage: int, progress: float) -> None:
    w = kink_tensor()
    out, g, grad = weight_with("rad", w, progress, stage, {})
    assert_exact(out, w if stage == 1 else elementwise(sign_scalar, w))
    assert_exact(grad, g)
    a = kink_tensor((2, 3, 4, 5))
    out, g, grad = activation_and_grad("rad", a, progress)
    assert_exact(out, elementwise(sign_scalar, a))
    assert_close(grad, g * elementwise(clip, a))


@pytest.mark.parametrize("progress", PROGRESS)
def test_rad_distribution_loss_and_its_schedule(progress: float) -> None:
    """lambda (L1 + L2) while p < 60/65, 0 afterwards (the official loss is dropped for the last epochs)."""
    a = rad_input()
    method = get_method("rad")
    value = method.activation_loss(a, 2, progress)
    on = 1.0 if progress < 60 / 65 else 0.0
    assert float(value) == pytest.approx(2.0 * on * rad_layer_loss(a), rel=1e-12, abs=1e-15)
    assert method.schedule(progress) == {"lambda": 2.0 * on}


def test_rad_schedule_switches_off_at_sixty_of_sixty_five() -> None:
    a, method = rad_input(), get_method("rad")
    assert float(method.activation_loss(a, 2, 60 / 65 - 1e-9)) > 0
    assert float(method.activation_loss(a, 2, 60 / 65)) == 0.0
    assert get_method("rad", loss_weight=0.0).activation_loss(a, 2, 0.0) is None


def test_rad_loss_is_the_mean_over_layers_of_each_binary_layers_input() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", "rad", stage=2).double()
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone())) for _, layer in bnnbench.binary_layers(model)]
    set_progress(model, 0.5)
    model.train()
    model(torch.randn(2, 3, 8, 8, dtype=DTYPE))
    for h in hooks:
        h.remove()
    expected = 2.0 * sum(rad_layer_loss(a) for a in inputs) / len(inputs)
    assert float(regularization_loss(model)) == pytest.approx(expected, rel=1e-10)
    model.eval()
    model(torch.randn(2, 3, 8, 8, dtype=DTYPE))
    assert regularization_loss(model) is None  # no term from an evaluation forward


# ======================================================================== lqnet
@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
def test_lqnet_weight(progress: float, shape) -> None:
    """v_c sign(w) forward; straight-through 1 backward (the basis is not in the backward)."""
    w = kink_tensor(shape)
    basis = torch.linspace(0.1, 0.4, shape[0], dtype=DTYPE).view(-1, *([1] * (len(shape) - 1)))
    out, g, grad = weight_with("lqnet", w, progress, 2, {"basis": basis})
    assert_close(out, basis.expand_as(w) * elementwise(sign_scalar, w))
    assert_exact(grad, g)


def test_lqnet_initial_basis_is_the_official_one() -> None:
    conv = BinaryConv2d(3, 8, 3, method="lqnet")
    assert torch.allclose(conv.weight_state_basis, torch.full((8, 1, 1, 1), 0.6745 * math.sqrt(2 / (3 * 3 * 8))))
    fc = BinaryLinear(6, 5, method="lqnet")
    assert torch.allclose(fc.weight_state_basis, torch.full((5, 1), 0.6745 * math.sqrt(2 / 5)))


def test_lqnet_qem_moving_average_after_each_training_forward() -> None:
    """After a training forward (which used the old basis): v <- 0.9 v + 0.1 (sum|w| + 1e-4 v) / (N + 1e-4)."""
    torch.manual_seed(0)
    layer = BinaryConv2d(3, 4, 3, method="lqnet", stage=2).double()
    with torch.no_grad():
        layer.weight.copy_(kink_tensor((4, 3, 3, 3)))
    v0 = layer.weight_state_basis.clone()
    layer.train()
    w_b = layer.forward_weight()
    assert_close(w_b.detach(), v0.expand_as(layer.weight) * elementwise(sign_scalar, layer.weight))
    rows = layer.weight.detach().reshape(4, -1).tolist()
    expected = [0.9 * v + 0.1 * (sum(abs(x) for x in row) + 1e-4 * v) / (len(row) + 1e-4) for row, v in zip(rows, v0.reshape(-1).tolist())]
    assert_close(layer.weight_state_basis.reshape(-1), torch.tensor(expected, dtype=DTYPE))
    after = layer.weight_state_basis.clone()
    layer.eval()
    layer.forward_weight()
    assert torch.equal(layer.weight_state_basis, after)  # no update from an evaluation forward
    layer.train()
    layer.stage = 1
    layer.forward_weight()
    assert torch.equal(layer.weight_state_basis, after)  # nor in stage 1 (real weights)


def test_lqnet_basis_is_saved_and_restored_with_the_model() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", "lqnet", stage=2)
    model.train()
    model(torch.randn(2, 3, 8, 8))
    state = model.state_dict()
    keys = [k for k in state if k.endswith("weight_state_basis")]
    assert len(keys) == 18
    fresh = build_model("resnet20", "lqnet", stage=2)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.state_dict()[k], state[k]) for k in keys)


# ========================================================================= rbnn
def rbnn_t(p: float, t_min: float = 1e-2, t_max: float = 10.0) -> float:
    return 10 ** (math.log10(t_min) + (math.log10(t_max) - math.log10(t_min)) * p)


def rbnn_surrogate(k: float, t: float):
    return lambda v: k * max(0.0, math.sqrt(2) * t - t * t * abs(v))


def orthogonal(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DTYPE))
    return q * torch.sign(torch.diagonal(r))


def rbnn_reference(w, g, r1, r2, theta, p, rotation_grad):
    """Forward sign(w') and the closed-form gradients to w and theta.

    z = w - mean_c; sd = sqrt(sum z^2 / (n - 1)); x = z / sd; Wr_i = R1^T X_i R2; s = |sin theta|;
    w' = x + s (Wr - x);  G = g k max(0, sqrt2 t - t^2 |w'|);
    dx = (1 - s) G + s R1 G_i R2^T (paper; R1, R2 fixed) or (1 - s) G (upstream: Wr detached);
    dz = dx / sd - z (dx.z) / (sd^3 (n - 1)); dw = dz - mean_c(dz);
    dtheta_i = sign(sin theta_i) cos theta_i sum_j G_ij (Wr - x)_ij.
    """
    c = w.shape[0]
    rows = w.reshape(c, -1)
    n = rows.shape[1]
    z = rows - rows.sum(dim=1, keepdim=True) / n
    sd = torch.sqrt((z * z).sum(dim=1, keepdim=True) / (n - 1))
    x = z / sd
    n1, n2 = r1.shape[0], r2.shape[0]
    wr = torch.stack([r1.t() @ x[i].view(n1, n2) @ r2 for i in range(c)]).reshape(c, n)
    s = torch.tensor([abs(math.sin(v)) for v in theta.reshape(-1).tolist()], dtype=DTYPE).view(c, 1)
    wp = x + s * (wr - x)
    t = rbnn_t(p)
    k = max(1 / t, 1.0)
    G = g.reshape(c, n) * elementwise(rbnn_surrogate(k, t), wp)
    dx = (1 - s) * G
    if rotation_grad == "paper":
        dx = dx + s * torch.stack([r1 @ G[i].view(n1, n2) @ r2.t() for i in range(c)]).reshape(c, n)
    dz = dx / sd - z * (dx * z).sum(dim=1, keepdim=True) / (sd**3 * (n - 1))
    dw = dz - dz.sum(dim=1, keepdim=True) / n
    dtheta = torch.tensor(
        [math.copysign(1.0, math.sin(v)) * math.cos(v) for v in theta.reshape(-1).tolist()], dtype=DTYPE
    ) * (G * (wr - x)).sum(dim=1)
    forward = elementwise(sign_scalar, wp)
    return forward.view(w.shape), dw.view(w.shape), dtheta.view(theta.shape)


def test_rbnn_factor_pair() -> None:
    from bnnbench.methods.rbnn import factor_pair

    assert factor_pair(27) == (3, 9) and factor_pair(144) == (12, 12) and factor_pair(7) == (1, 7) and factor_pair(288) == (16, 18)


@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize("rotation_grad", ["paper", "upstream"])
@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (3, 12)])
def test_rbnn_weight(progress: float, rotation_grad: str, shape) -> None:
    w = kink_tensor(shape)
    w[1] = w[1] * 0.05
    n1, n2 = (3, 9) if len(shape) == 4 else (3, 4)
    r1, r2 = orthogonal(n1, 3), orthogonal(n2, 4)
    theta = leaf(torch.tensor([math.pi / 2, 0.3, -1.0, 2.5][: shape[0]], dtype=DTYPE).view(-1, *([1] * (len(shape) - 1))))
    out, g, grad = weight_with("rbnn", w, progress, 2, {"r1": r1, "r2": r2, "theta": theta}, rotation_grad=rotation_grad)
    ref_out, ref_grad, ref_theta = rbnn_reference(w, g, r1, r2, theta.detach(), progress, rotation_grad)
    assert_exact(out, ref_out)
    assert_close(grad, ref_grad)
    assert_close(theta.grad, ref_theta)


def test_rbnn_upstream_passes_no_gradient_to_the_weights_at_full_rotation() -> None:
    w = kink_tensor((2, 3, 3, 3))
    theta = leaf(torch.full((2, 1, 1, 1), math.pi / 2, dtype=DTYPE))
    _, _, grad = weight_with("rbnn", w, 0.5, 2, {"r1": orthogonal(3, 0), "r2": orthogonal(9, 1), "theta": theta}, rotation_grad="upstream")
    assert grad.abs().max() < 1e-12


@pytest.mark.parametrize("progress", PROGRESS)
def test_rbnn_activation_and_its_kinks(progress: float) -> None:
    """max(0, sqrt2 t_a - t_a^2 |a|), t_a = max(t, 1): zero from |a| = sqrt2 / t_a on."""
    t_a = max(rbnn_t(progress), 1.0)
    edge = math.sqrt(2) / t_a
    a = kink_tensor((2, 3, 4, 5))
    flat = a.view(-1)
    flat[-6:] = torch.tensor([edge, -edge, edge - 1e-9, edge + 1e-9, -edge + 1e-9, -edge - 1e-9], dtype=DTYPE)
    out, g, grad = activation_and_grad("rbnn", a, progress)
    assert_exact(out, elementwise(sign_scalar, a))
    assert_close(grad, g * elementwise(rbnn_surrogate(1.0, t_a), a))
    assert grad.view(-1)[-6:].tolist()[3] == 0.0 and grad.view(-1)[-6:].tolist()[5] == 0.0


@pytest.mark.parametrize("progress,t,k", [(0.0, 1e-2, 100.0), (0.5, 10**-0.5, 10**0.5), (1.0, 10.0, 1.0)])
def test_rbnn_schedule(progress: float, t: float, k: float) -> None:
    sched = get_method("rbnn").schedule(progress)
    assert sched["t"] == pytest.approx(t, rel=1e-12) and sched["k"] == pytest.approx(k, rel=1e-12)


def numpy_rotation_rounds(x: np.ndarray, r1: np.ndarray, r2: np.ndarray, rounds: int = 3):
    """The alternating update (RBNN) in numpy: B = sign(R1^T X R2), R1 = V1 U1^T, R2 = U2 V2^T."""
    for _ in range(rounds):
        b = np.where(np.einsum("ab,ibc,cd->iad", r1.T, x, r2) >= 0, 1.0, -1.0)
        d1 = sum(b[i] @ r2.T @ x[i].T for i in range(x.shape[0]))
        u1, _, v1t = np.linalg.svd(d1)
        r1 = v1t.T @ u1.T
        d2 = sum(x[i].T @ r1 @ b[i] for i in range(x.shape[0]))
        u2, _, v2t = np.linalg.svd(d2)
        r2 = u2 @ v2t
    return r1, r2


def binarization_loss(x: np.ndarray, r1: np.ndarray, r2: np.ndarray) -> float:
    v = np.einsum("ab,ibc,cd->iad", r1.T, x, r2)
    return float(((np.where(v >= 0, 1.0, -1.0) - v) ** 2).sum())


def test_rbnn_rotation_update_matches_numpy_and_lowers_the_binarization_loss() -> None:
    method = get_method("rbnn")
    w = kink_tensor((6, 4, 3, 3))
    r1, r2 = orthogonal(6, 5), orthogonal(6, 6)
    new1, new2 = method.rotation_rounds(w, r1, r2)
    rows = w.reshape(6, -1)
    z = rows - rows.mean(dim=1, keepdim=True)
    x = (z / torch.sqrt((z * z).sum(dim=1, keepdim=True) / (rows.shape[1] - 1))).reshape(6, 6, 6).numpy()
    ref1, ref2 = numpy_rotation_rounds(x, r1.numpy(), r2.numpy())
    np.testing.assert_allclose(new1.numpy(), ref1, atol=1e-9)
    np.testing.assert_allclose(new2.numpy(), ref2, atol=1e-9)
    assert binarization_loss(x, ref1, ref2) <= binarization_loss(x, r1.numpy(), r2.numpy())
    for r in (new1, new2):
        assert torch.allclose(r @ r.t(), torch.eye(6, dtype=DTYPE), atol=1e-10)


def test_rbnn_rotations_update_when_the_progress_moves_in_stage_two_only() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", "rbnn", stage=1)
    layer = model.stages[1][0].conv2
    before1, before2 = layer.weight_state_r1.clone(), layer.weight_state_r2.clone()
    set_progress(model, 0.0)
    assert torch.equal(layer.weight_state_r1, before1)  # stage 1: real weights, no rotation
    bnnbench.set_stage(model, 2)
    set_progress(model, 0.0)
    expected1, expected2 = layer.method.rotation_rounds(layer.weight.detach(), before1, before2)
    assert torch.equal(layer.weight_state_r1, expected1) and torch.equal(layer.weight_state_r2, expected2)
    assert not torch.equal(layer.weight_state_r1, before1)
    model.train()
    model(torch.randn(2, 3, 8, 8))  # a training step leaves the rotations alone
    r1 = layer.weight_state_r1.clone()
    model(torch.randn(2, 3, 8, 8))
    assert torch.equal(layer.weight_state_r1, r1)


def test_rbnn_rejects_unknown_rotation_gradient() -> None:
    with pytest.raises(ValueError, match="rotation_grad must be one of"):
        get_method("rbnn", rotation_grad="exact")


# ================================================================ the interface
def test_straight_through_is_the_exact_hard_value_with_the_soft_gradient() -> None:
    soft = torch.tensor([0.3, -0.7, 1e-8], dtype=DTYPE, requires_grad=True)
    hard = torch.tensor([1.0, -1.0, 1.0], dtype=DTYPE)
    out = straight_through(hard, soft * 3)
    assert torch.equal(out.detach(), hard)
    out.backward(torch.tensor([1.0, 2.0, 3.0], dtype=DTYPE))
    assert soft.grad.tolist() == [3.0, 6.0, 9.0]
    with pytest.raises(ValueError, match="differ in shape"):
        straight_through(hard, soft[:2])


def test_activation_losses_sum_by_default_and_mix_with_weight_terms(monkeypatch) -> None:
    """A plugin's activation_loss is summed over layers ("sum"), RAD's averaged ("mean"), weight terms summed."""
    from bnnbench import registry

    list_methods()
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))

    @register_method("test-act-loss")
    class ActLoss(Method):
        def activation_loss(self, a, stage, progress):
            return a.pow(2).mean()

        def regularizer(self, w, stage):
            return w.abs().sum() * 0.0 + 1.0

    layers = [BinaryLinear(4, 4, method="test-act-loss"), BinaryLinear(4, 4, method="test-act-loss")]
    model = torch.nn.Sequential(*layers).double()
    x = torch.randn(3, 4, dtype=DTYPE)
    model.train()
    hidden = layers[0](x)
    layers[1](hidden)
    expected = 2.0 + x.pow(2).mean() + hidden.pow(2).mean()
    torch.testing.assert_close(regularization_loss(model), expected)
    with pytest.raises(ValueError, match="loss_reduction"):

        @register_method("test-bad-reduction")
        class Bad(Method):
            loss_reduction = "max"


@pytest.mark.parametrize("name", MORE)
@pytest.mark.parametrize("stage", STAGES)
def test_new_methods_build_and_train(name: str, stage: int) -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", name, stage=stage)
    set_progress(model, 0.5)
    loss = F.cross_entropy(model(torch.randn(2, 3, 8, 8)), torch.tensor([3, 5]))
    extra = regularization_loss(model)
    (loss if extra is None else loss + extra).backward()
    conv = model.stages[1][0].conv2
    assert torch.isfinite(loss)
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0
    if stage == 2:
        for p in conv.weight_params.values():
            assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", MORE)
def test_packed_export_and_diagnostics_see_the_layers_weight_tensors(name: str) -> None:
    """The packed model uses the layer's own basis / bound / rotations: same outputs as the float model."""
    from bnnbench.metrics import dead_mask, model_diagnostics
    from bnnbench.packed import export_packed, set_backend

    torch.manual_seed(0)
    model = build_model("resnet20", name, stage=2)
    set_progress(model, 0.5)
    model.train()
    model(torch.randn(4, 3, 8, 8))  # lqnet updates its basis, dsq has its bound
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        packed = export_packed(model)
        set_backend(packed, "float")
        got = packed(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    layer = model.stages[1][0].conv2
    w_hat = layer.method.pre_sign(layer.weight.detach(), layer.progress, **layer.weight_tensors())
    assert torch.equal(layer.method.binarize_weight(layer.weight.detach(), layer.progress, **layer.weight_tensors()).detach(), bnnbench.sign(w_hat))
    assert dead_mask(layer.method, layer.weight, 0.5, 2, None, layer.weight_tensors()).shape == layer.weight.shape
    diagnostics = model_diagnostics(model)
    assert len(diagnostics.layers) == 18 and all(math.isfinite(d.qe) for d in diagnostics.layers)


@pytest.mark.parametrize("name", MORE)
def test_new_methods_train_through_the_loop_and_resume_their_state(name: str, tmp_path) -> None:
    """48 digits, 1 + 1 epochs: the run finishes; RAD logs its loss as the regulariser; a checkpoint restores the
    layers' state (LQ-Net's basis, RBNN's rotations, DSQ's bound) exactly."""
    import pandas as pd
    from tiny import tiny_run

    from bnnbench.runners.recipes import get_recipe
    from bnnbench.runners.train import run_training

    recipe = get_recipe("quick")
    recipe.train_subset, recipe.test_subset, recipe.batch_size = 48, 30, 16
    recipe.stage1.epochs, recipe.stage2.epochs = 1, 1
    run = tiny_run(recipe, tmp_path / "results", method=name)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(*run, quiet=True)
    finally:
        torch.set_num_threads(before)
    path = run.run_dir()
    metrics = pd.read_csv(path / "metrics.csv")
    assert (path / "final.json").is_file() and metrics["test_top1"].notna().all()
    reg = metrics["train_reg"]
    assert (reg > 0).all() if name == "rad" else (reg == 0).all()
    checkpoints = sorted(path.rglob("*.pt"))
    assert checkpoints
    state = torch.load(checkpoints[-1], map_location="cpu", weights_only=False)
    model_state = state["model"] if "model" in state else state
    names = {"lqnet": "weight_state_basis", "rbnn": "weight_state_r1", "dsq": "weight_state_u_init"}
    if name in names:
        keys = [k for k in model_state if k.endswith(names[name])]
        assert len(keys) == 18, keys
        if name == "dsq":  # stage 2 started by setting every layer's bound from its weights
            assert all(float(model_state[k]) == 1.0 for k in keys)
