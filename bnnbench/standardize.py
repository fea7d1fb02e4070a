"""A weight's per-output-channel standardisation in one autograd node: one pass per row each way, float64 inside.

IR-Net, RBNN (and their LCR variants) and ReCU binarize standardised latent weights, per output channel c of
n = C_in kh kw weights (unbiased variance, ``eps`` 0 for IR-Net/RBNN, 1e-5 for ReCU, ``gain`` 1 or ReCU's 2 sqrt 2):

    z = w - mean_c(w),   s_c = sqrt(sum z^2 / (n - 1) + eps),   y = gain z / s_c
    dL/dw = (gain / s_c) (g - mean_c(g) - z sum_c(g z) / ((n - 1) s_c^2)),   g = dL/dy

(the mean's share drops out of the variance's: sum z = 0).  torch's formula takes a mean, a subtraction, a
variance (:func:`~bnnbench.functional.per_output_variance`) and a division forward, and their four backward
nodes: some 20 small operators and 250-430 us a layer on the CPU (measured 2026-12-02 on an AMD EPYC 25/17,
1-2 threads: the weights of a CIFAR ResNet-20 hold 2,304-36,864 elements), where one kernel call each way takes
tens of microseconds.  The kernels sum in float64 and round once to float32, so they are at least as exact as
torch's float32 operators, not bit for bit them: :func:`fuses` keeps them to bfloat16-autocast runs with the
fused formulas (:func:`bnnbench.functional.fused_formulas`), where a run records that choice; float32 runs keep
torch's formulas, bit for bit.  NaN and infinities propagate (no fast-math flags that drop them).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torch import Tensor
from torch.autograd.function import once_differentiable

from .act_norm_fused import SUMS  # sums in vector lanes; NaN and infinity still propagate
from .functional import fused_formulas


@njit(nogil=True, fastmath=SUMS, cache=True)
def _forward_rows(w: np.ndarray, eps: np.float64, gain: np.float64, out: np.ndarray, stats: np.ndarray) -> None:  # pragma: no cover - compiled
    """out = gain (w - mean) / sqrt(var + eps) per row; stats[r] = (mean, gain / root) for the backward."""
    rows, n = w.shape
    for r in range(rows):
        row = w[r]
        total = 0.0
        for i in range(n):
            total += np.float64(row[i])
        mean = total / n
        squares = 0.0
        for i in range(n):
            z = np.float64(row[i]) - mean
            squares += z * z
        factor = gain / np.sqrt(squares / (n - 1) + eps)
        o = out[r]
        for i in range(n):
            o[i] = np.float32((np.float64(row[i]) - mean) * factor)
        stats[r, 0], stats[r, 1] = mean, factor


@njit(nogil=True, fastmath=SUMS, cache=True)
def _backward_rows(w: np.ndarray, grad: np.ndarray, stats: np.ndarray, gain: np.float64, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """out = factor (g - mean(g) - z sum(g z) factor^2 / (gain^2 (n - 1))) per row, factor = gain / root."""
    rows, n = w.shape
    for r in range(rows):
        row, g, o = w[r], grad[r], out[r]
        mean, factor = stats[r, 0], stats[r, 1]
        total = moment = 0.0
        for i in range(n):
            gi = np.float64(g[i])
            total += gi
            moment += gi * (np.float64(row[i]) - mean)
        g_mean = total / n
        coefficient = moment * factor * factor / (gain * gain * (n - 1))
        for i in range(n):
            o[i] = np.float32(factor * (np.float64(g[i]) - g_mean - (np.float64(row[i]) - mean) * coefficient))


def fuses(w: Tensor) -> bool:
    """True where :func:`standardized` takes w: a dense float32 CPU weight of two or more elements per output channel,
    inside bfloat16 autocast with the fused formulas, outside torch.compile."""
    return (
        w.device.type == "cpu"
        and w.dtype == torch.float32
        and w.dim() >= 2
        and w.shape[0] > 0
        and w[0].numel() >= 2
        and w.is_contiguous()
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and fused_formulas(torch.bfloat16)
        and not torch.compiler.is_compiling()
    )


def _rows(t: Tensor) -> np.ndarray:
    return t.detach().reshape(t.shape[0], -1).numpy()


def _forward(w: Tensor, eps: float, gain: float) -> tuple[Tensor, Tensor]:
    """(y, per-row (mean, gain / root) in float64) of a weight :func:`fuses` takes."""
    out = torch.empty_like(w, memory_format=torch.contiguous_format)
    stats = torch.empty((w.shape[0], 2), dtype=torch.float64)
    _forward_rows(_rows(w), np.float64(eps), np.float64(gain), _rows(out), stats.numpy())
    return out, stats


class _Standardized(torch.autograd.Function):
    """The module docstring's y, keeping w and two float64 numbers per row (mean, gain / root) for the backward."""

    @staticmethod
    def forward(ctx, w: Tensor, eps: float, gain: float) -> Tensor:  # type: ignore[override]
        out, stats = _forward(w.detach(), eps, gain)
        ctx.save_for_backward(w, stats)
        ctx.gain = gain
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        w, stats = ctx.saved_tensors
        grad = grad.to(torch.float32).contiguous()
        out = torch.empty_like(w, memory_format=torch.contiguous_format)
        _backward_rows(_rows(w), _rows(grad), stats.numpy(), np.float64(ctx.gain), _rows(out))
        return out, None, None


def standardized(w: Tensor, eps: float = 0.0, gain: float = 1.0) -> Tensor:
    """gain (w - mean_c(w)) / sqrt(var_c(w) + eps) per output channel c (unbiased variance) for a weight that
    :func:`fuses` takes, its gradient through mean and variance (the module docstring); an untracked w gets the
    forward kernel alone."""
    if not (w.requires_grad and torch.is_grad_enabled()):
        return _forward(w.detach(), eps, gain)[0]
    return _Standardized.apply(w, eps, gain)


__all__ = ["fuses", "standardized"]
