"""act_norm's backward for bfloat16 activations, in float32 and in sweeps over each sample while it is in cache.

``normalized_surrogate_sign`` evaluates a binarizer's surrogate at a0 = x / r, r = sqrt(var(x) + eps) per
sample (M elements, unbiased variance), the gradient flowing through the variance.  Its gradient of x is

    g_x = g d / r  -  S (x - mean(x)) / ((M - 1) r^3),      d = surrogate(a0),  S = sum_i g_i d_i x_i

(the division's term plus the variance's: d var / d x_i = 2 (x_i - mean) / (M - 1), d a0_i / d var =
-x_i / (2 r^3)).  For a bfloat16 x the bit-exact kernel (:mod:`bnnbench.act_norm`) reproduces torch's eager
formula, which rounds every operator's result to bfloat16 and computes the variance in a float64 Welford chain
in the forward; that costs 6-10 passes' time per layer.  Here the forward keeps only x (its sign needs no
statistics: r > 0) and the backward, per sample, sweeps it three times while it stays in cache:

    1. mean(x)                        float32 sums, reassociated into vector lanes
    2. var(x) = sum (x - mean)^2 / (M - 1), r = sqrt(var + eps)
    3. S = sum g d x, d at a0 = x / r (the surrogate's float32 formula, or its values from a tensor)
    4. g_x as above, rounded once to bfloat16

all in float32: more exact than the eager formula's (one rounding to bfloat16 instead of one per operator), not
bit for bit it.  The two gradient terms go back as one tensor (autograd then adds it to the residual's gradient
once, not twice).  Float32 activations keep the bit-exact kernel: their numbers are the reference formulas'.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from numba import njit
from torch import Tensor

from . import omp
from .elementwise import _keep, _round_bf16, _widen, _with_rounding, covered

SUMS = {"reassoc", "contract"}  # float32 sums in vector lanes (no nnan/ninf: NaN and infinity propagate as IEEE says)
_kernels: dict[Callable | None, Callable] = {}


@njit(nogil=True, fastmath=SUMS, cache=True)
def _row_moments(row: np.ndarray, eps: np.float32) -> tuple[np.float32, np.float32]:  # pragma: no cover - compiled
    """(mean, sqrt(unbiased variance + eps)) of one bfloat16 row (its bits), in float32, two sweeps."""
    n = row.size
    total = np.float32(0.0)
    for i in range(n):
        total += _widen(row[i])
    mean = total / np.float32(n)
    squares = np.float32(0.0)
    for i in range(n):
        centred = _widen(row[i]) - mean
        squares += centred * centred
    return mean, np.sqrt(squares / np.float32(n - 1) + eps)


def _backward_rows(formula: Callable | None):
    """The per-sample loop: surrogate from ``formula`` (a float32 njit formula) evaluated at a0, or read from a float32 array."""
    evaluate = formula is not None
    at = _with_rounding(formula, _keep) if evaluate else _widen  # _widen: a placeholder the folded branch never calls

    @njit(nogil=True, fastmath=SUMS)
    def rows(x, grad, surrogate, eps, out):  # pragma: no cover - compiled
        count, n = x.shape
        for r in range(count):
            xr, gr, sr, o = x[r], grad[r], surrogate[r], out[r]
            mean, root = _row_moments(xr, eps)  # as :func:`roots` computes it, bit for bit
            inverse = np.float32(1.0) / root
            total = np.float32(0.0)
            for i in range(n):
                v = _widen(xr[i])
                d = at(v * inverse) if evaluate else sr[i]
                total += _widen(gr[i]) * d * v
            coefficient = -total * inverse * inverse * inverse / np.float32(n - 1)
            for i in range(n):
                v = _widen(xr[i])
                d = at(v * inverse) if evaluate else sr[i]
                o[i] = _round_bf16(_widen(gr[i]) * d * inverse + coefficient * (v - mean))

    return rows


@njit(nogil=True, cache=True)
def _moments_rows(x: np.ndarray, eps: np.float32, roots: np.ndarray) -> None:  # pragma: no cover - compiled
    for r in range(x.shape[0]):
        roots[r] = _row_moments(x[r], eps)[1]


def _bits(t: Tensor) -> np.ndarray:
    return t.detach().reshape(t.shape[0], -1).view(torch.int16).numpy().view(np.uint16)


def covers(x: Tensor) -> bool:
    """True where :func:`backward` takes x: a dense contiguous CPU bfloat16 tensor of two or more elements per sample."""
    return x.dtype == torch.bfloat16 and x.dim() >= 2 and x.shape[0] > 0 and x[0].numel() >= 2 and x.is_contiguous() and covered(x.detach())


def roots(x: Tensor, eps: float) -> Tensor:
    """sqrt(var + eps) per sample of a covered x, float32 of shape (N, 1, ...), as :func:`backward` computes it."""
    out = np.empty(x.shape[0], dtype=np.float32)
    omp.run(_moments_rows, x.shape[0], omp.Split(_bits(x)), np.float32(eps), omp.Split(out), work=x.numel())
    return torch.from_numpy(out).view(x.shape[0], *([1] * (x.dim() - 1)))


def backward(x: Tensor, grad: Tensor, eps: float, formula: Callable | None = None, surrogate: Tensor | None = None) -> Tensor:
    """g_x of the module docstring for a covered x and its gradient, as one bfloat16 tensor.

    The surrogate is ``formula`` (float32, as :class:`~bnnbench.elementwise.Kernel` takes them, evaluated at a0 in
    the sweep) or its float32 values ``surrogate`` at a0 = x / :func:`roots` (x, eps)."""
    grad = grad.contiguous()
    if grad.shape != x.shape or grad.dtype != torch.bfloat16:
        grad = grad.to(torch.bfloat16).reshape(x.shape).contiguous()
    if formula not in _kernels:
        _kernels[formula] = _backward_rows(formula)
    count = x.shape[0]
    values = np.empty((count, 0), dtype=np.float32) if surrogate is None else surrogate.detach().reshape(count, -1).contiguous().numpy()
    out = torch.empty_like(x)
    split = [omp.Split(a) for a in (_bits(x), _bits(grad), values)]
    omp.run(_kernels[formula], count, *split, np.float32(eps), omp.Split(_bits(out)), work=x.numel())
    return out


__all__ = ["backward", "covers", "roots"]
