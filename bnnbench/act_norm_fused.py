"""act_norm's fused backward: in float32 and in sweeps over each sample while it is in cache.

``normalized_surrogate_sign`` evaluates a binarizer's surrogate at a0 = x / r, r = sqrt(var(x) + eps) per
sample (M elements, unbiased variance), the gradient flowing through the variance.  Its gradient of x is

    g_x = g d / r  -  S (x - mean(x)) / ((M - 1) r^3),      d = surrogate(a0),  S = sum_i g_i d_i x_i

(the division's term plus the variance's: d var / d x_i = 2 (x_i - mean) / (M - 1), d a0_i / d var =
-x_i / (2 r^3)).  The bit-exact kernel (:mod:`bnnbench.act_norm`) reproduces torch's eager formula, which
computes the variance in its own pass in the forward (for bfloat16 a float64 Welford chain, every operator's
result rounded to bfloat16) and keeps it; that costs 6-10 passes' time per layer in bfloat16, and the forward's
variance pass and a backward of torch's reduction order in float32.  Here the forward keeps only x (its sign
needs no statistics: r > 0) and the backward, per sample, sweeps it three times while it stays in cache:

    1. mean(x)                        float32 sums, reassociated into vector lanes
    2. var(x) = sum (x - mean)^2 / (M - 1), r = sqrt(var + eps)
    3. S = sum g d x, d at a0 = x / r (the surrogate's float32 formula with its scalar parameters, or its values
       from a tensor torch made at :func:`moments`' roots, whose moments then come in and are not swept again)
    4. g_x as above, rounded once to x's dtype

all in float32: for bfloat16 more exact than the eager formula's (one rounding to bfloat16 instead of one per
operator); for float32 within a few units in the last place of it, with the sums in another order.  Neither is
bit for bit torch's formula: the fused formulas of :data:`bnnbench.functional.FORMULAS`.  The two gradient terms
go back as one tensor (autograd then adds it to the residual's gradient once, not twice).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from numba import njit
from torch import Tensor

from . import omp
from .elementwise import _keep, _load, _store, _with_rounding, covered, in_layout_of, memory_rows

SUMS = {"reassoc", "contract"}  # float32 sums in vector lanes (no nnan/ninf: NaN and infinity propagate as IEEE says)
_kernels: dict[tuple[Callable | None, int], Callable] = {}  # _backward_rows per formula and parameter count


@njit(nogil=True, fastmath=SUMS, cache=True)
def _row_moments(row: np.ndarray, eps: np.float32) -> tuple[np.float32, np.float32]:  # pragma: no cover - compiled
    """(mean, sqrt(unbiased variance + eps)) of one row (bfloat16 bits or float32), in float32, two sweeps."""
    n = row.size
    total = np.float32(0.0)
    for i in range(n):
        total += _load(row[i])
    mean = total / np.float32(n)
    squares = np.float32(0.0)
    for i in range(n):
        centred = _load(row[i]) - mean
        squares += centred * centred
    return mean, np.sqrt(squares / np.float32(n - 1) + eps)


def _with_parameters(formula: Callable, count: int) -> Callable:
    """``at(v, params) = formula(v, *params)`` for a tuple of ``count`` scalars, compiled (numba calls no compiled
    formula with ``*params``: the tuple is unpacked by name)."""
    names = [f"p{j}" for j in range(count)]
    source = f"def at(v, params):\n    {''.join(n + ', ' for n in names)}= params\n    return formula({', '.join(['v', *names])})\n"
    if not count:
        source = "def at(v, params):\n    return formula(v)\n"
    scope = {"formula": _with_rounding(formula, _keep)}
    exec(source, scope)  # noqa: S102
    return njit(error_model="numpy", inline="always")(scope["at"])


def _backward_rows(formula: Callable | None, count: int):
    """The per-sample loop: the surrogate from ``formula`` (a float32 njit formula, its ``count`` scalar parameters
    after the element) evaluated at a0, or read from a float32 array; the moments computed here, or read from a
    (rows, 2) array of (mean, root) where that has columns."""
    evaluate = formula is not None
    at = _with_parameters(formula, count) if evaluate else _keep  # _keep: a placeholder the folded branch never calls

    @njit(nogil=True, fastmath=SUMS)
    def rows(x, grad, surrogate, moments, eps, out, params):  # pragma: no cover - compiled
        count, n = x.shape
        known = moments.shape[1] > 0
        for r in range(count):
            xr, gr, sr, o = x[r], grad[r], surrogate[r], out[r]
            if known:
                mean, root = moments[r, 0], moments[r, 1]
            else:
                mean, root = _row_moments(xr, eps)
            inverse = np.float32(1.0) / root
            total = np.float32(0.0)
            for i in range(n):
                v = _load(xr[i])
                d = at(v * inverse, params) if evaluate else sr[i]
                total += _load(gr[i]) * d * v
            coefficient = -total * inverse * inverse * inverse / np.float32(n - 1)
            for i in range(n):
                v = _load(xr[i])
                d = at(v * inverse, params) if evaluate else sr[i]
                o[i] = _store(_load(gr[i]) * d * inverse + coefficient * (v - mean), o)

    return rows


@njit(nogil=True, cache=True)
def _moments_rows(x: np.ndarray, eps: np.float32, moments: np.ndarray) -> None:  # pragma: no cover - compiled
    for r in range(x.shape[0]):
        moments[r, 0], moments[r, 1] = _row_moments(x[r], eps)


def _rows(t: Tensor) -> np.ndarray:
    """A covered tensor's memory, one row per sample in memory order (:func:`~bnnbench.elementwise.memory_rows`)."""
    return memory_rows(t, t.shape[0])


def covers(x: Tensor) -> bool:
    """True where :func:`backward` takes x: a dense CPU bfloat16 or float32 tensor, contiguous or channels_last
    (:func:`~bnnbench.elementwise.covered`), of two or more elements per sample.  A sample's sums run in memory
    order, so the two memory formats give values within float32 rounding of each other, not the same bits."""
    return x.dim() >= 2 and x.shape[0] > 0 and x[0].numel() >= 2 and covered(x.detach())


def moments(x: Tensor, eps: float) -> np.ndarray:
    """(mean, sqrt(var + eps)) per sample of a covered x, float32 of shape (N, 2), as :func:`backward` computes them."""
    out = np.empty((x.shape[0], 2), dtype=np.float32)
    omp.run(_moments_rows, x.shape[0], omp.Split(_rows(x)), np.float32(eps), omp.Split(out), work=x.numel())
    return out


def roots(known: np.ndarray, x: Tensor) -> Tensor:
    """The roots of :func:`moments` ``known`` of x, float32 of shape (N, 1, ...), to divide x by."""
    return torch.from_numpy(known[:, 1].copy()).view(x.shape[0], *([1] * (x.dim() - 1)))


def backward(
    x: Tensor,
    grad: Tensor,
    eps: float,
    formula: Callable | None = None,
    params: tuple[float, ...] = (),
    surrogate: Tensor | None = None,
    known: np.ndarray | None = None,
) -> Tensor:
    """g_x of the module docstring for a covered x and its gradient, as one tensor of x's dtype.

    The surrogate is ``formula`` (float32, as :class:`~bnnbench.elementwise.Kernel` takes them, evaluated at a0 in
    the sweep, its scalar ``params`` after the element) or its float32 values ``surrogate`` at a0 = x / root, with
    the ``known`` :func:`moments` it was evaluated with (swept again here where not given)."""
    grad = in_layout_of(grad.reshape(x.shape), x)
    key = (formula, len(params))
    if key not in _kernels:
        _kernels[key] = _backward_rows(formula, len(params))
    count = x.shape[0]
    values = np.empty((count, 0), dtype=np.float32) if surrogate is None else _rows(in_layout_of(surrogate.detach(), x, torch.float32))
    known = np.empty((count, 0), dtype=np.float32) if known is None else known
    out = torch.empty_like(x)
    split = [omp.Split(a) for a in (_rows(x), _rows(grad), values, known)]
    scalars = tuple(np.float32(p) for p in params)
    omp.run(_kernels[key], count, *split, np.float32(eps), omp.Split(_rows(out)), scalars, work=x.numel())
    return out


__all__ = ["backward", "covers", "moments", "roots"]
