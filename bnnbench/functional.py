"""Math layer: the sign function and the surrogate-gradient autograd primitives.

``sign`` and ``surrogate_sign`` are what every method builds on;
``normalized_surrogate_sign`` is the same with the per-sample normalisation of
upstream BiPer/ReCU activations, and ``conv2d_of_signs`` the binary layer's
convolution of +-1 inputs, which it keeps for the backward as the binarizer's input they are
the signs of (:func:`signs_of`), or in one bit each.  The element-wise
formulas run as one-pass kernels (:mod:`bnnbench.elementwise`, bit for bit the torch
formulas) where those cover the tensor, as the torch formulas otherwise; act_norm's backward runs in
one pass per sample (:mod:`bnnbench.act_norm`), for bfloat16 in float32 sweeps (:mod:`bnnbench.act_norm_fused`)
unless :func:`formulas` says "torch" (float32 with fused formulas likewise).  This module imports nothing else from the package.
"""

from __future__ import annotations

import contextvars
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import act_norm, act_norm_fused, elementwise

Derivative = Callable[[Tensor], Tensor]

FORMULAS = ("fused", "torch")
"""How activations of a dtype compute act_norm, a learned alpha and a method's own formulas that read
:func:`fused_formulas` (RAD's moments, DSQ's soft quantizer; in float32 also FDA's, SwishSign's, ReSTE's and IR-Net's
surrogates): "fused" (float32 within one kernel, :mod:`bnnbench.act_norm_fused`; alpha in the weight or the conv's
backward, :meth:`bnnbench.layers.BinaryConv2d.scale_placement`; transcendentals in float32 arithmetic that
vectorises) or "torch" (torch's eager formulas bit for bit, every operator rounded to the dtype).  Chosen per dtype
with :func:`formulas`: bfloat16 takes the fused ones by default (torch's are the numbers of runs before 2026-12-02),
float32 torch's (the reference formulas, bit for bit; the fused ones, opt-in, keep the forward bit for bit and
give gradients within float32's rounding of the exact values, not bit for bit torch's)."""
_FORMULAS_OF = {
    torch.bfloat16: contextvars.ContextVar("bf16_formulas", default="fused"),
    torch.float32: contextvars.ContextVar("fp32_formulas", default="torch"),
}


@contextmanager
def formulas(*, bf16: str | None = None, fp32: str | None = None) -> Iterator[None]:
    """Within: bfloat16 (``bf16``) and float32 (``fp32``) activations compute act_norm and a learned alpha as that
    name of :data:`FORMULAS` says (None: as outside)."""
    chosen = {torch.bfloat16: bf16, torch.float32: fp32}
    for dtype, name in chosen.items():
        if name is not None and name not in FORMULAS:
            raise ValueError(f"{str(dtype).removeprefix('torch.')} formulas must be one of {FORMULAS}, got {name!r}")
    tokens = [(_FORMULAS_OF[dtype], _FORMULAS_OF[dtype].set(name)) for dtype, name in chosen.items() if name is not None]
    try:
        yield
    finally:
        for variable, token in reversed(tokens):
            variable.reset(token)


def formulas_in_force() -> dict[str, str]:
    """The formulas chosen now, as :func:`formulas`' arguments: for a backward to compute with its forward's (a
    surrogate evaluated in the backward, which runs outside the forward's context)."""
    return {"bf16": _FORMULAS_OF[torch.bfloat16].get(), "fp32": _FORMULAS_OF[torch.float32].get()}


def fused_formulas(dtype: torch.dtype) -> bool:
    """True where activations of ``dtype`` take the fused formulas of :data:`FORMULAS` (bfloat16 by default)."""
    variable = _FORMULAS_OF.get(dtype)
    return variable is not None and variable.get() == "fused"


def sign(x: Tensor) -> Tensor:
    """Sign with sign(0) = +1 (Eq. 1 of the BiPer paper): +1 where x >= 0 (-0.0 included), else -1 (NaN included).

    ``torch.sign`` maps 0 to 0, which silently removes exact zeros from a
    binary layer; a binary value must be -1 or +1.  Three spellings of the same
    values, each the fastest where it runs (measured on CPU, 2026-12-01): a
    one-pass kernel (:data:`bnnbench.elementwise.SIGN`) on untracked dense
    float32/bfloat16 CPU tensors, 2.4x (float32) to 6.8x (bfloat16) faster than
    eager torch's sign(sign(nan_to_num(x, nan=-1)) + 1/2) in four vectorised
    passes, itself 4x faster than the boolean mask of ``torch.where(x >= 0, 1, -1)``,
    which it computes elsewhere; inside ``torch.compile`` the ``where`` fuses into
    one loop, while inductor's code for the chain of signs is 2x slower than that.
    """
    if torch.compiler.is_compiling():
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
    if (handed := _handed_signs(x)) is not None:
        return handed
    fused = elementwise.unary(elementwise.SIGN, x)
    return fused if fused is not None else torch.nan_to_num(x, nan=-1.0).sign_().add_(0.5).sign_()


def _surrogate(derivative: Derivative, x: Tensor) -> Tensor:
    """``derivative(x)``, refused unless it has x's shape (broadcasting would silently mix elements up)."""
    value = derivative(x)
    if value.shape != x.shape:
        raise ValueError(
            f"surrogate derivative {getattr(derivative, '__qualname__', derivative)!r} returned shape {tuple(value.shape)} "
            f"for an input of shape {tuple(x.shape)}; it must be element-wise, one value per input (e.g. torch.ones_like(x))"
        )
    return value


_RECIPE = "_bnnbench_sign_recipe"


def signs_of(out: Tensor, recompute: Callable[..., Tensor], *sources: Tensor) -> Tensor:
    """``out``, a binarizer's +-1 output, marked as ``recompute(*sources)`` (bit for bit) while neither it nor the
    sources change in place: the binary conv after it keeps the sources, which the binarizer's backward keeps
    anyway, instead of a packed copy of the signs (:class:`_ConvOfSigns`).  For a method's own autograd Function
    whose forward returns ``sign(x)`` and saves x (DSQ's)."""
    if not torch.compiler.is_compiling() and not any(t.is_inference() for t in (out, *sources)):  # (no versions counted)
        setattr(out, _RECIPE, (recompute, sources, out._version, [t._version for t in sources]))
    return out


def _recipe_of(a: Tensor) -> tuple[Callable[..., Tensor], tuple[Tensor, ...]] | None:
    """(recompute, sources) where ``a`` is a marked binarizer output that nothing changed since, else None."""
    recipe = getattr(a, _RECIPE, None)
    if recipe is None or torch.compiler.is_compiling():
        return None
    recompute, sources, version, versions = recipe
    if a._version != version or [t._version for t in sources] != versions:
        return None
    return recompute, sources


class _SurrogateSign(torch.autograd.Function):
    """Forward ``sign(x)``; backward ``grad * derivative(x)``: in one pass where a kernel knows the derivative
    (:data:`_GRADIENTS`), the derivative's last pass where that is a bfloat16 table lookup or a kernel applied
    with ``final=True`` (:func:`bnnbench.elementwise.multiplying`), the gradient itself for the STE's (``grad *
    1``, bit for bit, with nothing kept)."""

    @staticmethod
    def forward(ctx, x: Tensor, derivative: Derivative) -> Tensor:  # type: ignore[override]
        if derivative is not identity_derivative:
            ctx.save_for_backward(x)
        ctx.derivative = derivative
        ctx.formulas = None if torch.compiler.is_compiling() else formulas_in_force()  # (a graph reads no context)
        return signs_of(sign(x), sign, x)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        if ctx.derivative is identity_derivative:
            return grad_output, None
        if ctx.formulas is None:
            return _SurrogateSign.gradient(ctx, grad_output)
        with formulas(**ctx.formulas):  # the surrogate as the forward's formulas say
            return _SurrogateSign.gradient(ctx, grad_output)

    @staticmethod
    def gradient(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        kernel = _GRADIENTS.get(ctx.derivative)
        if kernel is not None and grad_output.dtype == x.dtype and (fused := elementwise.apply(kernel, x, grad_output)) is not None:
            return fused, None
        if torch.compiler.is_compiling():
            return grad_output * _surrogate(ctx.derivative, x), None
        with elementwise.multiplying(x, grad_output) as product:  # a derivative looked up, or ending in a kernel: one pass
            value = _surrogate(ctx.derivative, x)
        if product.is_result(value):
            return value, None
        if product.result is not None:  # the product went into something else: the derivative again, plainly
            value = _surrogate(ctx.derivative, x)
        return grad_output * value, None


class _ShiftedSurrogateSign(torch.autograd.Function):
    """Forward ``sign(x + shift)``, in x's dtype; backward ``grad * derivative(x + shift)`` to x, summed to shift's
    shape to shift.

    The sign's +-1 values are exact in every floating dtype, so x's dtype changes none of them; a float32 shift
    (a learned parameter) against a bfloat16 x under autocast would otherwise make the sign, and its gradient,
    float32, which the binary conv converts back to bfloat16: two activation-sized passes more.  The gradient
    arriving in bfloat16 has the values the float32 one had (the conv's bfloat16 gradient, widened).

    What autograd computes through ``surrogate_sign(x + shift)``, bit for bit, but keeping x (which the
    layer before holds anyway) and the small shift instead of the activation-sized sum.  For a per-channel
    shift of a contiguous x, the sum is never made: the sign, and with ApproxSign's derivative the gradient
    (in the sum's dtype, and rounded to x's, which autograd would cast it to), are one pass each
    (:func:`_shifted`).  With the fused formulas of x's dtype (:func:`fused_formulas`, chosen in the forward's
    context), that pass also sums the shift's gradient (:func:`bnnbench.elementwise.shifted_approx_sign_backward`:
    the same gradient to x, the shift's in float32 per row and float64 across samples) instead of writing the
    float32 products for torch's sum: two activation-sized float32 passes less."""

    @staticmethod
    def forward(ctx, x: Tensor, shift: Tensor, derivative: Derivative) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, shift)
        ctx.derivative = derivative
        ctx.fused = derivative is approx_sign_derivative and not torch.compiler.is_compiling() and fused_formulas(x.dtype)  # (a graph reads no context)
        return signs_of(_shifted_sign(x, shift), _shifted_sign, x, shift)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        x, shift = ctx.saved_tensors
        if ctx.fused and (summed := elementwise.shifted_approx_sign_backward(x, shift, grad_output)) is not None:
            return summed[0], summed[1], None
        fused = _shifted(elementwise.SHIFTED_APPROX_SIGN_GRAD, x, shift, (grad_output,)) if ctx.derivative is approx_sign_derivative else None
        if fused is not None:
            grad, grad_x = fused
            return grad_x, grad.sum_to_size(shift.shape), None
        grad = grad_output * _surrogate(ctx.derivative, x + shift)
        return grad, grad.sum_to_size(shift.shape), None


def _shifted_sign(x: Tensor, shift: Tensor) -> Tensor:
    """``sign(x + shift)`` in x's dtype (one pass where :func:`_shifted` covers x)."""
    fused = _shifted(elementwise.SHIFTED_SIGN, x, shift, ())
    return sign(x + shift).to(x.dtype) if fused is None else fused


def _shifted(kernel: elementwise.Kernel, x: Tensor, shift: Tensor, tensors: tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...] | None:
    """``kernel`` over x (and ``tensors`` of the sum's shape and strides) with the shift as one value per channel: for a
    contiguous or channels_last x of shape (N, C, ...) and a shift of shape (C, 1, ...); None otherwise.  The sum ``x + shift`` rounds in its
    result dtype (float32 for a bfloat16 x and a float32 shift), the mode of the kernel, which ``tensors`` have
    or x's dtype (a bfloat16 gradient, widened as torch's float32 product widens it).  One output is stored in
    x's dtype (the sign), two in the sum's and in x's (the gradient)."""
    if not elementwise.covered(x):
        return None
    mode = torch.result_type(x, shift)
    if x.dim() < 2 or shift.shape != (x.shape[1], *([1] * (x.dim() - 2))) or shift.dtype not in (torch.float32, torch.bfloat16):
        return None
    if any(t.dtype not in (mode, x.dtype) for t in tensors):
        return None
    dtypes = (x.dtype,) if kernel.outputs == 1 else (mode, x.dtype)
    return elementwise.apply(kernel, x, *tensors, mode=mode, channels=(shift,), dtypes=dtypes)


def surrogate_sign(x: Tensor, derivative: Derivative, shift: Tensor | None = None) -> Tensor:
    """``sign(x)`` whose autograd backward is ``derivative(x)`` (element-wise).

    ``derivative`` is the surrogate d sign(x) / dx of a binarizer, evaluated on
    the saved input, e.g. ``lambda x: (x.abs() <= 1).to(x)`` for the clipped STE
    (Eq. 5).  With ``shift`` (a tensor broadcasting to x, e.g. ReActNet's learned
    per-channel threshold), ``sign(x + shift)`` in x's dtype with the derivative at
    x + shift, for x and for the shift.
    """
    if shift is None:
        return _SurrogateSign.apply(x, derivative)
    return _ShiftedSurrogateSign.apply(x, shift, derivative)


def identity_derivative(x: Tensor) -> Tensor:
    """d/dx of the straight-through estimator (Eq. 4): 1 everywhere."""
    return torch.ones_like(x)


def clip_derivative(x: Tensor) -> Tensor:
    """d/dx of the clipped STE (Eq. 5): 1{|x| <= 1} (one pass where :data:`bnnbench.elementwise.CLIP_DERIVATIVE` covers x)."""
    fused = elementwise.unary(elementwise.CLIP_DERIVATIVE, x)
    return fused if fused is not None else (x.abs() <= 1).to(x.dtype)


def approx_sign_derivative(x: Tensor) -> Tensor:
    """Bi-Real ApproxSign derivative (Eq. 7): max(0, 2 - 2|x|) (one pass where
    :data:`bnnbench.elementwise.APPROX_SIGN_DERIVATIVE` covers x)."""
    fused = elementwise.unary(elementwise.APPROX_SIGN_DERIVATIVE, x)
    return fused if fused is not None else (2 - 2 * x.abs()).clamp(min=0)


_FORMULAS: dict[Derivative, act_norm.Formula] = {approx_sign_derivative: elementwise._approx_sign_derivative}
"""Surrogates whose float32 formula act_norm's backward evaluates in its own sweep."""


@dataclass(frozen=True)
class ParametrizedSurrogate:
    """A surrogate d sign(x)/dx with scalar parameters, given twice: ``function(x)``, its torch formula (the reference,
    bit for bit), and ``formula(x, *parameters())``, the same in float32 scalars (as
    :class:`~bnnbench.elementwise.Kernel` takes formulas), which act_norm's fused backward evaluates in its own
    sweep instead of reading a surrogate tensor torch made.  ``parameters`` is called there only, in the backward on
    the CPU: a scheduled parameter kept in a tensor is read once a layer a step, never in the forward."""

    function: Derivative
    formula: Callable[..., float]
    parameters: Callable[[], tuple[float, ...]]

    def __call__(self, x: Tensor) -> Tensor:
        return self.function(x)


def _sweep_formula(derivative: Derivative) -> tuple[Callable[..., float], tuple[float, ...]] | None:
    """(float32 formula, its parameters) of a surrogate that act_norm's backward can evaluate in its sweep, else None."""
    if isinstance(derivative, ParametrizedSurrogate):
        return derivative.formula, derivative.parameters()
    formula = _FORMULAS.get(derivative)
    return None if formula is None else (formula, ())

_GRADIENTS: dict[Derivative, elementwise.Kernel] = {
    approx_sign_derivative: elementwise.APPROX_SIGN_GRADIENT,
    clip_derivative: elementwise.CLIP_GRADIENT,
}
"""Surrogates whose ``grad * derivative(x)`` one kernel computes (the two torch operators' roundings)."""


def _reusing(t: Tensor, op: Callable[..., Tensor], other: Tensor) -> Tensor:
    """``op(t, other)`` for a temporary ``t``, written into t where that rounds alike (the result has t's dtype and
    shape) and autograd records neither (a backward run with create_graph, as the diagnostics' is): one
    activation-sized allocation less."""
    tracked = torch.is_grad_enabled() and (t.requires_grad or other.requires_grad)
    if not tracked and torch.result_type(t, other) == t.dtype and _broadcasts_into(other.shape, t.shape):
        return op(t, other, out=t)
    return op(t, other)


def _broadcasts_into(shape: torch.Size, target: torch.Size) -> bool:
    """True where ``shape`` broadcasts to ``target`` itself (``torch.broadcast_shapes(target, shape) == target``,
    without its Python reference implementation's 15 us a call)."""
    return len(shape) <= len(target) and all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def _variance_gradient(x: Tensor, grad_var: Tensor) -> Tensor:
    """VarBackward's gradient to x of the unbiased variance over dims 1.. (keepdim), in its order:
    (2 / (n - 1)) grad_var (x - mean(x)), written into the centred temporary."""
    return _reusing(x - x.mean(dim=tuple(range(1, x.dim())), keepdim=True), torch.mul, (2.0 / (x[0].numel() - 1)) * grad_var)


class _NormalizedSurrogateSign(torch.autograd.Function):
    """Forward ``sign(x)``; backward the surrogate at a0 = x / sqrt(var(x) + eps) per sample, through the variance.

    The same arithmetic as autograd's through ``surrogate_sign(x / sqrt(x.var(dims) + eps))`` (DivBackward,
    SqrtBackward, VarBackward), so results are bit-identical to it, but it keeps only ``x`` (which the layer
    before holds anyway) and the per-sample ``sqrt(var + eps)`` for the backward, instead of a0 and the
    division's intermediates: one activation-sized tensor less per binary layer.  ``x`` comes in twice and its
    two gradient terms (through the division, through the variance) go back separately, so that autograd
    adds them to x's other gradients (a residual connection's) in the order it did before: floating-point
    addition is not associative.  With the fused formulas of its dtype (:func:`fused_formulas`: bfloat16 by
    default) x is kept alone and gets one gradient from float32 sweeps instead (:mod:`bnnbench.act_norm_fused`: not
    bit for bit torch's formula).
    """

    @staticmethod
    def forward(ctx, x: Tensor, x_again: Tensor, derivative: Derivative, eps: float) -> Tensor:  # type: ignore[override]
        dims = tuple(range(1, x.dim()))
        ctx.derivative, ctx.dims, ctx.eps = derivative, dims, eps
        ctx.fused = fused_formulas(x.dtype) and act_norm_fused.covers(x)  # the statistics in the backward's sweeps
        if ctx.fused:
            ctx.save_for_backward(x)
            return signs_of(sign(x), sign, x)
        variance = elementwise.per_sample_variance(x)  # torch's var, bit for bit, in one pass over all samples
        root = torch.sqrt((x.var(dim=dims, keepdim=True) if variance is None else variance) + eps)
        ctx.save_for_backward(x, root)
        return signs_of(sign(x), sign, x)  # sign(x / root) = sign(x): root > 0

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        if ctx.fused:
            (x,) = ctx.saved_tensors
            swept = _sweep_formula(ctx.derivative)
            if swept is not None:
                return act_norm_fused.backward(x, grad_output, ctx.eps, formula=swept[0], params=swept[1]), None, None, None
            known = act_norm_fused.moments(x, ctx.eps)
            surrogate = _surrogate(ctx.derivative, x.detach().float() / act_norm_fused.roots(known, x)).float()
            return act_norm_fused.backward(x, grad_output, ctx.eps, surrogate=surrogate, known=known), None, None, None
        x, root = ctx.saved_tensors
        dims = ctx.dims
        formula = _FORMULAS.get(ctx.derivative)  # the lines below in one pass per sample, the surrogate too
        if formula is not None and (fused := act_norm.backward(x, root, grad_output, formula)) is not None:
            return fused[0], fused[1], None, None
        a0 = x / root
        surrogate = _surrogate(ctx.derivative, a0)
        if (fused := act_norm.backward(x, root, grad_output, surrogate)) is not None:  # the lines below
            return fused[0], fused[1], None, None
        grad_a0 = grad_output * surrogate
        # autograd's (-grad_a0 * (a0 / root)).sum(): negating the sum instead is exact (rounding is symmetric)
        grad_root = -_reusing(_reusing(a0, torch.div, root), torch.mul, grad_a0).sum(dim=dims, keepdim=True)
        through_variance = _variance_gradient(x, grad_root / (2 * root))
        return _reusing(grad_a0, torch.div, root), through_variance, None, None


def normalized_surrogate_sign(x: Tensor, derivative: Derivative, eps: float) -> Tensor:
    """``sign(x)`` whose backward is ``derivative`` at x / sqrt(var_{C,H,W}(x) + eps), per sample, the gradient
    flowing through the variance too (upstream BiPer and ReCU activations in training)."""
    return _NormalizedSurrogateSign.apply(x, x, derivative, eps)


class _PerOutputVariance(torch.autograd.Function):
    """``x.var(dims 1.., keepdim=True)`` (unbiased; ``root``: ``x.std``) from one Welford pass over all rows
    (:func:`bnnbench.elementwise.per_sample_variance`); backward torch's own formulas in its order, so values and
    gradients are autograd's bit for bit: var' = (2 / (n - 1)) grad (x - mean(x)), and for the std the same with
    grad / (2 std) (0 where std = 0)."""

    @staticmethod
    def forward(ctx, x: Tensor, variance: Tensor, root: bool) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, variance)
        ctx.root = root
        return variance

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        x, result = ctx.saved_tensors
        if ctx.root:
            grad_output = (grad_output / (result * 2)).masked_fill_(result == 0, 0)
        return _variance_gradient(x, grad_output), None, None


def per_output_variance(x: Tensor, root: bool = False) -> Tensor:
    """``x.var(dim=(1, ..., x.dim() - 1), keepdim=True)`` (unbiased), with ``root`` ``x.std(...)``: one value per
    output channel of a weight, per sample of an activation.  torch's values and gradients bit for bit; on the CPU
    one pass over every row, where torch's reduction over trailing dimensions costs some 100-200 us for a
    ResNet-20 weight (measured 2026-12-02, Xeon 6/167, 1-2 threads: 20 times a mean)."""
    variance = elementwise.per_sample_variance(x.detach(), root=root)
    if variance is None:
        dims = tuple(range(1, x.dim()))
        return x.std(dim=dims, keepdim=True) if root else x.var(dim=dims, keepdim=True)
    if not (x.requires_grad and torch.is_grad_enabled()):
        return variance
    return _PerOutputVariance.apply(x, variance, root)


class _ConvOfSigns(torch.autograd.Function):
    """``conv2d(a, w)`` for an input of +-1 values, which the weight gradient needs; with ``scale`` (one value per
    output channel, shape (C, 1, 1)) ``conv2d(a, w) * scale``.

    A binary layer's input is the sign its binarizer just made, a new tensor nothing else keeps.  Where the
    binarizer marked it as a recipe of its own input (``sign(x)``, kept by the binarizer's backward anyway:
    :func:`signs_of`), the conv keeps that input and makes the signs again in its backward (one pass, as
    unpacking is, and none in the forward); otherwise it keeps them in 1 bit each
    (:func:`bnnbench.elementwise.pack_signs`; as int8, 1 byte, where the kernels do not cover a) and widens them
    again.  Either gives the same gradients, bit for bit.  Under autocast the convolution runs in the autocast
    dtype, as F.conv2d does.

    The scale multiplies the convolution's output in place (as ``y * scale`` rounds: the forward's numbers are
    those of :func:`scale_channels` of the output) and folds into the backward's weight instead of scaling the
    output's gradient: the gradient to ``a`` is the transposed conv of grad with ``w * scale``, the weight's the
    conv's weight gradient times the scale, the scale's that times ``w`` summed over the weight's other
    dimensions, the same sums as ``(grad * y).sum``, in another order (a few units in the last place from
    autograd's through ``y * scale``, with no pass over the output's gradient).  The fused fp32 formulas'
    learned alpha (:meth:`bnnbench.layers.BinaryConv2d.scale_placement`).
    """

    @staticmethod
    def forward(ctx, a: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int, scale: Tensor | None) -> Tensor:  # type: ignore[override]
        dtype = torch.get_autocast_dtype(a.device.type) if torch.is_autocast_enabled(a.device.type) else a.dtype
        with torch.autocast(a.device.type, enabled=False):
            out = F.conv2d(a.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), stride, padding, dilation, groups)
            if scale is not None:
                out.mul_(scale.to(dtype))
        recipe = _recipe_of(a)
        packed = elementwise.pack_signs(a) if recipe is None and dtype in (torch.float32, torch.bfloat16) else None
        kept = recipe[1] if recipe is not None else (a.to(torch.int8) if packed is None else packed,)
        ctx.save_for_backward(*kept, weight, scale)
        ctx.recompute = None if recipe is None else recipe[0]
        ctx.layout = None if packed is None else (a.shape, a.stride())  # to unpack to
        ctx.conv = (dtype, a.dtype, None if bias is None else bias.shape, stride, padding, dilation, groups)
        return out

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        *kept, weight, scale = ctx.saved_tensors
        dtype, input_dtype, bias_shape, stride, padding, dilation, groups = ctx.conv
        if ctx.recompute is not None:
            signs = ctx.recompute(*kept).to(dtype)
        else:
            signs = kept[0].to(dtype) if ctx.layout is None else elementwise.unpack_signs(kept[0], *ctx.layout, dtype)
        scaled = scale is not None
        needs_scale = scaled and ctx.needs_input_grad[7]
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1] or needs_scale, bias_shape is not None and ctx.needs_input_grad[2]]
        per_output = scale.to(dtype).reshape(-1, *([1] * (weight.dim() - 1))) if scaled else None
        grad_a, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_output.to(dtype), signs, weight.to(dtype) * per_output if scaled else weight.to(dtype), bias_shape, stride, padding, dilation, False, [0, 0], groups, mask
        )
        grad_scale = (grad_w * weight.to(dtype)).sum(dim=tuple(range(1, weight.dim()))).reshape(scale.shape).to(scale.dtype) if needs_scale else None
        if scaled and grad_w is not None:
            grad_w = grad_w * per_output if ctx.needs_input_grad[1] else None
        grad_a = None if grad_a is None else grad_a.to(input_dtype)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        return grad_a, grad_w, grad_b, None, None, None, None, grad_scale


def conv2d_of_signs(a: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int, scale: Tensor | None = None) -> Tensor:
    """``F.conv2d`` of an input whose values are all +-1 (a binarizer's output), which it saves in 1 bit each; with
    ``scale`` (C, 1, 1) times that per output channel, folded into the backward's weight (:class:`_ConvOfSigns`)."""
    return _ConvOfSigns.apply(a, weight, bias, stride, padding, dilation, groups, scale)


class _ScaledChannels(torch.autograd.Function):
    """``y * alpha`` for a per-channel alpha, keeping for alpha's gradient the product itself (which the layer
    after, a BatchNorm, keeps anyway) instead of y, where y can be recovered from it bit for bit
    (:func:`bnnbench.elementwise.scale_channels`: a binary layer's integer y, a few exceptions kept aside);
    y itself otherwise.  The gradients are autograd's through ``y * alpha``, bit for bit: ``grad * alpha`` and
    ``(grad * y)`` summed to alpha's shape."""

    @staticmethod
    def forward(ctx, y: Tensor, alpha: Tensor) -> Tensor:  # type: ignore[override]
        kept = elementwise.scale_channels(y, alpha)
        ctx.recovered = kept is not None
        if kept is None:
            ctx.save_for_backward(y, alpha)
            return y * alpha
        out, indices, values = kept
        ctx.save_for_backward(out, alpha, indices, values)
        return out

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        if not ctx.recovered:
            y, alpha = ctx.saved_tensors
            return grad_output * alpha, (grad_output * y).sum_to_size(alpha.shape)
        out, alpha, indices, values = ctx.saved_tensors
        fused = elementwise.scale_channels_backward(out, alpha, indices, values, grad_output)  # a contiguous grad
        if fused is not None:  # (grad * y in float32: bfloat16 values, which torch's sum would widen itself)
            return fused[0], fused[1].sum_to_size(alpha.shape).to(alpha.dtype)
        nearest = float(elementwise._NEAREST_INTEGER)  # the kernel's recovery, as torch formulas
        y = (out.float() * alpha.float().reciprocal()).add_(nearest).sub_(nearest).to(out.dtype)
        # (grad * y keeps grad's layout, so that its sum runs in autograd's order)
        y.view(-1)[indices] = values
        return grad_output * alpha, (grad_output * y).sum_to_size(alpha.shape)


def scale_channels(y: Tensor, alpha: Tensor) -> Tensor:
    """``y * alpha`` for alpha of one value per channel of y (shape (C, 1, ...)), keeping the product instead
    of y for the backward where that is exact (a binary layer's learned scale)."""
    if not (torch.is_grad_enabled() and (y.requires_grad or alpha.requires_grad)) or torch.compiler.is_compiling():
        return y * alpha
    return _ScaledChannels.apply(y, alpha)


_HANDED = "_bnnbench_handed_signs"


def _handed_signs(x: Tensor) -> Tensor | None:
    """The signs of ``x`` that the hardtanh which made it computed in its pass (:func:`hardtanh_` with ``signs``),
    taken once (the binarizer after it owns them), while x has not changed since; else None."""
    handed = x.__dict__.pop(_HANDED, None)
    if handed is None or x._version != handed[1]:
        return None
    return handed[0]


class _HardtanhInPlace(torch.autograd.Function):
    """``clamp_(x, -1, 1)`` in place whose backward reads its *output*: an input is strictly inside (-1, 1)
    exactly when the output is, so torch's ``hardtanh_backward`` on the output gives the same gradient, bit
    for bit.  torch's own in-place hardtanh keeps a copy instead, and the binarizer that reads the output
    keeps the output too: one activation-sized tensor per binary layer this one saves.  With ``signs`` and where
    the kernels cover x, the clamp and sign(x) are one pass (:func:`bnnbench.elementwise.clamp_and_sign`), the
    signs a second, non-differentiable output."""

    @staticmethod
    def forward(ctx, x: Tensor, signs: bool) -> tuple[Tensor, Tensor | None]:  # type: ignore[override]
        ctx.mark_dirty(x)
        ctx.set_materialize_grads(False)  # the signs get no gradient: no activation-sized zeros made for them
        made = elementwise.clamp_and_sign(x.detach()) if signs else None
        if made is None:
            x.clamp_(-1.0, 1.0)
        else:
            ctx.mark_non_differentiable(made)
        ctx.save_for_backward(x)
        return x, made

    @staticmethod
    def backward(ctx, grad_output: Tensor, grad_signs: None):  # type: ignore[override]
        if grad_output is None:
            return None, None
        (out,) = ctx.saved_tensors
        grad = torch.empty_like(out)  # in out's memory format: a gradient arriving in another (a pooling's) takes it
        return torch.ops.aten.hardtanh_backward.grad_input(grad_output, out, -1.0, 1.0, grad_input=grad), None


def hardtanh_(x: Tensor, signs: bool = False) -> Tensor:
    """In-place hardtanh (clamp to [-1, 1]) that keeps only its output for the backward.  With ``signs``, sign(x)
    is made in the same pass and handed to the first :func:`sign` of the output (the binarizer after it), which
    then reads nothing: for a non-linearity whose output a binary layer takes as it is."""
    out, made = _HardtanhInPlace.apply(x, signs and not x.is_inference())  # (none inside torch.compile: not covered)
    if made is not None:
        out.__dict__[_HANDED] = (made, out._version)
    return out


class Hardtanh(nn.Hardtanh):
    """The non-linearity between binary layers: ``nn.Hardtanh(-1, 1, inplace=True)`` keeping only its output
    for the backward (:func:`hardtanh_`); ``signs``: its output is a binary layer's input, whose sign it makes
    in its own pass."""

    def __init__(self, signs: bool = False) -> None:
        super().__init__(-1.0, 1.0, inplace=True)
        self.signs = signs

    def forward(self, x: Tensor) -> Tensor:
        return hardtanh_(x, self.signs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, signs={self.signs}"


def saved_as_recipe(tensor: Tensor, recompute: Callable[..., Tensor], *sources: Tensor):
    """A context in which autograd saves ``tensor`` for the backward as ``recompute(*sources)``: a function
    rebuilding it, bit for bit, from tensors the graph keeps anyway (a layer's input, a per-channel
    statistic), so one activation-sized tensor less is held until the backward, for one element-wise pass
    more in it.  The sources must not change in place before the backward (refused, as autograd refuses a
    saved tensor that changed)."""

    target = weakref.ref(tensor)  # the hooks live as long as the graph: they must not keep the tensor itself

    def pack(saved: Tensor):
        return (recompute, sources, [t._version for t in sources]) if saved is target() else saved

    def unpack(packed):
        if isinstance(packed, Tensor):
            return packed
        function, inputs, versions = packed
        if [t._version for t in inputs] != versions:
            raise RuntimeError("a tensor a saved recipe reads was modified in place before the backward")
        return function(*inputs)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
