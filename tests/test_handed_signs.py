"""The hardtanh between binary layers hands the next layer its signs (functional.hardtanh_ with ``signs``): made in
the clamp's pass, taken once by the binarizer's sign, never where x changed since, and made only where a binary
layer takes the hardtanh's output as it is with sign(a) (not before a pool or the head, not for ReActNet's
sign(a + beta))."""

from __future__ import annotations

import pytest
import torch

import bnnbench
from bnnbench import functional
from bnnbench.functional import Hardtanh


def test_the_signs_are_taken_once_and_not_after_an_in_place_change():
    x = torch.randn(4, 3, 8, 8).bfloat16()
    out = functional.hardtanh_(x, signs=True)
    handed = out.__dict__[functional._HANDED][0]
    assert torch.equal(handed, functional.sign(x.clone()))
    assert functional.sign(out) is handed  # the binarizer's sign reads nothing
    assert functional._HANDED not in out.__dict__
    fresh = functional.sign(out)
    assert fresh is not handed and torch.equal(fresh, handed)
    y = functional.hardtanh_(torch.randn(4, 3, 8, 8), signs=True)
    y.mul_(-1.0)  # changed in place: its handed signs are stale
    assert torch.equal(functional.sign(y), torch.where(y >= 0, 1.0, -1.0))


def test_gradients_through_the_hardtanh_are_torchs_with_and_without_signs():
    h = torch.randn(5, 4, 6, 6, generator=torch.Generator().manual_seed(3)) * 2
    grads = []
    for signs in (True, False):
        leaf = h.clone().requires_grad_(True)
        out = functional.hardtanh_(leaf * 1.0, signs=signs)
        (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
        grads.append(leaf.grad)
    reference = h.clone().requires_grad_(True)
    (torch.nn.functional.hardtanh(reference) * torch.arange(h.numel()).reshape(h.shape)).sum().backward()
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], reference.grad)


def test_the_backward_makes_no_zero_gradient_for_the_signs():
    """The signs are a second output no gradient reaches: autograd must not fill an activation-sized tensor of zeros
    for them before the backward runs (it did, 15 ms a ResNet-20 step, until set_materialize_grads(False))."""
    from torch.profiler import ProfilerActivity, profile

    leaf = torch.randn(8, 4, 16, 16, requires_grad=True)
    out = functional.hardtanh_(leaf * 1.0, signs=True)
    loss = (functional.surrogate_sign(out, functional.identity_derivative) * out).sum()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss.backward()
    filled = [e.name for e in prof.events() if e.name in ("aten::zeros", "aten::zero_", "aten::fill_") and e.input_shapes[0] == list(leaf.shape)]
    assert filled == []  # (the loss's own gradient, a 0-dim one, is filled)
    a = out.detach()
    assert torch.equal(leaf.grad, torch.where(leaf.detach().abs() < 1, functional.sign(a) + a, 0.0))  # d(s a)/da, STE


def signs_flags(model: torch.nn.Module) -> list[bool]:
    return [m.signs for m in model.modules() if isinstance(m, Hardtanh)]


@pytest.mark.parametrize(("net", "family", "expected"), [
    ("resnet20", "cifar", [True] * 18 + [False]),  # the stem's, every block's but the last block's output (the head's)
    ("resnet18", "imagenet", [False] + [True] * 15 + [False]),  # the stem's goes to a max-pool
    ("vgg_small", "cifar", [True] * 5 + [False]),  # the last goes to the Linear
])
def test_only_a_hardtanh_whose_output_a_binary_layer_signs_makes_signs(net, family, expected):
    assert signs_flags(bnnbench.build_model(net, "biper", family=family)) == expected
    assert signs_flags(bnnbench.build_model(net, "dsq", family=family)) == expected  # DSQ's forward: sign(a)
    assert not any(signs_flags(bnnbench.build_model(net, "reactnet", family=family)))  # sign(a + beta)


@pytest.mark.parametrize("method", ["sign-ste", "biper", "rad", "dsq"])
def test_a_training_forward_takes_every_handed_sign(method):
    """No handed signs stay behind on a hardtanh's output (they would be kept, unused, until the backward)."""
    model = bnnbench.build_model("resnet20", method).train()
    outputs = []
    hooks = [m.register_forward_hook(lambda mod, args, out: outputs.append(out)) for m in model.modules() if isinstance(m, Hardtanh)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(4, 3, 16, 16))
    for h in hooks:
        h.remove()
    assert len(outputs) == 19 and not any(functional._HANDED in out.__dict__ for out in outputs)


@pytest.mark.parametrize("method", ["biper", "rad", "dsq", "reactnet"])
def test_inference_mode_gives_no_grads_outputs(method):
    """Under torch.inference_mode (whose tensors count no versions) neither the handed signs nor the conv's recipe
    of its signs are kept; the outputs are no_grad's, bit for bit."""
    model = bnnbench.build_model("resnet20", method).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fast = model(x)
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(fast, expected)
