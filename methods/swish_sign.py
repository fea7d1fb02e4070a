"""BNN+ SignSwish: sign forward, the derivative of SignSwish backward.

Forward:  x_b = sign(x)   (sign(0) = +1), on weights and activations
Backward: the derivative of SS_beta(x) = 2 sigmoid(beta x)[1 + beta x (1 - sigmoid(beta x))] - 1,
          d x_b / d x = beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x)),  beta = 5
          (it peaks at beta for x = 0 and turns negative for |x| > 2.4/beta)

Not modelled: BNN+'s weight regulariser and its trainable scales.  BNN+ has
no official code; the formulas follow the paper.

Paper: Darabi, Belbahri, Courbariaux & Nia, "BNN+: Improved Binary Network
Training", arXiv:1812.11800 (2018).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit
from torch import Tensor

from bnnbench import elementwise, omp
from bnnbench.elementwise import exp_float32, r
from bnnbench.functional import fused_formulas
from bnnbench.method import Method, Progress
from bnnbench.registry import register_method


def swish_sign_derivative(x: Tensor, beta: float) -> Tensor:
    """d SS_beta / dx = beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x)).

    The torch formula, or bit for bit its value in fewer passes where the kernels cover x: bfloat16 by lookup
    (:func:`bnnbench.elementwise.tabulated`, torch's bfloat16 cosh rounding some values differently in its scalar
    tail); else :data:`SWISH_ARGUMENTS`, torch's tanh and cosh in place, then :data:`SWISH_SIGN` (bfloat16: the
    numerator looked up, :func:`bnnbench.elementwise.bf16_table`, then :data:`SWISH_QUOTIENT`).  Float32 with the
    fused fp32 formulas: one pass from one exponential (:data:`SWISH_FROM_EXP`, not bit for bit)."""
    fused = elementwise.tabulated(_swish_sign, x, beta)
    fused = _fused_swish_sign(x, beta) if fused is None else fused
    return fused if fused is not None else _swish_sign(x, beta)


def _swish_sign(x: Tensor, beta: float) -> Tensor:
    return _numerator(x, beta) / (1.0 + torch.cosh(beta * x))


def _numerator(x: Tensor, beta: float) -> Tensor:
    bx = beta * x
    return beta * (2.0 - bx * torch.tanh(bx / 2.0))


def _swish_arguments(x: np.float32, beta: np.float32) -> tuple[np.float32, np.float32]:
    """bx = ``beta * x`` and ``bx / 2.0``, the arguments of cosh and tanh (a float times a tensor, a tensor over a
    float: float32 scalars)."""
    bx = r(beta * x)
    return bx, r(bx / np.float32(2.0))


def _swish_sign_tail(x: np.float32, th: np.float32, cosh: np.float32, beta: np.float32) -> np.float32:
    """``beta * (2.0 - bx * th) / (1.0 + cosh)`` after torch's tanh and cosh."""
    return r(r(beta * r(np.float32(2.0) - r(r(beta * x) * r(th)))) / r(np.float32(1.0) + cosh))


def _swish_quotient(numerator: np.float32, cosh: np.float32) -> np.float32:
    """``numerator / (1.0 + cosh)``."""
    return r(numerator / r(np.float32(1.0) + cosh))


def _swish_from_exp(x: np.float32, beta: np.float32) -> np.float32:
    """The derivative from e = exp(-|beta x|) alone: with y = |beta x|, 1 + cosh(beta x) = (1 + e)^2 / (2 e) and
    beta x tanh(beta x / 2) = y (1 - e) / (1 + e), so d = beta (2 - y (1 - e) / (1 + e)) 2 e / (1 + e)^2: no
    cancellation, exact limits (beta at 0, -0 far out, NaN at NaN and infinity, as torch's formula)."""
    y = abs(beta * x)
    e = exp_float32(-y)
    wider = np.float32(1.0) + e
    return beta * (np.float32(2.0) - y * ((np.float32(1.0) - e) / wider)) * (np.float32(2.0) * e / (wider * wider))


SWISH_FROM_EXP = elementwise.Kernel("swish_from_exp", _swish_from_exp)
"""The fused fp32 formulas' derivative (:func:`_swish_from_exp`): within a few float32 ulps of the exact value."""
SWISH_ARGUMENTS = elementwise.Kernel("swish_arguments", _swish_arguments, outputs=2)
SWISH_SIGN = elementwise.Kernel("swish_sign", _swish_sign_tail)
SWISH_QUOTIENT = elementwise.Kernel("swish_quotient", _swish_quotient)


_CHUNK = 1024  # elements a pass of :func:`_saturated_cosh` sorts before it takes their cosh (its indices stay in L1)


@njit(nogil=True, cache=True)
def _saturated_cosh(bx: np.ndarray, x: np.ndarray, at_one: np.ndarray) -> None:  # pragma: no cover - compiled
    """``bx = cosh(bx)`` in place, ``bx = beta * x``: ``at_one`` (cosh(beta), cosh(-beta)) where x is +1 or -1, the
    C library's coshf elsewhere, called only for those elements.  torch's float32 cosh calls that coshf element
    by element too (its vectorised loop maps it over the lanes; :func:`_coshf_is_torchs` checks it), 7-10 ns an
    element (2026-12-04, Intel Xeon 6/207, AVX-512, 1 thread), so an activation the hardtanh saturated in 44% of its elements (ResNet-20 on random data) costs
    that much less.  Chunk by chunk, the elements of each kind are listed first, without a branch (a branch on
    random +-1 mispredicts), then each list is taken in turn."""
    others, ones = np.empty(_CHUNK, dtype=np.int64), np.empty(_CHUNK, dtype=np.int64)
    for start in range(0, x.size, _CHUNK):
        stop = min(start + _CHUNK, x.size)
        k = m = 0
        for i in range(start, stop):
            saturated = abs(x[i]) == np.float32(1.0)
            others[k], ones[m] = i, i
            k += not saturated
            m += saturated
        for j in range(k):
            bx[others[j]] = math.cosh(bx[others[j]])
        for j in range(m):
            bx[ones[j]] = at_one[np.int64(x[ones[j]] < np.float32(0.0))]


@functools.cache
def _coshf_is_torchs() -> bool:
    """True when :func:`_saturated_cosh`'s coshf gives torch's float32 cosh bit for bit on every bfloat16 value
    (widened: the whole range, the special values, both signs) and 2^17 values of [-8, 8]; checked once a process."""
    probe = torch.cat([
        torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float(),
        torch.linspace(-8.0, 8.0, 2**17),
    ])
    ours = probe.clone()
    _saturated_cosh(ours.numpy(), np.zeros(probe.numel(), dtype=np.float32), np.zeros(2, dtype=np.float32))  # none at +-1
    theirs = torch.cosh(probe)
    return bool(torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.nan_to_num(), theirs.nan_to_num()))


def _cosh_(bx: Tensor, x: Tensor, beta: np.float32) -> Tensor:
    """``torch.cosh_(bx)`` for ``bx = beta * x`` (dense float32 tensors of one layout), bit for bit, by
    :func:`_saturated_cosh` where the C library's coshf is torch's."""
    if bx.stride() != x.stride() or not _coshf_is_torchs():
        return torch.cosh_(bx)
    at_one = torch.cosh(torch.tensor([beta, -beta], dtype=torch.float32)).numpy()
    flat_bx, flat_x = elementwise.memory_order(bx), elementwise.memory_order(x)
    omp.run(_saturated_cosh, flat_x.size, omp.Split(flat_bx), omp.Split(flat_x), at_one, grain=_CHUNK)
    return bx


def _fused_swish_sign(x: Tensor, beta: float) -> Tensor | None:
    if not elementwise.covered(x) or x.numel() == 0:
        return None
    if x.dtype == torch.float32 and fused_formulas(torch.float32):
        return elementwise.apply(SWISH_FROM_EXP, x, params=(np.float32(beta),), final=True)
    if x.dtype == torch.bfloat16:  # the numerator looked up in a pass of its own (a gather keeps a loop scalar)
        cosh = torch.cosh(beta * x)  # not in place: torch's bfloat16 cosh_ runs 2x slower than its cosh
        numerator = elementwise.look_up(elementwise.bf16_table(_numerator, beta), x)
        return elementwise.apply(SWISH_QUOTIENT, numerator, cosh, out=(cosh,), final=True)
    bx, half = elementwise.apply(SWISH_ARGUMENTS, x, params=(np.float32(beta),))  # one pass for both arguments
    cosh, th = _cosh_(bx, x, np.float32(beta)), torch.tanh_(half)
    return elementwise.apply(SWISH_SIGN, x, th, cosh, params=(np.float32(beta),), out=(cosh,), final=True)


@register_method("swish-sign")
@dataclass
class SwishSign(Method):
    """Sign with the SignSwish surrogate on weights and activations."""

    beta: float = 5.0

    positive = ("beta",)

    paper = "Darabi et al., BNN+: Improved Binary Network Training, arXiv:1812.11800"
    weight_backward = "beta (2 - beta w tanh(beta w / 2)) / (1 + cosh(beta w)), beta = 5"
    activation_backward = "beta (2 - beta a tanh(beta a / 2)) / (1 + cosh(beta a))"
    takes_fp32_formulas = True  # the derivative from one exponential with formulas(fp32="fused")

    def weight_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return swish_sign_derivative(x, self.beta)

    def activation_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return swish_sign_derivative(x, self.beta)
