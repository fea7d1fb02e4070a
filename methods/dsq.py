"""DSQ at 1 bit: Differentiable Soft Quantization with a learned sharpness and clipping value.

DSQ replaces each quantization interval P_i = [l + i Delta, l + (i+1) Delta]
of the clipping range [l, u] by a scaled tanh:
    phi(x) = s tanh(k (x - m_i)),   m_i = l + (i + 1/2) Delta,   s = 1 / tanh(k Delta / 2)
    Q_S(x) = l + Delta (i + (phi(x) + 1) / 2)   on P_i;  l below l, u above u
and characterises its sharpness by the characteristic variable alpha = 1 - tanh(k Delta / 2), so that
    s = 1 / (1 - alpha),   k = ln(2 / alpha - 1) / Delta.
The forward keeps the exact quantized value, sgn(phi) in place of phi, whose gradient is the
straight-through 1: the backward is autograd's through Q_S, to x, to the clipping value and
to alpha, which is learned (initial value 0.2 in the public re-implementations).

At 1 bit there is one interval, Delta = u - l; bnnbench's binary layers need values +-c, so
the range is symmetric, l = -u, m = 0, Delta = 2u, and Q_S = u phi(clip(x, -u, u)):

Weights (per layer: learned u_w and alpha_w, ``layer.weight_params``):
    forward   w_b = u_w sign(w)                              (sign(0) = +1)
    backward  d w_b / d w     = u_w s k (1 - tanh^2(k w)) 1{|w| <= u_w}
              d w_b / d u_w   = sign(w) + u_w d phi / d u_w   (|w| <= u_w);  sign(w) beyond
              d w_b / d alpha = u_w d phi / d alpha
    with k = ln(2/alpha - 1) / (2 u_w), s = 1/(1 - alpha).
Activations (per layer: learned u_a and alpha_a, ``layer.activation_params``):
    forward   a_b = sign(a)   (the layer carries +-1: the scale u_a of Q_S is not applied)
    backward  d a_b / d a     = s k (1 - tanh^2(k a)) 1{|a| <= u_a},  k = ln(2/alpha_a - 1) / (2 u_a)
              and autograd's gradients of phi(clip(a, -u_a, u_a)) to u_a and alpha_a.
alpha is clamped to [alpha_min, alpha_max] = [1e-4, 0.9999] (k finite and positive) and u to
u >= 1e-8.  No schedule: alpha and u evolve by gradient descent.  No extra loss term.

Initial values: alpha = 0.2 on both paths; u_a = 1 (the backbones' hardtanh range);
u_w = 3 std(w) of the layer, set at the first ``set_progress`` of a stage with binary weights
(stage 2), from the weights that stage starts with (a bnnbench choice; the flag ``u_init`` in
the layer's state keeps resumed runs from re-initialising it).

Sources and fidelity: Gong, Liu, Jiang, Li, Hu, Lin, Yu & Yan, "Differentiable Soft
Quantization: Bridging Full-Precision and Low-Bit Neural Networks", ICCV 2019, Sec. 3 (its
equation numbers are not quoted: the paper's text was not at hand to check them).  The
authors released no training code: the formulas follow the paper; alpha's
initial value 0.2 and k = ln(2/alpha - 1)/Delta agree with the public re-implementations
(PaddleSlim, MQBench, ricky40403/DSQ).  bnnbench's choices, not the paper's: the symmetric
range (l = -u), the initial u_w = 3 std(w), the clamps, and +-1 activations (the
activation's value scale is dropped, its gradients kept).  At exactly |x| = u the input keeps
the gradient (inclusive clip).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit
from torch import Tensor

from bnnbench import elementwise, omp
from bnnbench.elementwise import _load, _store, fma, r, tanh_float32
from bnnbench.functional import fused_formulas, sign, signs_of
from bnnbench.method import Method, Progress, straight_through
from bnnbench.registry import register_method


def inclusive_clip(x: Tensor, u: Tensor) -> Tensor:
    """clip(x, -u, u) with the gradient to x on |x| <= u and to u (times sign x) beyond."""
    return torch.where(x.abs() <= u, x, torch.where(x >= 0, u, -u))


def soft_quantizer(x: Tensor, u: Tensor, alpha: Tensor) -> Tensor:
    """phi(clip(x, -u, u)) = s tanh(k clip(x)), s = 1/(1 - alpha), k = ln(2/alpha - 1) / (2u): in [-1, 1]."""
    s, k = soft_quantizer_scales(u, alpha)
    return s * torch.tanh(k * inclusive_clip(x, u))


def soft_quantizer_scales(u: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """s = 1/(1 - alpha), k = ln(2/alpha - 1) / (2u)."""
    return 1.0 / (1.0 - alpha), torch.log(2.0 / alpha - 1.0) / (2.0 * u)


def soft_quantized_sign(x: Tensor, u: Tensor, alpha: Tensor) -> Tensor:
    """``straight_through(sign(x), soft_quantizer(x, u, alpha))``: the sign forward, autograd's gradients through the
    soft quantizer (to x, u and alpha) backward, bit for bit.

    Where the kernels cover x, the element-wise part is one autograd node (:class:`_SoftQuantizedSign`) that keeps
    only x and recomputes in the backward, in one pass after torch's tanh (bfloat16: looked up), what autograd's nodes of
    the clip, the product with k, tanh and the product with s give, the gradients to the scalars as the same
    tensors torch sums; the scalar part (s, k and -u from u and alpha) stays autograd's, built in the same order."""
    if not elementwise.covered(x.detach()) or torch.compiler.is_compiling():
        return straight_through(sign(x.detach()), soft_quantizer(x, u, alpha))
    s, k = soft_quantizer_scales(u, alpha)
    return _SoftQuantizedSign.apply(x, u, -u, s, k)


def _dsq_argument(x: np.float32, u: np.float32, neg_u: np.float32, k: np.float32) -> np.float32:
    """``k * inclusive_clip(x, u)``."""
    return r(k * (x if abs(x) <= u else (u if x >= np.float32(0.0) else neg_u)))


def _dsq_gradients(x, grad, th, u, neg_u, s, k):  # -> (to x, to u, to -u, to s, to k): the last four summed by torch
    """Autograd's nodes backward: ``s * th`` (grad * s; grad * th), TanhBackward (grad (1 - th^2), torch's FMA),
    ``k * c`` (grad * k; grad * c), the two wheres (the gradient where the condition holds, else 0)."""
    inside, positive = abs(x) <= u, x >= np.float32(0.0)
    c = x if inside else (u if positive else neg_u)
    grad_z = r(r(grad * s) * fma(-th, th, np.float32(1.0)))
    grad_c = r(grad_z * k)
    outside = np.float32(0.0) if inside else grad_c
    zero = np.float32(0.0)
    return (grad_c if inside else zero), (outside if positive else zero), (zero if positive else outside), r(grad * th), r(grad_z * c)


DSQ_ARGUMENT = elementwise.Kernel("dsq_argument", _dsq_argument)
DSQ_GRADIENTS = elementwise.Kernel("dsq_gradients", _dsq_gradients, outputs=5)


class _SoftQuantizedSign(torch.autograd.Function):
    """Forward x's sign; backward the soft quantizer's gradients to x, u, -u, s and k (see
    :func:`soft_quantized_sign`); where the kernels do not cover the gradient, autograd's through the formula."""

    @staticmethod
    def forward(ctx, x: Tensor, u: Tensor, neg_u: Tensor, s: Tensor, k: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, u, neg_u, s, k)
        ctx.fused = x.dtype in (torch.bfloat16, torch.float32) and fused_formulas(x.dtype) and elementwise.covered(x.detach())  # the forward's context's choice
        return signs_of(sign(x), sign, x)  # the binary conv keeps x, not the signs

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, u, neg_u, s, k = ctx.saved_tensors
        scalars = tuple(np.float32(float(v)) for v in (u, neg_u, s, k))  # 0-dim tensors of x's dtype: exact
        if ctx.fused and elementwise.covered(grad):
            return _fused_gradients(x, elementwise.in_layout_of(grad, x), scalars)
        z, parts = elementwise.apply(DSQ_ARGUMENT, x, params=(scalars[0], scalars[1], scalars[3])), None
        if z is not None:  # torch's tanh: bfloat16 looked up (a pass of its own: a gather keeps a loop scalar)
            th = elementwise.look_up(elementwise.bf16_table(torch.tanh), z, z) if z.dtype == torch.bfloat16 else torch.tanh_(z)
            parts = elementwise.apply(DSQ_GRADIENTS, x, grad, th, params=scalars, out=(*(torch.empty_like(x) for _ in range(4)), th))
        if parts is None:
            return _autograd_of_formula(x, u, neg_u, s, k, grad)
        return parts[0], parts[1].sum(), parts[2].sum(), parts[3].sum(), parts[4].sum()


@njit(nogil=True, fastmath={"reassoc", "contract"}, error_model="numpy", cache=True)
def _fused_rows(x, grad, out, sums, u, neg_u, s, k):  # pragma: no cover - compiled
    """Per row (bfloat16 bits or float32): the gradient to x (rounded once to x's dtype) and the row's float32 sums of
    the gradients to u, -u, s and k, the soft quantizer's backward in float32 in one pass."""
    zero = np.float32(0.0)
    for row in range(x.shape[0]):
        xr, gr, o = x[row], grad[row], out[row]
        to_u, to_neg_u, to_s, to_k = zero, zero, zero, zero
        for i in range(xr.size):
            v, g = _load(xr[i]), _load(gr[i])
            inside, positive = abs(v) <= u, v >= zero
            c = v if inside else (u if positive else neg_u)
            th = tanh_float32(k * c)
            grad_z = g * s * (np.float32(1.0) - th * th)
            grad_c = grad_z * k
            outside = zero if inside else grad_c
            o[i] = _store(grad_c if inside else zero, o)
            to_u += outside if positive else zero  # selects, no short-circuit branches: the loop stays vectorised
            to_neg_u += zero if positive else outside
            to_s += g * th
            to_k += grad_z * c
        sums[row, 0], sums[row, 1], sums[row, 2], sums[row, 3] = to_u, to_neg_u, to_s, to_k


def _fused_gradients(x: Tensor, grad: Tensor, scalars: tuple[np.float32, ...]) -> tuple[Tensor, ...]:
    """The soft quantizer's gradients for a dense (contiguous or channels_last) bfloat16 or float32 x and a grad of its
    strides, in one float32 pass (the fused formulas of x's dtype): to x in x's dtype, to u, -u, s and k summed in
    float32 per sample (in memory order), then in float64, each rounded once."""
    rows = x.shape[0] if x.dim() > 1 else 1
    out = torch.empty_like(x)
    sums = np.empty((rows, 4), dtype=np.float32)
    split = [omp.Split(a) for a in (*(elementwise.memory_rows(t, rows) for t in (x, grad, out)), sums)]
    omp.run(_fused_rows, rows, *split, *scalars, work=x.numel())
    totals = torch.from_numpy(sums).double().sum(dim=0).to(x.dtype)
    return out, totals[0], totals[1], totals[2], totals[3]


def _autograd_of_formula(x: Tensor, u: Tensor, neg_u: Tensor, s: Tensor, k: Tensor, grad: Tensor) -> tuple[Tensor, ...]:
    leaves = [t.detach().requires_grad_() for t in (x, u, neg_u, s, k)]
    with torch.enable_grad():
        lx, lu, ln, ls, lk = leaves
        soft = ls * torch.tanh(lk * torch.where(lx.abs() <= lu, lx, torch.where(lx >= 0, lu, ln)))
        return torch.autograd.grad(soft, leaves, grad)


@register_method("dsq")
@dataclass
class DSQ(Method):
    """u sign(w) / sign(a) forward; autograd through DSQ's tanh soft quantizer backward, alpha and u learned."""

    alpha_init: float = 0.2
    alpha_min: float = 1e-4
    alpha_max: float = 0.9999
    act_bound: float = 1.0
    weight_bound_std: float = 3.0

    positive = ("alpha_init", "alpha_min", "alpha_max", "act_bound", "weight_bound_std")
    paper = "Gong et al., Differentiable Soft Quantization (DSQ), ICCV 2019 (1 bit)"
    weight_forward = "u_w sign(w), u_w learned per layer (DSQ's symmetric clipping value)"
    weight_backward = "u_w s k (1 - tanh^2(k w)) 1{|w|<=u_w}, s = 1/(1-alpha), k = ln(2/alpha-1)/(2u_w); alpha, u_w learned"
    activation_forward = "sign(a)"
    activation_backward = "s k (1 - tanh^2(k a)) 1{|a|<=u_a}, alpha_a, u_a learned per layer"
    scale = "learned_bound"
    takes_bf16_formulas = True  # a bfloat16 soft quantizer's backward: one float32 pass unless formulas(bf16="torch")
    takes_fp32_formulas = True  # a float32 one likewise with formulas(fp32="fused")

    def _alpha(self, alpha: Tensor) -> Tensor:
        return alpha.clamp(self.alpha_min, self.alpha_max)

    # ----------------------------------------------------------------- weights
    def weight_parameters(self, w: Tensor) -> dict[str, Tensor]:
        u = self.weight_bound_std * w.std()
        return {"u": u.reshape(()).clone(), "alpha": torch.tensor(self.alpha_init, dtype=w.dtype)}

    def weight_state(self, w: Tensor) -> dict[str, Tensor]:
        return {"u_init": torch.zeros((), dtype=w.dtype)}

    def update_state(self, w: Tensor, progress: Progress, stage: int, event: str, **tensors: Tensor) -> None:
        """At the first progress of a stage with binary weights: u_w = weight_bound_std * std(w), once."""
        if event != "progress" or stage != 2 or "u_init" not in tensors or bool(tensors["u_init"] != 0):
            return
        tensors["u"].copy_(self.weight_bound_std * w.std())
        tensors["u_init"].fill_(1.0)

    def _u(self, u: Tensor) -> Tensor:
        return u.clamp(min=1e-8)

    def pre_sign(self, w: Tensor, progress: Progress, **tensors: Tensor) -> Tensor:
        return w

    def binarize_weight(self, w: Tensor, progress: Progress = 0.0, **tensors: Tensor) -> Tensor:
        """sign(w) forward; phi(clip(w, -u, u)) backward (to w, u and alpha)."""
        u = self._u(tensors["u"]) if "u" in tensors else w.abs().max().detach()
        alpha = self._alpha(tensors["alpha"]) if "alpha" in tensors else torch.tensor(self.alpha_init, dtype=w.dtype)
        return soft_quantized_sign(w, u.to(w.dtype), alpha.to(w.dtype))

    def weight_scale(self, w: Tensor, **tensors: Tensor) -> Tensor:
        return self._u(tensors["u"]).to(w.dtype) if "u" in tensors else w.abs().max().detach()

    # ------------------------------------------------------------- activations
    def activation_parameters(self, in_channels: int, spatial_dims: int) -> dict[str, Tensor]:
        return {"u": torch.tensor(self.act_bound), "alpha": torch.tensor(self.alpha_init)}

    def activation(self, a: Tensor, progress: Progress = 0.0, u: Tensor | None = None, alpha: Tensor | None = None) -> Tensor:
        """sign(a) forward; phi(clip(a, -u, u)) backward, to a, u and alpha (their initial values when None)."""
        if not self.binary_activations:
            return a
        u = self._u(u).to(a.dtype) if u is not None else torch.tensor(self.act_bound, dtype=a.dtype)
        alpha = self._alpha(alpha).to(a.dtype) if alpha is not None else torch.tensor(self.alpha_init, dtype=a.dtype)
        return soft_quantized_sign(a, u, alpha)


def dsq_slope(alpha: float, u: float) -> float:
    """s k: the soft quantizer's slope at 0 (for documentation and tests)."""
    return (1.0 / (1.0 - alpha)) * math.log(2.0 / alpha - 1.0) / (2.0 * u)
