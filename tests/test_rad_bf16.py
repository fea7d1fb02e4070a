"""RAD's distribution loss on bfloat16 activations with the fused bf16 formulas (bnnbench.methods.rad.
_ChannelMomentsFused): the channel moments in float32 sweeps and the input's gradient in one pass, within bfloat16's
rounding of the float64 formula, the same on one and two threads, a moment no loss uses sending nothing back;
torch's formulas (``formulas(bf16="torch")``) keep the bit-exact path (tests/test_fast_path.py)."""

from __future__ import annotations

import pytest
import torch

from bnnbench import functional
from bnnbench.methods import rad


def float64_loss_and_gradient(a: torch.Tensor) -> tuple[float, torch.Tensor]:
    x = a.double().requires_grad_(True)
    loss = rad.distribution_loss(x)  # float64 takes autograd through the formula
    loss.backward()
    return loss.item(), x.grad


def fused_loss_and_gradient(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = a.clone().requires_grad_(True)
    loss = rad.distribution_loss(leaf)
    assert type(rad.channel_moments(a.clone().requires_grad_())[0].grad_fn).__name__ == "_ChannelMomentsFusedBackward"
    loss.backward()
    return loss.detach(), leaf.grad


def activations(shape, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    a = (torch.randn(*shape, generator=generator) * 0.7 + 0.2).clamp(-1, 1)
    a.view(-1)[::5] = 0.0
    a[:, 1] = 0.25  # a constant channel: variance 0, the loss at its kink
    return a.bfloat16()


@pytest.mark.parametrize("shape", [(6, 5, 7, 3), (40, 16, 9, 9), (9, 4)], ids=lambda s: "x".join(map(str, s)))
def test_the_loss_and_gradient_are_the_formulas_within_rounding(shape):
    a = activations(shape, sum(shape))
    loss, grad = fused_loss_and_gradient(a)
    want_loss, want_grad = float64_loss_and_gradient(a)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(want_loss, rel=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=2**-7, atol=2**-8 * want_grad.abs().max().item())
    error = ((grad.double() - want_grad).norm() / want_grad.norm()).item()
    assert error < 0.004


def test_the_same_on_one_and_two_threads(threads):
    a = activations((12, 8, 5, 5), 1)
    results = []
    for count in (1, 2):
        threads(count)
        results.append(fused_loss_and_gradient(a))
    (loss1, grad1), (loss2, grad2) = results
    assert torch.equal(loss1, loss2) and torch.equal(grad1, grad2)


@pytest.mark.parametrize("uses", ["mean", "mean-square"])
def test_a_moment_no_loss_uses_sends_nothing_back(uses):
    a = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(4)).bfloat16()
    a[0, 0, 0, 0] = float("inf")
    leaf = a.clone().requires_grad_()
    mean, mean_square = rad.channel_moments(leaf)
    (mean if uses == "mean" else mean_square).sum().backward()
    if uses == "mean":  # 1/M everywhere, the infinite element too (no 0 * inf term)
        assert torch.equal(leaf.grad, torch.full_like(a, 1 / 80))
    else:  # 2 (a - mu) / M: not finite in the infinite element's channel only (its mean is infinite), as the formula's
        assert not torch.isfinite(leaf.grad[:, 0]).any() and torch.isfinite(leaf.grad[:, 1:]).all()
        centred = a[:, 1:].double() - a[:, 1:].double().mean(dim=(0, 2, 3), keepdim=True)
        torch.testing.assert_close(leaf.grad[:, 1:].double(), 2 * centred / 80, rtol=2**-7, atol=1e-4)


@pytest.mark.parametrize(("method", "act_method", "takes"), [("rad", None, True), ("sign-ste", "rad", True), ("sign-ste", None, False)])
def test_a_run_with_rads_loss_records_its_bf16_formulas(method, act_method, takes):
    from bnnbench.layers import BinaryConv2d, takes_fused_formulas

    model = torch.nn.Sequential(BinaryConv2d(4, 4, 3, method=method, act_method=act_method))
    assert takes_fused_formulas(model, torch.bfloat16) is takes and takes_fused_formulas(model, torch.float32) is takes


def test_where_the_kernels_do_not_take_the_input_torch_computes_the_same_gradient(monkeypatch):
    a = activations((6, 4, 5, 5), 2)
    _, want = fused_loss_and_gradient(a)
    monkeypatch.setattr(rad.elementwise, "apply", lambda *args, **kwargs: None)
    leaf = a.clone().requires_grad_(True)
    rad.distribution_loss(leaf).backward()
    torch.testing.assert_close(leaf.grad, want, rtol=2**-8, atol=0)


# ------------------------------------------------------------------------------------------------------------
# the binarizer and the moments in one node (rad._SignAndMomentsFused, through Method.activation_with_loss)


def one_node_outputs(a: torch.Tensor, grad_signs: torch.Tensor, one_node: bool):
    """(signs, loss, gradient to a) of RAD's activation with its loss, ``one_node`` or as two nodes apart."""
    method = rad.RAD()
    leaf = a.clone().requires_grad_(True)
    if one_node:
        signs, loss = method.activation_with_loss(leaf, 2, 0.0)
        assert type(signs.grad_fn).__name__ == "_SignAndMomentsFusedBackward"
    else:
        loss, signs = method.activation_loss(leaf, 2, 0.0), method.activation(leaf)
    ((signs.float() * grad_signs.float()).sum() + 50 * loss).backward()
    return signs.detach(), loss.detach(), leaf.grad


def float64_one_node_gradient(a: torch.Tensor, grad_signs: torch.Tensor) -> torch.Tensor:
    x = a.double().requires_grad_(True)
    (50 * rad.RAD().loss_weight * rad.distribution_loss(x)).backward()
    return x.grad + grad_signs.double() * (x.detach().abs() <= 1).double()


@pytest.mark.parametrize("shape", [(6, 5, 7, 3), (40, 16, 9, 9), (9, 4)], ids=lambda s: "x".join(map(str, s)))
def test_one_node_gives_the_two_nodes_forward_and_a_gradient_within_one_rounding(shape):
    a = activations(shape, sum(shape) + 1)
    a.view(-1)[3] = 1.5  # outside the clipped STE's window (a layer's input need not come from a hardtanh)
    grad_signs = torch.randn(shape, generator=torch.Generator().manual_seed(7)).bfloat16()
    signs, loss, grad = one_node_outputs(a, grad_signs, True)
    want_signs, want_loss, two_nodes = one_node_outputs(a, grad_signs, False)
    assert torch.equal(signs, want_signs) and torch.equal(loss, want_loss)
    want = float64_one_node_gradient(a, grad_signs)
    # one rounding of a float32 sum: within half a bfloat16 ulp of the float64 value, plus float32's noise
    ulp = torch.where(want == 0, torch.zeros_like(want), 2.0 ** (torch.floor(torch.log2(want.abs())) - 7))
    assert ((grad.double() - want).abs() <= 0.5 * ulp + 1e-6 * want.abs().max()).all()
    assert grad.double().sub(want).norm() <= two_nodes.double().sub(want).norm()  # two roundings and a bf16 add


def test_one_node_on_one_and_two_threads_and_torchs_formulas_keep_two(threads):
    a = activations((12, 8, 5, 5), 3)
    grad_signs = torch.randn(a.shape, generator=torch.Generator().manual_seed(8)).bfloat16()
    results = []
    for count in (1, 2):
        threads(count)
        results.append(one_node_outputs(a, grad_signs, True)[2])
    assert torch.equal(*results)
    with functional.formulas(bf16="torch"):
        signs, _ = rad.RAD().activation_with_loss(a.clone().requires_grad_(True), 2, 0.0)
    assert type(signs.grad_fn).__name__ == "_SurrogateSignBackward"


def test_one_node_in_a_layer_and_where_the_kernels_do_not_take_the_gradient(monkeypatch):
    from bnnbench.layers import BinaryConv2d

    layer = BinaryConv2d(4, 6, 3, padding=1, method="rad").train()
    x = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(9)).clamp(-1, 1).requires_grad_(True)
    calls = []
    apply = rad._SignAndMomentsFused.apply
    monkeypatch.setattr(rad._SignAndMomentsFused, "apply", lambda a: calls.append(a.shape) or apply(a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert calls == [x.shape] and layer.activation_loss_term is not None
    monkeypatch.undo()
    (y.float().sum() + layer.activation_loss_term).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    a = activations((6, 4, 5, 5), 4)
    grad_signs = torch.randn(a.shape, generator=torch.Generator().manual_seed(10)).bfloat16()
    want = one_node_outputs(a, grad_signs, True)[2]
    monkeypatch.setattr(rad.elementwise, "apply", lambda *args, **kwargs: None)
    torch.testing.assert_close(one_node_outputs(a, grad_signs, True)[2], want, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 5, 7, 3), (40, 16, 9, 9)], ids=lambda s: "x".join(map(str, s)))
def test_float32_with_fused_formulas_takes_the_sweeps_within_float32_rounding(shape, threads):
    """--fp32-formulas fused: a float32 a takes the float32 sweeps too, within float32's rounding of the float64
    formula, as near it as torch's float32 formula (the default, which does not take them), on 1 and 2 threads."""
    a = activations(shape, sum(shape) + 1).float()
    want_loss, want_grad = float64_loss_and_gradient(a)
    results = []
    for count in (1, 2):
        threads(count)
        with functional.formulas(fp32="fused"):
            results.append(fused_loss_and_gradient(a))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    loss, grad = results[0]
    assert grad.dtype == torch.float32 and loss.item() == pytest.approx(want_loss, rel=1e-6)
    leaf = a.clone().requires_grad_(True)
    assert type(rad.channel_moments(leaf)[0].grad_fn).__name__ != "_ChannelMomentsFusedBackward"  # torch's: the default
    rad.distribution_loss(leaf).backward()
    error, torchs = (((g.double() - want_grad).norm() / want_grad.norm()).item() for g in (grad, leaf.grad))
    assert error < 1e-6 and error <= 2 * torchs + 1e-7, (error, torchs)
