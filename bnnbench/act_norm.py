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
order and precision by :func:`_torch_row_sum`: torch's CPU ``sum`` over dims 1.. of a contiguous tensor
reduces each sample (a row) with the cascade of ``SumKernel.cpp`` (float32 accumulators, one vector of
L lanes, four vectors in flight, partial sums carried up four levels of 16 and more, then the row's
scalar tail and the lanes in order); a bfloat16 row is loaded 2 L elements at a time, each lane the
float32 sum of elements k and k + L.  ``x.mean`` of a bfloat16 tensor sums a float32 copy (L elements a
load), divides in float32 and rounds.  L is the width of the vector torch's sum kernel was built for,
which need not be the CPU's widest (8 on an AVX-512 machine with torch 2.14): :func:`vector_lanes` finds
it by summing rows whose float32 result depends on it.  Over several threads torch splits the
samples between them, each reduced whole, so the order holds for any thread count, except for a single
sample of :data:`~bnnbench.elementwise.REDUCTION_GRAIN` elements or more (reduced in per-thread parts:
not covered).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torch import Tensor

from .elementwise import REDUCTION_GRAIN, _round_bf16, _widen, covered

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
def _add_unit(acc, level, slot, values, start, lanes, fold):  # pragma: no cover - compiled
    """acc[level, slot] += the unit (one vector load) at ``start``: ``lanes`` values, each the float32 sum of
    ``fold`` (1 or 2) elements ``lanes`` apart."""
    for lane in range(lanes):
        v = values[start + lane]
        if fold == 2:
            v = v + values[start + lanes + lane]
        acc[level, slot, lane] += v


@njit(nogil=True, cache=True)
def _torch_row_sum(values, n, lanes, fold):  # pragma: no cover - compiled
    """``values[:n]`` (float32) summed as torch's CPU ``sum`` reduces one contiguous row (the value it stores).

    Units are vector loads of ``lanes * fold`` elements when the row holds one (else single elements, one
    lane); ``row_sum`` runs the cascade of ``multi_row_sum`` over groups of four units, adds the units left
    over to the first accumulator and the other three to it; a vector row then adds its scalar tail and its
    lanes, in order, to a float32 zero.  The result is added to the zero-filled output, as torch's store does."""
    width = lanes * fold
    vectorised = n >= width
    if not vectorised:
        lanes, fold, width = 1, 1, 1
    units = n // width
    groups = units // _ILP
    acc = np.zeros((_LEVELS, _ILP, lanes), dtype=np.float32)
    power = max(4, _ceil_log2(groups) // _LEVELS)
    step, mask = 1 << power, (1 << power) - 1
    i = 0
    while i + step <= groups:
        for _ in range(step):
            for slot in range(_ILP):
                _add_unit(acc, 0, slot, values, (i * _ILP + slot) * width, lanes, fold)
            i += 1
        for level in range(1, _LEVELS):
            for slot in range(_ILP):
                for lane in range(lanes):
                    acc[level, slot, lane] += acc[level - 1, slot, lane]
                    acc[level - 1, slot, lane] = np.float32(0.0)
            if i & (mask << (level * power)):
                break
    while i < groups:
        for slot in range(_ILP):
            _add_unit(acc, 0, slot, values, (i * _ILP + slot) * width, lanes, fold)
        i += 1
    for level in range(1, _LEVELS):
        for slot in range(_ILP):
            for lane in range(lanes):
                acc[0, slot, lane] += acc[level, slot, lane]
    for unit in range(groups * _ILP, units):
        _add_unit(acc, 0, 0, values, unit * width, lanes, fold)
    for slot in range(1, _ILP):
        for lane in range(lanes):
            acc[0, 0, lane] += acc[0, slot, lane]
    total = acc[0, 0, 0]
    if vectorised:
        total = np.float32(0.0)
        for k in range(units * width, n):
            total += values[k]
        for lane in range(lanes):
            total += acc[0, 0, lane]
    return np.float32(0.0) + total


def _backward_loop(bf16: bool):
    """The per-sample loop over float32 rows, or over bfloat16 bits (widened, each operator's result rounded):
    compiled per dtype, so that the dtype's branches fold away (not cached on disk: numba keys no closure)."""

    @njit(nogil=True)
    def widen(v):  # pragma: no cover - compiled
        return _widen(v) if bf16 else v

    @njit(nogil=True)
    def rounded(v):  # pragma: no cover - compiled
        return _widen(_round_bf16(v)) if bf16 else v

    @njit(nogil=True)
    def narrow(v):  # pragma: no cover - compiled
        return _round_bf16(v) if bf16 else v

    @njit(nogil=True)
    def rows(x, grad, surrogate, root, scale, lanes, grad_x, grad_var_x):  # pragma: no cover - compiled
        """Per sample (row) the module docstring's two gradient terms of x, written to grad_x and grad_var_x."""
        count, n = x.shape
        products, values = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.float32)
        for r in range(count):
            rt = root[r]
            xr, gr, sr, out, out_var = x[r], grad[r], surrogate[r], grad_x[r], grad_var_x[r]
            for i in range(n):
                xv = widen(xr[i])
                g = rounded(widen(gr[i]) * widen(sr[i]))
                out[i] = narrow(g / rt)
                products[i] = rounded(-g * rounded(rounded(xv / rt) / rt))
                values[i] = xv
            grad_root = rounded(_torch_row_sum(products, n, lanes, 2 if bf16 else 1))
            mean = rounded(_torch_row_sum(values, n, lanes, 1) / np.float32(n))
            grad_var = rounded(grad_root / rounded(np.float32(2.0) * rt))
            coefficient = rounded(scale * grad_var)
            for i in range(n):
                out_var[i] = narrow(coefficient * rounded(values[i] - mean))

    return rows


_LOOPS = {torch.float32: _backward_loop(False), torch.bfloat16: _backward_loop(True)}


_lanes: list[int | None] = []  # vector_lanes' answer, once per process


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
                torch.tensor(_torch_row_sum(torch.from_numpy(row).to(dtype).float().numpy(), row.size, lanes, fold)).to(dtype)
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


def backward(x: Tensor, root: Tensor, surrogate: Tensor, grad: Tensor) -> tuple[Tensor, Tensor] | None:
    """(g_x, g_x') of the module docstring for x, the per-sample ``root`` (N, 1, ...), the surrogate's values
    at x / root and the incoming gradient, bit for bit autograd's; None where the kernel does not cover them."""
    tensors = (x, root, surrogate, grad)
    if x.dim() < 2 or x.shape[0] == 0 or x[0].numel() < 2:
        return None
    if not all(covered(t) and t.is_contiguous() and t.dtype == x.dtype for t in tensors) or surrogate.shape != x.shape:
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
    _LOOPS[x.dtype](_rows(x), _rows(grad), _rows(surrogate), roots, scale, lanes, _rows(grad_x), _rows(grad_var_x))
    return grad_x, grad_var_x


__all__ = ["backward", "vector_lanes"]
