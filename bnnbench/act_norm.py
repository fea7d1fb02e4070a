"""act_norm's backward in one pass per sample (numba), bit for bit what autograd computes through the torch formula.

``normalized_surrogate_sign`` evaluates a binarizer's surrogate at a0 = x / r, r = sqrt(var(x) + eps) per
sample, the gradient flowing through the variance.  Autograd's backward of that formula is ten torch passes
over the activation (DivBackward, SqrtBackward, VarBackward and the per-sample sums between them); given
the surrogate's values d = derivative(a0) :func:`backward` computes the same two gradient terms of x in one
sweep over each sample (which then stays in cache for a second sweep):

    g_a0   = g d                                       (the surrogate)
    g_x    = g_a0 / r                                  (through the division)
    g_r    = sum_i (-g_a0_i) ((x_i / r) / r)           (DivBackward's other gradient, summed to r's shape)
    g_var  = g_r / (2 r)                               (SqrtBackward)
    g_x'   = ((2 / (M - 1)) g_var) (x - mean(x))       (VarBackward, M elements per sample)

each operation rounded to the tensors' dtype as torch rounds it (float32; bfloat16: evaluated in float32,
rounded to nearest-even once per operator).  The two sums are torch's own reductions, reproduced in their
order and precision by :func:`row_sum`: torch's CPU ``sum`` over dims 1.. of a contiguous tensor
reduces each sample (a row) with the cascade of ``SumKernel.cpp`` (float32 accumulators, one vector of
L lanes, four vectors in flight, partial sums carried up four levels of 16 and more, then the row's
scalar tail and the lanes in order); a bfloat16 row is loaded 2 L elements at a time, each lane the
float32 sum of elements k and k + L.  ``x.mean`` of a bfloat16 tensor sums a float32 copy (L elements a
load), divides in float32 and rounds.  L is the width of the vector torch's sum kernel was built for,
which need not be the CPU's widest (8 on an AVX-512 machine with torch 2.14): :func:`vector_lanes` finds
it by summing rows whose float32 result depends on it.  Over several threads torch splits the
samples between them, each reduced whole, so the order holds for any thread count, except for a single
sample of :data:`~bnnbench.elementwise.REDUCTION_GRAIN` elements or more (reduced in per-thread parts:
not covered); the sweep splits the samples between torch's threads likewise (:mod:`bnnbench.omp`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from numba import njit
from torch import Tensor

from . import omp
from .elementwise import REDUCTION_GRAIN, _keep, _round_bf16, _to_bf16, _widen, _with_rounding, covered

Formula = Callable[[np.float32], np.float32]
"""A surrogate's float32 formula as :class:`~bnnbench.elementwise.Kernel` takes them, ``r()`` around each rounding
operator (e.g. ``elementwise._approx_sign_derivative``)."""
_LEVELS, _ILP = 4, 4  # SumKernel.cpp's cascade depth and vectors in flight


@njit(nogil=True, cache=True)
def _ceil_log2(n: int) -> int:
    """c10's CeilLog2: 1 for n <= 2, else ceil(log2 n)."""
    if n <= 2:
        return 1
    bits, m = 0, n - 1
    while m:
        bits += 1
        m >>= 1
    return bits


@njit(nogil=True, cache=True)
def _cascade_shape(units: int) -> tuple[int, int, int]:
    """(groups of four units, level power, level mask) of ``multi_row_sum`` over a row of ``units`` loads."""
    groups = units // _ILP
    power = max(4, _ceil_log2(groups) // _LEVELS)
    return groups, power, (1 << power) - 1


def _row_sum(lanes: int, fold: int):
    """``row_sum(values, n)``: torch's CPU ``sum`` of the contiguous float32 row ``values[:n]`` (the value its
    store leaves in the zero-filled output), for a kernel of ``lanes`` float32 lanes (compile-time constants).

    Units are loads of ``lanes * fold`` elements, each lane the float32 sum of ``fold`` (1 or 2) elements
    ``lanes`` apart, when the row holds one (else single elements, one lane).  ``row_sum`` runs
    ``multi_row_sum``'s cascade over groups of four units (level 0 gathers 2^power groups, then carries up
    the levels), folds the levels into level 0, adds the units left over to the first slot and the other
    three slots to it; a vector row then adds its scalar tail and its lanes, in order, to a float32 zero."""
    width, levels, ilp = lanes * fold, _LEVELS, _ILP
    span = ilp * lanes

    @njit(nogil=True, error_model="numpy")
    def add(acc, values, first, count):  # pragma: no cover - compiled
        """Groups first .. first + count - 1 into the level-0 slots ``acc`` (a view: its size, unknown to the
        compiler, keeps each lane loop a loop, which LLVM vectorises; unrolled, it stayed scalar)."""
        lanes_here = acc.size // ilp
        for g in range(first, first + count):
            group = values[g * ilp * width : (g + 1) * ilp * width]
            if fold == 1:
                for c in range(acc.size):
                    acc[c] += group[c]
            else:
                for k in range(ilp):
                    slots, unit = acc[k * lanes_here : (k + 1) * lanes_here], group[k * width : (k + 1) * width]
                    for lane in range(lanes_here):
                        slots[lane] += unit[lane] + unit[lanes_here + lane]

    @njit(nogil=True, error_model="numpy")
    def row_sum(values, n):  # pragma: no cover - compiled
        if n < width:
            return _scalar_row_sum(values, n)
        units = n // width
        groups, power, mask = _cascade_shape(units)
        step = 1 << power
        acc = np.zeros((levels, span), dtype=np.float32)
        i = 0
        while i + step <= groups:
            add(acc[0], values, i, step)
            i += step
            for level in range(1, levels):
                for c in range(span):
                    acc[level, c] += acc[level - 1, c]
                    acc[level - 1, c] = np.float32(0.0)
                if i & (mask << (level * power)):
                    break
        add(acc[0], values, i, groups - i)
        for level in range(1, levels):
            for c in range(span):
                acc[0, c] += acc[level, c]
        for u in range(groups * ilp, units):
            for lane in range(lanes):
                v = values[u * width + lane]
                if fold == 2:
                    v = v + values[u * width + lanes + lane]
                acc[0, lane] += v
        for k in range(1, ilp):
            for lane in range(lanes):
                acc[0, lane] += acc[0, k * lanes + lane]
        if width == 1:
            return np.float32(0.0) + acc[0, 0]
        total = np.float32(0.0)
        for k in range(units * width, n):
            total += values[k]
        for lane in range(lanes):
            total += acc[0, lane]
        return np.float32(0.0) + total

    return row_sum


_scalar_row_sum = _row_sum(1, 1)  # a row shorter than one load: the cascade over single elements


def _backward_loop(bf16: bool, lanes: int, formula: Formula | None):
    """The per-sample loop over float32 rows, or over bfloat16 bits (widened, each operator's result rounded),
    for torch's sum kernel of ``lanes`` float32, the surrogate read from its tensor or, with ``formula``,
    evaluated at a0 (rounded once): compiled per dtype, width and formula, so that the branches fold away
    (not cached on disk: numba keys no closure).  The first sweep keeps each sample's products in a scratch
    row (in cache; a bfloat16 sample's float32 copy in another), which :func:`_row_sum` then reduces."""
    products_sum, values_sum = _row_sum(lanes, 2 if bf16 else 1), _row_sum(lanes, 1)
    evaluate = formula is not None
    at = _with_rounding(formula, _to_bf16 if bf16 else _keep) if evaluate else _widen  # _widen: a placeholder the folded branch never calls

    @njit(nogil=True, error_model="numpy")
    def widen(v):  # pragma: no cover - compiled
        return _widen(v) if bf16 else v

    @njit(nogil=True, error_model="numpy")
    def rounded(v):  # pragma: no cover - compiled
        return _widen(_round_bf16(v)) if bf16 else v

    @njit(nogil=True, error_model="numpy")
    def narrow(v):  # pragma: no cover - compiled
        return _round_bf16(v) if bf16 else v

    @njit(nogil=True, error_model="numpy")
    def rows(x, grad, surrogate, root, scale, grad_x, grad_var_x):  # pragma: no cover - compiled
        """Per sample (row) the module docstring's two gradient terms of x, written to grad_x and grad_var_x."""
        count, n = x.shape
        products, widened = np.empty(n, dtype=np.float32), np.empty(n if bf16 else 0, dtype=np.float32)
        for r in range(count):
            rt = root[r]
            xr, gr, sr, out, out_var = x[r], grad[r], surrogate[r], grad_x[r], grad_var_x[r]
            for i in range(n):
                a0 = rounded(widen(xr[i]) / rt)
                g = rounded(widen(gr[i]) * (rounded(at(a0)) if evaluate else widen(sr[i])))
                out[i] = narrow(g / rt)
                products[i] = rounded(-g * rounded(a0 / rt))
            if bf16:  # x.mean sums a float32 copy
                for i in range(n):
                    widened[i] = widen(xr[i])
                values = widened
            else:
                values = xr
            grad_root = rounded(products_sum(products, n))
            mean = rounded(values_sum(values, n) / np.float32(n))
            grad_var = rounded(grad_root / rounded(np.float32(2.0) * rt))
            coefficient = rounded(scale * grad_var)
            for i in range(n):
                out_var[i] = narrow(coefficient * rounded(values[i] - mean))

    return rows


_loops: dict[tuple[torch.dtype, Formula | None], Callable] = {}  # _backward_loop per dtype and formula
_lanes: list[int | None] = []  # vector_lanes' answer, once per process
_sums: dict[tuple[int, int], Callable] = {}


def row_sum(values: np.ndarray, lanes: int, fold: int) -> np.float32:
    """torch's CPU sum of the float32 row ``values`` (bfloat16 values widened: ``fold`` 2) for a sum kernel of
    ``lanes`` float32, before rounding to the row's dtype."""
    if (lanes, fold) not in _sums:
        _sums[(lanes, fold)] = _row_sum(lanes, fold)
    return _sums[(lanes, fold)](values, values.size)


def _probe_row(size: int, seed: int) -> np.ndarray:
    """Ones with pairs of +-2^k at random places: each lane layout and cascade order gives another float32 sum."""
    rng = np.random.default_rng(seed)
    row = np.ones(size, dtype=np.float32)
    for _ in range(3):
        p, q = rng.integers(0, size, 2)
        row[p], row[q] = 2.0 ** int(rng.integers(10, 30)), -(2.0 ** int(rng.integers(10, 30)))
    return row


def vector_lanes() -> int | None:
    """The float32 lanes L of torch's CPU sum kernel in this process (4, 8 or 16), or None when none of them
    reproduces it (the kernel is then off)."""
    if not _lanes:
        rows = [_probe_row(size, seed) for seed, size in enumerate((37, 100, 203, 517, 1000, 2049, 4100, 9001))]
        found = None
        for lanes in (16, 8, 4):
            if all(
                torch.tensor(row_sum(torch.from_numpy(row).to(dtype).float().numpy(), lanes, fold)).to(dtype)
                .equal(torch.from_numpy(row).to(dtype).sum())
                for row in rows
                for dtype, fold in ((torch.float32, 1), (torch.bfloat16, 2))
            ):
                found = lanes
                break
        _lanes.append(found)
    return _lanes[0]


def _rows(t: Tensor) -> np.ndarray:
    """A contiguous (N, ...) tensor as an (N, M) numpy array (bfloat16 as its uint16 bits)."""
    rows = t.detach().reshape(t.shape[0], -1)
    return rows.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else rows.numpy()


def backward(x: Tensor, root: Tensor, grad: Tensor, surrogate: Tensor | Formula) -> tuple[Tensor, Tensor] | None:
    """(g_x, g_x') of the module docstring for x, the per-sample ``root`` (N, 1, ...) and the incoming gradient,
    bit for bit autograd's; ``surrogate`` is the surrogate's values at a0 = x / root, or its float32 formula
    (an njit function of one float32, rounded once to bfloat16 as :class:`~bnnbench.elementwise.Kernel`
    rounds it), which the sweep then evaluates itself.  None where the kernel does not cover the tensors."""
    formula = None if isinstance(surrogate, Tensor) else surrogate
    tensors = (x, root, grad) if formula else (x, root, grad, surrogate)
    if x.dim() < 2 or x.shape[0] == 0 or x[0].numel() < 2:
        return None
    if not all(covered(t) and t.is_contiguous() and t.dtype == x.dtype for t in tensors) or tensors[-1].shape != x.shape:
        return None
    if grad.shape != x.shape or root.numel() != x.shape[0]:
        return None
    if x.shape[0] == 1 and x.numel() >= REDUCTION_GRAIN and torch.get_num_threads() > 1:
        return None  # torch splits a lone sample's sum between threads
    lanes = vector_lanes()
    if lanes is None:
        return None
    grad_x, grad_var_x = torch.empty_like(x), torch.empty_like(x)
    scale = np.float32(2.0 / (x[0].numel() - 1))  # VarBackward's 2 / (M - 1), a double rounded as torch's scalar is
    roots = root.detach().reshape(-1).float().numpy()
    key = (x.dtype, formula)
    if key not in _loops:
        _loops[key] = _backward_loop(x.dtype == torch.bfloat16, lanes, formula)
    values = _rows(grad if formula else surrogate)  # not read with a formula
    rows = [omp.Split(t) for t in (_rows(x), _rows(grad), values, roots)]
    omp.run(_loops[key], x.shape[0], *rows, scale, omp.Split(_rows(grad_x)), omp.Split(_rows(grad_var_x)), work=x.numel())
    return grad_x, grad_var_x


__all__ = ["Formula", "backward", "row_sum", "vector_lanes"]
