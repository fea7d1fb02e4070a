"""channels_last models on the CPU: the binary layer's kernels keep the memory format end to end.

The hardtanh's backward gives its gradient in its output's memory format (a pooling's NCHW gradient would otherwise
turn every later BatchNorm backward into a mixed-format one); act_norm's fused backward, DSQ's, ReActNet's shifted
sign and RAD's channel moments take channels_last tensors (one sample after another in memory, as contiguous ones)
and give what they give for the contiguous tensor: the same per-element values bit for bit where no sum enters them,
within float32 rounding where one does (a sample's sums run in memory order); a channels_last ResNet's gradients
stay channels_last all the way down; and a run's default turns channels_last on for the CPU only under bf16
autocast on bf16 hardware and where every binary layer's kernels take it (a plugin may say its own do not)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bnnbench
import bnnbench.methods.dsq as dsq
import bnnbench.methods.rad as rad
from bnnbench import act_norm_fused, elementwise, functional
from bnnbench.layers import BinaryConv2d, channels_last_kernels
from bnnbench.methods.sign_ste import SignSTE
from bnnbench.runners import train as train_module
from bnnbench.runners.bench_train import StepSettings, training_step

CL = torch.channels_last


@dataclass
class ContiguousOnly(SignSTE):
    """A plugin whose own kernels would take contiguous activations only."""

    channels_last_kernels = False


def is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


def test_the_hardtanhs_gradient_takes_its_outputs_memory_format_with_torchs_values():
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 8, 5, 5, generator=generator) * 2).bfloat16().contiguous(memory_format=CL)
    grad = torch.randn(4, 8, 5, 5, generator=generator).bfloat16()  # NCHW, as an average pooling's gradient arrives
    leaf = x.clone().requires_grad_(True)
    out = functional.hardtanh_(leaf + 0)  # (a leaf's .grad would take the leaf's layout whatever the backward gave)
    (got,) = torch.autograd.grad(out, leaf, grad)
    assert is_channels_last(got)
    assert torch.equal(got, torch.ops.aten.hardtanh_backward(grad, x.clamp(-1, 1), -1.0, 1.0))
    assert not torch.equal(got, grad)  # the mask applied: some inputs lie outside [-1, 1]


def act_norm_gradient(x: torch.Tensor, grad: torch.Tensor, derivative) -> torch.Tensor:
    leaf = x.detach().clone().requires_grad_(True)
    with functional.formulas(bf16="fused", fp32="fused"):
        functional.normalized_surrogate_sign(leaf, derivative, 1e-5).backward(grad)
    return leaf.grad


def rbnn_like(x: torch.Tensor) -> torch.Tensor:
    return ((x.abs() <= 1).to(x.dtype) * (1 - x.abs())).to(x.dtype)


@pytest.mark.parametrize("derivative", [functional.approx_sign_derivative, rbnn_like], ids=["formula", "tensor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("grad_format", [torch.contiguous_format, CL], ids=["nchw-grad", "cl-grad"])
def test_act_norms_fused_backward_takes_channels_last_and_gives_the_contiguous_result(dtype, derivative, grad_format, threads):
    generator = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 16, 9, 9, generator=generator) * 3 + 0.5).to(dtype)
    grad = torch.randn(6, 16, 9, 9, generator=generator).to(dtype)
    assert act_norm_fused.covers(x.contiguous(memory_format=CL))
    for count in (1, 2):
        threads(count)
        want = act_norm_gradient(x, grad, derivative)
        got = act_norm_gradient(x.contiguous(memory_format=CL), grad.contiguous(memory_format=grad_format), derivative)
        assert is_channels_last(got)
        if dtype == torch.bfloat16:  # one rounding of a float32 value that differs in its last bits at most
            torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-7 * want.abs().max().item())
            assert (got != want).float().mean() < 0.01
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_dsqs_fused_backward_takes_channels_last_and_gives_the_contiguous_result():
    generator = torch.Generator().manual_seed(2)
    x = (torch.randn(8, 16, 7, 7, generator=generator) * 0.9).bfloat16()
    grad = torch.randn(8, 16, 7, 7, generator=generator).bfloat16()
    method = bnnbench.get_method("dsq")
    results = []
    for x_format, grad_format in [(torch.contiguous_format, torch.contiguous_format), (CL, torch.contiguous_format), (CL, CL)]:
        leaf = x.contiguous(memory_format=x_format).detach().requires_grad_(True)
        u, alpha = torch.tensor(1.0, requires_grad=True), torch.tensor(0.2, requires_grad=True)
        with functional.formulas(bf16="fused"):
            out = method.activation(leaf, 0.5, u=u, alpha=alpha)
        out.backward(grad.contiguous(memory_format=grad_format))
        results.append((leaf.grad, u.grad, alpha.grad))
    want = results[0]
    for got in results[1:]:
        assert is_channels_last(got[0])
        torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2**-7, atol=2**-7 * want[0].abs().max().item())
        for g, w in zip(got[1:], want[1:]):  # float32 sums of the rows in another order, rounded to the scalar
            assert abs(g.item() - w.item()) <= 1e-2 * abs(w.item()) + 1e-6
    scalars = tuple(np.float32(v) for v in (1.0, -1.0, 0.5, 2.0))
    flat = dsq._fused_gradients(x, grad, scalars)
    last = dsq._fused_gradients(x.contiguous(memory_format=CL), grad.contiguous(memory_format=CL), scalars)
    torch.testing.assert_close(last[0].float(), flat[0].float(), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("method", ["sign-ste", "biper", "dsq", "reactnet", "rad"])
def test_a_channels_last_resnets_gradients_stay_channels_last(method):
    """Every activation gradient of a channels_last model under bf16 autocast (the fused formulas) is channels_last
    (the pooling's gradient aside), and so is every 3x3 conv's weight gradient.  (Its loss is not the NCHW model's:
    oneDNN's bf16 stem rounds some outputs differently in the two formats on one thread, and a binary network passes
    a flipped sign on.)"""
    torch.manual_seed(0)
    model = bnnbench.build_model("resnet20", method).train()
    model = model.to(memory_format=CL)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 3])
    seen: list[tuple[str, torch.Tensor, bool]] = []
    pooled: list[torch.Tensor] = []  # the last block's output, whose gradient the pooling gives (NCHW)

    def watch(module_name):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.requires_grad and output.dim() == 4 and output.shape[-1] > 1:
                output.register_hook(lambda g: seen.append((module_name, output, is_channels_last(g))))

        return hook

    model.pool.register_forward_pre_hook(lambda module, inputs: pooled.append(inputs[0]))
    for name, module in model.named_modules():
        if name and module is not model.pool:
            module.register_forward_hook(watch(name))
    with torch.autocast("cpu", dtype=torch.bfloat16), functional.formulas(bf16="fused"):
        logits = model(images.contiguous(memory_format=CL))
    F.cross_entropy(logits.float(), labels).backward()
    inner = [(name, cl) for name, output, cl in seen if output is not pooled[0]]
    assert len(inner) > 50 and all(cl for _, cl in inner), [name for name, cl in inner if not cl][:5]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(is_channels_last(c.weight.grad) for c in convs if c.weight.grad is not None and c.weight.shape[-1] > 1)


@pytest.mark.parametrize(
    "method, asked, device, amp, hardware, expected",
    [
        ("sign-ste", None, "cpu", True, True, True),
        ("biper", None, "cpu", True, True, True),
        ("fp", None, "cpu", True, True, True),
        ("rad", None, "cpu", True, True, True),
        ("reactnet", None, "cpu", True, True, True),
        ("contiguous-only", None, "cpu", True, True, False),
        ("sign-ste", None, "cpu", False, True, False),
        ("sign-ste", None, "cpu", True, False, False),
        ("contiguous-only", True, "cpu", True, True, True),
        ("sign-ste", False, "cpu", True, True, False),
        ("contiguous-only", None, "cuda", True, False, True),
    ],
)
def test_a_runs_channels_last_default(method, asked, device, amp, hardware, expected, monkeypatch):
    monkeypatch.setattr(train_module, "bf16_hardware", lambda: hardware)
    if method == "contiguous-only":  # (a plugin instance: build_model would look its name up)
        model = torch.nn.Sequential(BinaryConv2d(4, 4, 3, method=ContiguousOnly()))
    else:
        model = bnnbench.build_model("resnet20", method)
    assert channels_last_kernels(model) is (method != "contiguous-only")
    assert train_module.resolve_channels_last(asked, torch.device(device), amp, model) is expected
    mixed = torch.nn.Sequential(BinaryConv2d(4, 4, 3, method="sign-ste", act_method=ContiguousOnly()))  # the activations' counts
    assert not channels_last_kernels(mixed)


def test_the_benchmark_step_records_each_models_format(monkeypatch):
    monkeypatch.setattr(train_module, "bf16_hardware", lambda: True)
    settings = StepSettings(batch=2, amp=True, channels_last=None)
    assert training_step("sign-ste", settings).channels_last is True
    assert training_step("rad", settings).channels_last is True
    assert training_step("sign-ste", StepSettings(batch=2, amp=True)).channels_last is False  # as asked


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reactnets_shifted_sign_and_fused_backward_take_channels_last(dtype, threads):
    generator = torch.Generator().manual_seed(4)
    x = (torch.randn(5, 24, 7, 7, generator=generator) * 1.2).to(dtype)
    x.view(-1)[::13] = 0.0
    shift = torch.randn(24, 1, 1, generator=generator) * 0.3
    x.view(-1)[5::17] = (-shift.expand(5, 24, 7, 7).reshape(-1)[5::17]).to(dtype)  # x + shift at 0 (bf16 rounding aside)
    grad = torch.randn(5, 24, 7, 7, generator=generator).to(dtype)
    last = x.contiguous(memory_format=CL)
    for count in (1, 2):
        threads(count)
        signs = functional._shifted(elementwise.SHIFTED_SIGN, last, shift, ())  # the kernel (None: torch's formula)
        assert signs is not None and is_channels_last(signs) and torch.equal(signs, functional._shifted(elementwise.SHIFTED_SIGN, x, shift, ()))
        assert torch.equal(signs, (x.float() + shift >= 0).to(dtype) * 2 - 1)
        want = elementwise.shifted_approx_sign_backward(x, shift, grad)
        for g in (grad, grad.contiguous(memory_format=CL)):
            got = elementwise.shifted_approx_sign_backward(last, shift, g)
            assert is_channels_last(got[0]) and torch.equal(got[0], want[0])
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    # through the method, under its fused formulas: what the contiguous layer gets
    method = bnnbench.get_method("reactnet")
    results = []
    for inp in (x, last):
        leaf, beta = inp.detach().clone().requires_grad_(True), shift.clone().requires_grad_(True)
        with functional.formulas(bf16="fused", fp32="fused"):
            out = method.activation(leaf, 0.5, beta=beta)
        out.backward(grad)
        results.append((out, leaf.grad, beta.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    torch.testing.assert_close(results[1][2], results[0][2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rads_moments_and_their_gradient_take_channels_last(dtype, threads):
    generator = torch.Generator().manual_seed(5)
    a = (torch.randn(6, 24, 7, 7, generator=generator) * 0.8 + 0.1).to(dtype)
    grad_signs = torch.randn(6, 24, 7, 7, generator=generator).to(dtype)
    last = a.contiguous(memory_format=CL)
    with functional.formulas(bf16="fused", fp32="fused"):
        assert rad.fuses(last) and rad.fuses(a)
    shares = [torch.randn(24, generator=generator) for _ in range(2)]
    for count in (1, 2):
        threads(count)
        want, got = rad._fused_moments(a), rad._fused_moments(last)
        for g, w in zip(got, want):  # float32 sums per sample in another order, float64 across samples
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
        for signs in (None, grad_signs, grad_signs.contiguous(memory_format=CL)):
            flat = rad._fused_moments_gradient(a, want[0], shares[0], shares[1], signs)
            other = rad._fused_moments_gradient(last, want[0], shares[0], shares[1], signs)
            assert is_channels_last(other) and torch.equal(other, flat)  # the same formula per element, the same values
    # through the method, as a training forward calls it: the contiguous layer's gradient within float32 sums' rounding
    method = bnnbench.get_method("rad")
    results = []
    for inp in (a, last):
        leaf = inp.detach().clone().requires_grad_(True)
        with functional.formulas(bf16="fused", fp32="fused"):
            signs, loss = method.activation_with_loss(leaf, 2, 0.5)
        (signs * grad_signs).sum().add(loss).backward()
        results.append((signs, loss, leaf.grad))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][2].float(), results[0][2].float(), rtol=2**-7, atol=1e-5)
