"""Fidelity of the "worth adding" binarizers (SPEC section 1), element by element.

xnor, dorefa, irnet, reactnet, fda, swish-sign: forward and backward against
formulas written here independently (scalar Python per element, or closed-form
gradients), at and near the kinks, for both stages and several progress values.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_methods import (
    DTYPE,
    PROGRESS,
    STAGES,
    activation_and_grad,
    approx_sign,
    assert_close,
    assert_exact,
    clip,
    elementwise,
    kink_tensor,
    random_like,
    reference_sign_approx,
    sign_scalar,
    weight_and_grad,
)

from bnnbench import BinaryConv2d, BinaryLinear, build_model, get_method, list_methods
from bnnbench.cli import main as cli_main
from bnnbench.method import forward_only_scale

EXTRA = ["xnor", "dorefa", "irnet", "reactnet", "fda", "swish-sign", "bireal"]

# a conv weight (4 filters of 3 x 3 x 3) and a linear weight (5 x 7)
WEIGHT_SHAPES = [(4, 3, 3, 3), (5, 7)]


def per_channel(w: torch.Tensor) -> list[list[float]]:
    return w.detach().reshape(w.shape[0], -1).tolist()


def channel_mean_abs(w: torch.Tensor) -> torch.Tensor:
    """mean|w_c| per output channel, broadcast back to w's shape."""
    means = [sum(abs(v) for v in row) / len(row) for row in per_channel(w)]
    return torch.tensor(means, dtype=w.dtype).view(-1, *([1] * (w.dim() - 1))).expand_as(w)


def test_every_extra_method_is_registered_and_listed(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    for name in EXTRA:
        assert name in list_methods()
    monkeypatch.setenv("COLUMNS", "400")
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    for name in list_methods():
        assert f" {name} " in out, name


@pytest.mark.parametrize("name", EXTRA)
def test_stage_one_weights_are_real(name: str) -> None:
    w = kink_tensor()
    out, g, grad = weight_and_grad(name, w, 0.5, 1)
    assert_exact(out, w)
    assert_exact(grad, g)


# ========================================================================= xnor
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("variant", ["paper", "upstream"])
def test_xnor_weight(variant: str, shape: tuple[int, ...]) -> None:
    w = kink_tensor(shape)
    out, g, grad = weight_and_grad("xnor", w, 0.5, 2, weight_grad=variant)
    alpha = channel_mean_abs(w)
    assert_close(out, alpha * elementwise(sign_scalar, w))
    n = w[0].numel()
    # paper: dC/dW = dC/dW~ (1/n + alpha 1{|W| <= 1}); upstream Torch7 multiplies by n (1 - 1/C_in)
    expected = g * (1.0 / n + alpha * elementwise(clip, w))
    if variant == "upstream":
        expected = expected * n * (1 - 1 / w.shape[1])
    assert_close(grad, expected)


def test_xnor_rejects_unknown_gradient_variant() -> None:
    with pytest.raises(ValueError, match="weight_grad must be one of"):
        get_method("xnor", weight_grad="exact")


# ======================================================================= dorefa
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
def test_dorefa_weight(shape: tuple[int, ...]) -> None:
    w = kink_tensor(shape)
    out, g, grad = weight_and_grad("dorefa", w, 0.5, 2)
    values = w.reshape(-1).tolist()
    e = sum(abs(v) for v in values) / len(values)
    assert_close(out, e * elementwise(sign_scalar, w))
    assert_exact(grad, g)  # identity: the scaled sign passes the gradient straight through


# ======================================================================== irnet
def ir_t(p: float, t_min: float = 0.1, t_max: float = 10.0) -> float:
    return 10 ** (math.log10(t_min) + (math.log10(t_max) - math.log10(t_min)) * p)


def ede(p: float, t_min: float = 0.1):
    t = ir_t(p, t_min)
    k = max(1 / t, 1.0)
    return lambda v: k * t * (1 - math.tanh(t * v) ** 2)


def irnet_reference(w: torch.Tensor, p: float, g: torch.Tensor, t_min: float = 0.1):
    """Libra-PB forward and closed-form gradient (EDE through the standardisation, times s_c).

    z = w - mean_c(w); sd = sqrt(sum z^2 / (n - 1)); w_std = z / sd; s_c = 2^round(log2 mean|w_std|_c)
    v = g s_c EDE(w_std);  dz = v / sd - z (v.z) / (sd^3 (n - 1));  dw = dz - mean_c(dz)
    """
    rows = w.reshape(w.shape[0], -1)
    n = rows.shape[1]
    z = rows - rows.sum(dim=1, keepdim=True) / n
    sd = torch.sqrt((z * z).sum(dim=1, keepdim=True) / (n - 1))
    w_std = z / sd
    s = torch.tensor([[2.0 ** round(math.log2(sum(abs(v) for v in row) / n))] for row in w_std.tolist()], dtype=w.dtype)
    forward = s * elementwise(sign_scalar, w_std)
    v = g.reshape(rows.shape) * s * elementwise(ede(p, t_min), w_std)
    dz = v / sd - z * (v * z).sum(dim=1, keepdim=True) / (sd**3 * (n - 1))
    dw = dz - dz.sum(dim=1, keepdim=True) / n
    return forward.view(w.shape), dw.view(w.shape)


@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize("t_min", [0.1, 1e-3])
def test_irnet_weight(progress: float, shape: tuple[int, ...], t_min: float) -> None:
    w = kink_tensor(shape)
    w[1] = w[1] * 0.05  # a channel whose mean|w_std| differs: scales are not all 1
    out, g, grad = weight_and_grad("irnet", w, progress, 2, t_min=t_min)
    ref_out, ref_grad = irnet_reference(w, progress, g, t_min)
    assert_close(out, ref_out)
    assert_close(grad, ref_grad)


def test_irnet_scale_is_a_power_of_two() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 8, dtype=DTYPE)
    w[:, 0] = 50.0 * torch.arange(1, 7, dtype=DTYPE)  # one outlier per channel: mean|w_std| well below 1
    scale = get_method("irnet").weight_scale(w)
    log2 = torch.log2(scale)
    assert torch.equal(log2, torch.round(log2))
    assert (scale < 1).all() and not scale.requires_grad


def test_irnet_schedule() -> None:
    method = get_method("irnet")
    assert method.t(0.0) == pytest.approx(0.1) and method.k(0.0) == pytest.approx(10.0)
    assert method.t(0.5) == pytest.approx(1.0) and method.k(0.5) == pytest.approx(1.0)
    assert method.t(1.0) == pytest.approx(10.0) and method.k(1.0) == 1.0
    assert method.schedule(0.25) == {"t": pytest.approx(10**-0.5), "k": pytest.approx(10**0.5)}
    upstream = get_method("irnet", t_min="1e-3")
    assert upstream.t(0.0) == pytest.approx(1e-3) and upstream.k(0.0) == pytest.approx(1e3)


# ========================================================================== fda
def fourier(p: float, omega: float = 0.1):
    n = 9 + math.floor(9 * p)

    def d(v: float) -> float:
        if abs(v) > 1:
            return 0.0
        return 4 * omega / math.pi * sum(math.cos((2 * i + 1) * omega * v) for i in range(n + 1))

    return d


@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("progress", PROGRESS)
def test_fda_weight(progress: float, shape: tuple[int, ...]) -> None:
    w = kink_tensor(shape)
    out, g, grad = weight_and_grad("fda", w, progress, 2)
    alpha = channel_mean_abs(w)
    assert_close(out, alpha * elementwise(sign_scalar, w))
    assert_close(grad, g * alpha * elementwise(fourier(progress), w))  # alpha detached: no d alpha/dw term


def test_fda_schedule_changes_backward() -> None:
    method = get_method("fda")
    assert [method.n_terms(p) for p in (0.0, 0.5, 1.0)] == [9, 13, 18]
    w = kink_tensor()
    _, _, grad0 = activation_and_grad("fda", w, 0.0)
    _, _, grad1 = activation_and_grad("fda", w, 1.0)
    assert (grad0 - grad1).abs().max() > 0.1


# ===================================================================== reactnet
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
def test_reactnet_weight(shape: tuple[int, ...]) -> None:
    w = kink_tensor(shape)
    out, g, grad = weight_and_grad("reactnet", w, 0.5, 2)
    assert_close(out, channel_mean_abs(w) * elementwise(sign_scalar, w))
    assert_exact(grad, g * elementwise(clip, w))  # the gradient of clamp(w, -1, 1): alpha not applied


# ===================================================================== bireal and the |w| = 1 conventions
def clamp_gradient(v: float) -> float:
    """d clamp(v, -1, 1) / dv as torch.clamp's backward gives it: 0 at the bounds."""
    return 1.0 if abs(v) < 1 else 0.0


@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
def test_bireal_weight_is_the_official_pair(shape: tuple[int, ...]) -> None:
    """Bi-Real's HardBinaryConv: mean|w_c| sign(w) forward, clamp(w, -1, 1)'s gradient (0 at |w| = 1), alpha not applied."""
    w = kink_tensor(shape)
    assert {-1.0, 1.0} <= set(w.reshape(-1).tolist())  # the kinks include the bounds
    out, g, grad = weight_and_grad("bireal", w, 0.5, 2)
    assert_close(out, channel_mean_abs(w) * elementwise(sign_scalar, w))
    assert_exact(grad, g * elementwise(clamp_gradient, w))
    upstream = w.clone().requires_grad_(True)
    torch.clamp(upstream, -1.0, 1.0).backward(g)
    assert_exact(grad, upstream.grad)  # the same as torch's own clamp backward, bounds included


def test_bireal_activations_are_approx_sign_and_polynomial_keeps_approx_sign_on_weights() -> None:
    a = kink_tensor((2, 3, 4, 5))
    _, g, grad = activation_and_grad("bireal", a, 0.5)
    assert_exact(grad, g * elementwise(approx_sign, a))
    w = kink_tensor((4, 3, 3, 3))
    _, g, grad = weight_and_grad("polynomial", w, 0.5, 2)
    assert_exact(grad, g * elementwise(approx_sign, w))


@pytest.mark.parametrize("name", ["reactnet", "xnor"])
def test_clipped_weight_surrogate_is_one_at_the_bound_where_torch_clamp_gives_zero(name: str) -> None:
    """The documented convention: SPEC's 1{|w| <= 1} here, torch.clamp's 0 upstream, at exactly |w| = 1 only."""
    w = torch.tensor([[-1.0, 1.0, 0.5, -1.5]], dtype=DTYPE)
    d = get_method(name).weight_derivative(w, 0.0)[0]  # xnor adds 1/n everywhere: compare with inside and outside
    assert d[0] == d[1] and (d[0] - d[3]).item() == pytest.approx((d[2] - d[3]).item()) and d[2] > d[3]
    x = w.clone().requires_grad_(True)
    torch.clamp(x, -1.0, 1.0).sum().backward()
    assert x.grad[0].tolist() == [0.0, 0.0, 1.0, 0.0]


def test_recu_clamp_passes_half_the_gradient_at_exactly_q() -> None:
    """ReCU's Q is a tensor (no host synchronisation): torch.clamp then splits the gradient at |z1| = Q; upstream's
    Python-float Q gives 0 there.  Measure-zero, documented in methods/recu.py."""
    z = torch.tensor([-2.0, -1.0, 0.3, 1.0, 2.0], dtype=DTYPE, requires_grad=True)
    q = torch.tensor(1.0, dtype=DTYPE)
    torch.clamp(z, -q, q).sum().backward()
    assert z.grad.tolist() == [0.0, 0.5, 1.0, 0.5, 0.0]


def test_reactnet_rsign_with_and_without_beta() -> None:
    method = get_method("reactnet")
    a = kink_tensor((2, 3, 4, 5)).requires_grad_(True)
    beta = torch.tensor([0.3, -1.0, 0.0], dtype=DTYPE).view(3, 1, 1).requires_grad_(True)
    out = method.activation(a, progress=0.5, beta=beta)
    shifted = (a + beta).detach()
    assert_exact(out.detach(), elementwise(sign_scalar, shifted))
    g = random_like(out)
    out.backward(g)
    local = g * elementwise(approx_sign, shifted)
    assert_close(a.grad, local)
    assert_close(beta.grad, local.sum(dim=(0, 2, 3)).view(3, 1, 1))
    # without a threshold RSign is sign with ApproxSign
    out, g, grad = activation_and_grad("reactnet", kink_tensor((2, 3, 4, 5)), 0.5)
    assert_exact(out, elementwise(sign_scalar, kink_tensor((2, 3, 4, 5))))
    assert_close(grad, g * elementwise(approx_sign, kink_tensor((2, 3, 4, 5))))


def test_reactnet_layer_learns_beta_per_input_channel() -> None:
    torch.manual_seed(0)
    layer = BinaryConv2d(3, 4, 3, padding=1, method="reactnet").to(DTYPE)
    beta = layer.activation_params["beta"]
    assert beta.shape == (3, 1, 1) and torch.equal(beta, torch.zeros_like(beta))
    assert "activation_params.beta" in dict(layer.named_parameters())
    assert "activation_params.beta" in layer.state_dict()
    with torch.no_grad():
        beta.copy_(torch.tensor([0.5, -0.2, 0.0], dtype=DTYPE).view(3, 1, 1))
    x = torch.randn(2, 3, 5, 5, dtype=DTYPE)
    y = layer(x)
    g = random_like(y)
    y.backward(g)
    # reference: conv(sign(x + beta) with ApproxSign backward, alpha_c sign(w)), by autograd
    beta_ref = beta.detach().clone().requires_grad_(True)
    w_b = channel_mean_abs(layer.weight) * elementwise(sign_scalar, layer.weight)
    y_ref = F.conv2d(reference_sign_approx(x + beta_ref), w_b, padding=1)
    y_ref.backward(g)
    assert_close(y.detach(), y_ref.detach())
    assert_close(beta.grad, beta_ref.grad)
    assert beta.grad.abs().sum() > 0


def test_reactnet_linear_and_real_activation_layers() -> None:
    linear = BinaryLinear(7, 5, method="reactnet")
    assert linear.activation_params["beta"].shape == (7,)
    linear(torch.randn(3, 7)).sum().backward()
    assert linear.activation_params["beta"].grad.shape == (7,)
    real_acts = BinaryConv2d(3, 4, 3, method="reactnet", binary_activations=False)
    assert len(real_acts.activation_params) == 0  # no threshold where nothing is binarized
    plain = BinaryConv2d(3, 4, 3, method="biper")
    assert len(plain.activation_params) == 0 and len(plain.state_dict()) == 2  # weight, alpha


# =================================================================== swish-sign
def signswish(x: torch.Tensor, beta: float) -> torch.Tensor:
    """SS_beta(x) = 2 sigmoid(beta x)[1 + beta x (1 - sigmoid(beta x))] - 1."""
    s = torch.sigmoid(beta * x)
    return 2 * s * (1 + beta * x * (1 - s)) - 1


@pytest.mark.parametrize("beta", [5.0, 2.0])
def test_swish_sign_weight_and_activation(beta: float) -> None:
    w = kink_tensor()

    def closed(v: float) -> float:
        bx = beta * v
        return beta * (2 - bx * math.tanh(bx / 2)) / (1 + math.cosh(bx))

    out, g, grad = weight_and_grad("swish-sign", w, 0.5, 2, beta=beta)
    assert_exact(out, elementwise(sign_scalar, w))
    assert_close(grad, g * elementwise(closed, w))
    method = get_method("swish-sign", beta=beta)
    a = w.clone().requires_grad_(True)
    out = method.activation(a, progress=0.5)
    out.backward(g)
    assert_exact(out.detach(), elementwise(sign_scalar, w))
    # the closed form is the derivative of SignSwish itself
    x = w.clone().requires_grad_(True)
    signswish(x, beta).backward(g)
    assert_close(a.grad, x.grad)
    assert a.grad[0, 0, 0, 0] == pytest.approx(g[0, 0, 0, 0].item() * beta)  # peak beta at 0


# ======================================================================= shared
def test_forward_only_scale() -> None:
    x = torch.tensor([1.0, -1.0, 1.0], dtype=DTYPE, requires_grad=True)
    scale = torch.tensor(0.25, dtype=DTYPE, requires_grad=True)
    out = forward_only_scale(x, scale)
    assert out.tolist() == [0.25, -0.25, 0.25]
    out.backward(torch.tensor([1.0, 2.0, 3.0], dtype=DTYPE))
    assert x.grad.tolist() == [1.0, 2.0, 3.0] and scale.grad is None


@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize(
    "name,surrogate",
    [
        ("xnor", lambda p: clip),
        ("dorefa", lambda p: approx_sign),
        ("irnet", ede),
        ("fda", fourier),
        ("swish-sign", lambda p: (lambda v: 5 * (2 - 5 * v * math.tanh(5 * v / 2)) / (1 + math.cosh(5 * v)))),
        ("bireal", lambda p: approx_sign),
    ],
)
def test_activation(name: str, surrogate, progress: float) -> None:
    a = kink_tensor((2, 3, 4, 5))
    out, g, grad = activation_and_grad(name, a, progress)
    assert_exact(out, elementwise(sign_scalar, a))
    assert_close(grad, g * elementwise(surrogate(progress), a))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", EXTRA)
def test_extra_methods_build_and_train(name: str, stage: int) -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", name, stage=stage)
    loss = F.cross_entropy(model(torch.randn(2, 3, 8, 8)), torch.tensor([3, 5]))  # small images: fast
    loss.backward()
    conv = model.stages[1][0].conv2
    assert torch.isfinite(loss)
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0


def test_a_schedule_is_kept_per_progress_value_and_hyper_parameters():
    """method.schedule: a layer's schedule (IR-Net's t and k, RBNN's, ReCU's tau, ReSTE's o, FDA's n) is evaluated once
    per value of its progress buffer, again after set_progress moves it, and never shared between hyper-parameters;
    the values are the plain formula's."""
    import torch

    from bnnbench import get_method
    from bnnbench.layers import BinaryConv2d, set_progress

    layer = BinaryConv2d(4, 4, 3, method="irnet")
    method, p = layer.method, layer.progress
    first = method.t(p)
    assert method.t(p) is first and method.k(p) is method.k(p)
    set_progress(layer, 0.5)
    moved = method.t(p)
    assert moved is not first and float(moved) == method.t(0.5) and float(method.k(p)) == method.k(0.5)
    other = get_method("irnet", t_min=1e-3)
    assert float(other.t(p)) == other.t(0.5) != float(moved)
    for name, schedule in (("rbnn", "t_activation"), ("recu", "tau"), ("reste", "o"), ("fda", "n_terms")):
        m = get_method(name)
        q = torch.full((), 0.25, dtype=torch.float64)
        assert getattr(m, schedule)(q) is getattr(m, schedule)(q)
        assert float(getattr(m, schedule)(q)) == float(getattr(m, schedule)(0.25))


def test_layers_sharing_one_method_keep_their_own_schedules():
    """A backbone's layers share one method object, each with its own progress buffer: a schedule kept for one is
    not another's (here one layer has moved on), and a deep copy (the packed export's) evaluates its own."""
    import copy

    from bnnbench import get_method
    from bnnbench.layers import BinaryConv2d, set_progress

    method = get_method("irnet")
    first, second = (BinaryConv2d(4, 4, 3, method=method) for _ in range(2))
    assert first.method is second.method
    method.t(first.progress), method.t(second.progress)
    set_progress(second, 0.5)
    assert float(method.t(first.progress)) == method.t(0.0) and float(method.t(second.progress)) == method.t(0.5)
    twin = copy.deepcopy(second)
    assert float(twin.method.t(twin.progress)) == method.t(0.5)
