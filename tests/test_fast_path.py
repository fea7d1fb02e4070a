"""The fast training step keeps today's numbers: fp32 bit for bit against the reference formulas, compiled sign
equal to eager, no recompilation when the training progress moves, bf16 chosen from what the CPU reports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bnnbench
import bnnbench.elementwise as elementwise
import bnnbench.functional as functional
import bnnbench.method
import bnnbench.methods.reactnet as reactnet
from bnnbench.layers import BinaryLinear, set_progress
from bnnbench.runners import train as train_module
from bnnbench.runners.spec import Machine

EDGES = [0.0, -0.0, float("nan"), -float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45, 3.0, -3.0, 1.0, -1.0]


def reference_sign(x: torch.Tensor) -> torch.Tensor:
    """The sign of 2026-11 (before the fast path): +1 where x >= 0, else -1, through a boolean mask."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def reference_normalized(x: torch.Tensor, derivative, eps: float) -> torch.Tensor:
    """act_norm of 2026-11: divide by the per-sample standard deviation, then the surrogate sign, all by autograd."""
    dims = tuple(range(1, x.dim()))
    return functional.surrogate_sign(x / torch.sqrt(x.var(dim=dims, keepdim=True) + eps), derivative)


class ReferenceSurrogateSign(torch.autograd.Function):
    """surrogate_sign of 2026-11: keeps x, backward ``grad * derivative(x)`` as two torch operators (the STE's too)."""

    @staticmethod
    def forward(ctx, x, derivative):
        ctx.save_for_backward(x)
        ctx.derivative = derivative
        return reference_sign(x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output * ctx.derivative(x), None


def reference_surrogate(x: torch.Tensor, derivative, shift=None) -> torch.Tensor:
    """surrogate_sign of 2026-11: a threshold was added by autograd before the sign."""
    return ReferenceSurrogateSign.apply(x if shift is None else x + shift, derivative)


def reference_conv(a, weight, bias, stride, padding, dilation, groups, scale=None):
    """The binary layer's conv of 2026-11: F.conv2d, which keeps its +-1 input in full precision for the backward
    (times the scale where the fused fp32 formulas give one)."""
    out = F.conv2d(a, weight, bias, stride, padding, dilation, groups)
    return out if scale is None else out * scale


def use_reference(monkeypatch) -> None:
    monkeypatch.setattr(elementwise, "covered", lambda x: False)  # every one-pass kernel off: the torch formulas
    monkeypatch.setattr(functional, "sign", reference_sign)
    monkeypatch.setattr(functional, "_SurrogateSign", ReferenceSurrogateSign)
    monkeypatch.setattr(functional, "conv2d_of_signs", reference_conv)
    monkeypatch.setattr(bnnbench.method, "normalized_surrogate_sign", reference_normalized)
    monkeypatch.setattr(reactnet, "surrogate_sign", reference_surrogate)
    monkeypatch.setattr(functional, "scale_channels", reference_scale)


def reference_scale(y: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The learned alpha of 2026-11: ``y * alpha`` by autograd, which keeps y for alpha's gradient."""
    return y * alpha


def test_sign_is_the_reference_sign_on_every_edge_value_eager_and_compiled():
    x = torch.tensor(EDGES)
    assert torch.equal(bnnbench.sign(x), reference_sign(x))
    compiled = torch.compile(bnnbench.sign, dynamic=False)
    assert torch.equal(compiled(x), reference_sign(x))
    bf16 = x.to(torch.bfloat16)
    assert bnnbench.sign(bf16).dtype == torch.bfloat16 and torch.equal(bnnbench.sign(bf16), reference_sign(bf16))


def train_steps(
    method: str, steps: int = 3, amp: bool = False, formulas: str = "torch", gradients: bool = False, fp32: str = "torch", dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The state after ``steps`` SGD steps on a fixed batch; with ``gradients`` the last step's gradients instead.
    ``formulas``/``fp32``: bfloat16's and float32's (:func:`bnnbench.functional.formulas`); ``dtype``: the model's."""
    torch.manual_seed(0)
    model = bnnbench.build_model("resnet20", method, stage=2).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(8, 3, 16, 16, generator=generator).to(dtype), torch.randint(0, 10, (8,), generator=generator)
    set_progress(model, 0.5)
    for step in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp), functional.formulas(bf16=formulas, fp32=fp32):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        extra = bnnbench.regularization_loss(model)
        loss = loss if extra is None else loss + extra
        optimizer.zero_grad()
        loss.backward()
        if gradients and step == steps - 1:
            return {k: v.grad.clone() for k, v in model.named_parameters() if v.grad is not None}
        optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", [m for m in bnnbench.list_methods() if m != "fp"])
def test_training_steps_are_bit_identical_to_the_reference_formulas(method, amp, monkeypatch):
    """The fast path (one-pass kernels for the sign, the surrogates and their products with the gradient, the STE
    handing the gradient on, act_norm's variance, act_norm keeping only x and the per-sample scale, the conv keeping
    the binarizer's input or its +-1 input in bits) gives today's weights after 3 SGD steps, bit for bit, in fp32 and under bf16 autocast
    with torch's bf16 formulas (the fused ones: next test)."""
    fast = train_steps(method, amp=amp)
    use_reference(monkeypatch)
    reference = train_steps(method, amp=amp)
    assert fast.keys() == reference.keys()
    assert all(torch.equal(fast[k], reference[k]) for k in fast), [k for k in fast if not torch.equal(fast[k], reference[k])]


@pytest.mark.parametrize("method", ["biper", "rbnn", "dsq", "irnet", "recu", "reactnet"])
def test_fused_bf16_formulas_train_as_close_to_fp32_as_torchs(method):
    """act_norm, alpha, DSQ's soft quantizer and ReActNet's shift gradient in float32 kernels under bf16 (the default):
    3 SGD steps end as near fp32's weights as with torch's bf16 formulas, and not at them (the formulas do run)."""
    exact = train_steps(method)
    fused, torchs = train_steps(method, amp=True, formulas="fused"), train_steps(method, amp=True, formulas="torch")
    floats = [k for k in exact if exact[k].is_floating_point()]

    def distance(weights):
        return sum((weights[k].double() - exact[k].double()).norm() ** 2 for k in floats).sqrt().item()

    assert not all(torch.equal(fused[k], torchs[k]) for k in floats)
    assert distance(fused) <= 1.25 * distance(torchs), (distance(fused), distance(torchs))


@pytest.mark.parametrize("method", ["biper", "recu", "lcr-rbnn", "rad", "dsq", "fda", "swish-sign", "reste", "lcr-irnet", "reactnet"])
def test_fused_fp32_formulas_keep_the_forward_and_the_gradients_within_rounding(method):
    """--fp32-formulas fused (act_norm's sweep, alpha in the conv's backward, RAD's moments, DSQ's soft quantizer
    in one pass, FDA's series by recurrence, ReActNet's shift gradient in the surrogate's pass): the same forward as
    torch's formulas, bit for bit (one step's loss, so no sign decides otherwise); one step's gradients within float32's rounding of
    torch's (1e-5 of the norm), except alpha's, a sum that the BatchNorm after it cancels almost entirely (BN is
    invariant to a channel's scale, so alpha's gradient is the eps term's and float32's rounding of the large
    terms: measured 2026-12-04 within 3e-3 of float64's, torch's within 2e-4), here within 1e-2."""
    torchs, fused = train_steps(method, steps=1, gradients=True), train_steps(method, steps=1, gradients=True, fp32="fused")
    assert fused.keys() == torchs.keys()

    def relative(keys, got, want):
        return (sum((got[k].double() - want[k].double()).norm() ** 2 for k in keys).sqrt() / sum(want[k].double().norm() ** 2 for k in keys).sqrt()).item()

    alphas = [k for k in torchs if k.endswith(".alpha")]
    others = [k for k in torchs if k not in alphas]
    assert relative(others, fused, torchs) < 1e-5 and (not alphas or relative(alphas, fused, torchs) < 1e-2)
    assert not all(torch.equal(fused[k], torchs[k]) for k in torchs)  # the fused formulas ran
    if method != "lcr-rbnn":  # (RBNN's rotation in float64 parts from float32's: no float64 reference here)
        exact = train_steps(method, steps=1, gradients=True, dtype=torch.float64)
        assert relative(others, fused, exact) <= 1.5 * relative(others, torchs, exact) + 1e-7
    with functional.formulas(fp32="fused"):
        assert torch.equal(one_step_loss(method), one_step_loss(method, fp32="torch"))


def one_step_loss(method: str, fp32: str | None = None) -> torch.Tensor:
    """The training loss of the first step of :func:`train_steps`' model and batch (``fp32``: float32's formulas)."""
    torch.manual_seed(0)
    model = bnnbench.build_model("resnet20", method, stage=2)
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(8, 3, 16, 16, generator=generator), torch.randint(0, 10, (8,), generator=generator)
    set_progress(model, 0.5)
    with functional.formulas(fp32=fp32):
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    return loss.detach()


def test_rads_fused_moments_run_in_training_within_rounding_of_torchs(monkeypatch):
    """RAD's binarizer and loss under bf16 take the one node with fused moments, every layer, every step: the
    gradients of one step are torch's bf16 formulas' within bfloat16's rounding (a 1-3% relative difference per
    tensor, measured, where bfloat16 keeps 8 bits), and not equal to them (the node runs).  Several steps are not
    compared: a rounding apart flips signs, and this 8-image network's weights then part (as fp32's and bf16's do)."""
    from bnnbench.methods import rad

    applied = []
    original = rad._SignAndMomentsFused.apply
    monkeypatch.setattr(rad._SignAndMomentsFused, "apply", lambda a: applied.append(a.shape) or original(a))
    fused = train_steps("rad", steps=1, amp=True, formulas="fused", gradients=True)
    assert len(applied) == 18  # every binary layer's input
    monkeypatch.undo()
    torchs = train_steps("rad", steps=1, amp=True, formulas="torch", gradients=True)
    assert fused.keys() == torchs.keys()
    assert not all(torch.equal(fused[k], torchs[k]) for k in fused)
    for k in fused:
        assert (fused[k] - torchs[k]).norm() <= 0.05 * torchs[k].norm(), k


def test_moving_the_progress_does_not_recompile_a_compiled_layer():
    """Progress is a buffer, not a Python float: a new epoch's value reuses the compiled graph (ReSTE's o, IR-Net's t,
    ReCU's tau and FDA's n are all functions of it)."""
    torch._dynamo.reset()
    for method in ("reste", "fda"):
        layer = BinaryLinear(6, 4, method=method)
        frames = []
        compiled = torch.compile(layer, backend=lambda gm, example: (frames.append(gm), gm.forward)[1])
        for p in (0.0, 0.3, 0.9):
            layer.progress.fill_(p)
            grads = []
            for run in (compiled, layer):
                x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
                run(x).sum().backward()
                grads.append(x.grad)
            assert torch.equal(*grads), (method, p)  # the graph follows the progress it reads from the buffer
        assert len(frames) == 1, method
    torch._dynamo.reset()


def test_bf16_autocast_follows_the_cpu_and_the_machine(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(train_module, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert train_module.resolve_amp(Machine(), cpu) is False
    monkeypatch.setattr(train_module, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert train_module.resolve_amp(Machine(), cpu) is True
    monkeypatch.setattr(train_module, "cpu_flags", lambda: {"amx_bf16", "amx_tile"})
    assert train_module.resolve_amp(Machine(), cpu) is True
    assert train_module.resolve_amp(Machine(amp=False), cpu) is False
    monkeypatch.setattr(train_module, "cpu_flags", lambda: set())
    assert train_module.resolve_amp(Machine(amp=True), cpu) is True


def _act_norm_input(shape, dtype, seed):
    """Normal values over a wide range of scales, with exact zeros, +-1 and ties of the surrogate's kinks."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * torch.exp(torch.randn(shape[0], *([1] * (len(shape) - 1)), generator=generator))
    flat = x.view(-1)
    picks = torch.randint(0, flat.numel(), (max(1, flat.numel() // 50),), generator=generator)
    flat[picks] = torch.tensor([0.0, -0.0, 1.0, -1.0])[torch.arange(picks.numel()) % 4]
    return x.to(dtype), torch.randn(shape, generator=generator).to(dtype)


ACT_NORM_SHAPES = [(5, 3), (6, 40), (4, 7, 5, 3), (3, 16, 8, 8), (2, 1, 1, 17), (3, 2, 1, 1), (2, 33, 40, 25), (1, 8, 70, 70), (1, 4, 3, 3)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", ACT_NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_act_norm_forward_and_gradient_are_autograd_bit_for_bit(shape, dtype, threads, monkeypatch):
    """normalized_surrogate_sign's one-pass backward (bnnbench.act_norm) against autograd through the torch formula,
    bit for bit (bf16 with torch's formulas), for ApproxSign (its formula evaluated in the sweep) and RBNN's surrogate (its values passed in) (a 0-dim float64 parameter), per-sample sizes below and above
    the reduction grain, on 1 and 2 threads (the kernels' work split between them); the kernel must have run wherever it covers the tensors."""
    import math

    from bnnbench import act_norm, omp

    monkeypatch.setattr(omp, "PARALLEL_WORK", 1)  # the kernels split even these small tensors between the threads
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = torch.tensor(2.5, dtype=torch.float64)
        derivatives = [functional.approx_sign_derivative, lambda v: (math.sqrt(2.0) * t - t * t * v.abs()).clamp(min=0)]
        for seed, derivative in enumerate(derivatives):
            x, grad = _act_norm_input(shape, dtype, seed)
            results = []
            for normalized in (functional.normalized_surrogate_sign, reference_normalized):
                leaf = x.clone().requires_grad_()
                with functional.formulas(bf16="torch"):  # the fused bf16 formulas: tests/test_act_norm_fused.py
                    out = normalized(leaf, derivative, 1e-5)
                out.backward(grad)
                results.append((out, leaf.grad))
            (out, g), (ref_out, ref_g) = results
            bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
            assert torch.equal(out.view(bits), ref_out.view(bits))
            assert torch.equal(g.view(bits), ref_g.view(bits)), (g - ref_g).abs().max()
            root = torch.sqrt(x.var(dim=tuple(range(1, x.dim())), keepdim=True) + 1e-5)
            lone = shape[0] == 1 and x.numel() >= elementwise.REDUCTION_GRAIN and threads > 1
            assert (act_norm.backward(x, root, grad, derivative(x / root)) is not None) != lone
            formula = functional._FORMULAS.get(derivative)
            assert (formula is None) == (seed == 1)  # ApproxSign's formula is evaluated in the sweep
            assert formula is None or (act_norm.backward(x, root, grad, formula) is not None) != lone
    finally:
        torch.set_num_threads(previous)


def reference_distribution_loss(a: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """RAD's distribution loss of 2026-11: the formula by autograd, which keeps the float32 centred copy."""
    x = a.float() if a.dtype in (torch.float16, torch.bfloat16) else a
    dims = (0, *range(2, x.dim()))
    mean = x.mean(dim=dims)
    var = ((x - mean.view(1, -1, *([1] * (x.dim() - 2)))) ** 2).mean(dim=dims) + eps
    std = var.abs().sqrt()
    l1 = (2 - mean.abs() - std).clamp(min=0).pow(2).mean() + (std - 4).clamp(min=0).pow(2).mean()
    l2 = (mean.pow(2) - std.pow(2)).clamp(min=0).mean()
    return l1 + l2


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(6, 5, 7, 3), (40, 16, 9, 9), (9, 4)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rad_loss_gives_the_formulas_value_and_gradient_bit_for_bit(dtype, shape, threads, monkeypatch):
    """The distribution loss through its fused moments (bnnbench.methods.rad._ChannelMoments) against autograd
    through the formula, the input's gradient also coming from another use of it (as the binarizer's does): the
    same loss and gradient, bit for bit, on 1 and 2 threads, with exact zeros and one constant channel."""
    from bnnbench import omp
    from bnnbench.methods import rad

    monkeypatch.setattr(omp, "PARALLEL_WORK", 1)  # the kernels split even these small tensors between the threads
    generator = torch.Generator().manual_seed(3)
    a = (torch.randn(*shape, generator=generator) * 0.7 + 0.3).clamp(-1, 1)
    a.view(-1)[::7] = 0.0
    a[:, 1] = 0.25
    a = a.to(dtype)
    other = torch.randn(shape, generator=generator).to(dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for loss_of in (rad.distribution_loss, reference_distribution_loss):
            leaf = a.clone().requires_grad_()
            b = leaf * 1
            with functional.formulas(bf16="torch"):  # the fused bf16 formulas: tests/test_rad_bf16.py
                loss = loss_of(b) + (b * other).sum()
            loss.backward()
            results.append((loss, leaf.grad))
        with functional.formulas(bf16="torch"):
            assert type(rad.channel_moments(a.clone().requires_grad_())[0].grad_fn).__name__ == "_ChannelMomentsBackward"
    finally:
        torch.set_num_threads(previous)
    (loss, grad), (ref_loss, ref_grad) = results
    assert same_bits(loss, ref_loss) and same_bits(grad, ref_grad)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """NaN where NaN (a NaN's sign and payload aside), the same bits elsewhere (the sign of zeros too)."""
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[a.dtype]
    keep = ~a.isnan()
    return a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.view(ints)[keep], b.view(ints)[keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("uses", ["mean", "mean-square"])
def test_rad_moments_used_one_at_a_time_give_autograds_gradient(dtype, uses):
    """Of the two moments, the one no loss uses sends nothing back, as through the formula: the same gradient, also
    with an infinite input (where a zero gradient times it would be NaN)."""
    from bnnbench.methods import rad

    a = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(4)).to(dtype)
    a[0, 0, 0, 0] = float("inf")
    grads = []
    for moments in (rad.channel_moments, reference_channel_moments):
        leaf = a.clone().requires_grad_()
        with functional.formulas(bf16="torch"):  # the fused bf16 formulas: tests/test_rad_bf16.py
            mean, mean_square = moments(leaf)
        (mean if uses == "mean" else mean_square).sum().backward()
        grads.append(leaf.grad)
    assert same_bits(*grads)


def reference_channel_moments(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = a.float() if a.dtype == torch.bfloat16 else a
    dims = (0, *range(2, x.dim()))
    mean = x.mean(dim=dims)
    return mean, ((x - mean.view(1, -1, *([1] * (x.dim() - 2)))) ** 2).mean(dim=dims)


def test_rad_moments_refuse_a_second_derivative_clearly():
    from bnnbench.methods import rad

    leaf = torch.randn(4, 3, 2, 2, requires_grad=True)
    (grad,) = torch.autograd.grad(rad.distribution_loss(leaf * 1), leaf, create_graph=True)
    assert grad.shape == leaf.shape
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        grad.sum().backward()


def test_a_saved_recipe_frees_the_tensor_and_rebuilds_it_for_the_backward():
    import weakref

    x = torch.randn(5, requires_grad=True)
    source = x * 1
    centred = source - 0.5
    alive = weakref.ref(centred)
    with functional.saved_as_recipe(centred, lambda s: s - 0.5, source):
        squared = centred**2
    del centred
    assert alive() is None  # neither the graph nor the hooks keep it
    squared.sum().backward()
    assert torch.equal(x.grad, 2 * (x.detach() - 0.5))


def test_a_saved_recipe_refuses_sources_changed_in_place():
    x = torch.randn(4, requires_grad=True)
    source = x * 1
    centred = source - 0.5
    with functional.saved_as_recipe(centred, lambda s: s - 0.5, source):
        squared = centred**2
    source.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        squared.sum().backward()


def _scaled_input(shape, dtype, kind, seed):
    """A conv output of +-1 by +-1 (integers, a few beyond bfloat16's exact recovery, signed zeros) or real
    values, and a per-channel alpha (with a zero for ``zero_alpha``)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "real":
        y = torch.randn(shape, generator=generator)
    else:
        y = torch.randint(-20, 21, shape, generator=generator).float()
        flat = y.view(-1)
        special = torch.tensor([300.0, -577.0, 129.0, -0.0, 255.0, 4096.0])
        flat[:: max(1, flat.numel() // 5)] = special[: flat[:: max(1, flat.numel() // 5)].numel()]
    alpha = torch.rand(shape[1], *([1] * (len(shape) - 2)), generator=generator)
    if kind == "zero_alpha":
        alpha.view(-1)[0] = 0.0
    return y.to(dtype), alpha.to(dtype)


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last_grad"])
@pytest.mark.parametrize("kind", ["integer", "real", "zero_alpha"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (7, 9), (2, 16, 8, 8)], ids=lambda s: "x".join(map(str, s)))
def test_scale_channels_keeps_the_product_and_gives_autogradss_gradients_bit_for_bit(shape, dtype, kind, memory_format):
    """y * alpha kept as its product (y recovered in the backward, exceptions patched in): the output and both
    gradients equal autograd's through y * alpha, bit for bit, incl. integers beyond bfloat16's exact recovery,
    signed zeros, a zero alpha and real y (too many exceptions: y kept)."""
    y, alpha = _scaled_input(shape, dtype, kind, 0)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    if memory_format == "channels_last_grad" and len(shape) == 4:
        grad = grad.contiguous(memory_format=torch.channels_last)
    results = []
    for scale in (functional.scale_channels, reference_scale):
        leaf_y, leaf_alpha = y.clone().requires_grad_(), alpha.clone().requires_grad_()
        out = scale(leaf_y * 1, leaf_alpha * 1)
        out.backward(grad)
        results.append((out, leaf_y.grad, leaf_alpha.grad))
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for got, want in zip(*results):
        assert torch.equal(got.view(bits), want.view(bits))
    kept = elementwise.scale_channels(y, alpha)
    if kind != "zero_alpha":
        assert (kept is not None) == (kind == "integer")  # real values: more exceptions than EXCEPTION_SHARE allows
    if kind == "integer":  # exceptions: the negative zeros (recovered as +0), in bfloat16 the integers from 129 on too
        negative_zeros = ((y == 0) & y.signbit()).view(-1).nonzero().view(-1)
        assert set(negative_zeros.tolist()) <= set(kept[1].tolist())
        assert (kept[1].numel() > negative_zeros.numel()) == (dtype == torch.bfloat16)


def test_a_binary_layer_keeps_the_scaled_output_not_the_conv_output():
    """BiPer's binary conv in stage 2 saves its learned alpha's product (the BatchNorm's input), not y."""
    torch.manual_seed(0)
    layer = bnnbench.layers.BinaryConv2d(16, 16, 3, padding=1, method="biper")
    x = torch.randn(4, 16, 8, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        out = layer(x)
    big = [t for t in saved if t.numel() == out.numel()]
    assert any(t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() for t in big)
    assert all(t.untyped_storage().data_ptr() in (out.untyped_storage().data_ptr(), x.untyped_storage().data_ptr()) for t in big)
