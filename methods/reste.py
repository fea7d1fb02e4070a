"""ReSTE: the rectified straight-through estimator.

Forward:  x_b = sign(x)                          (sign(0) = +1), weights scaled by
          the layer's mean|w| (not detached: the scale is differentiated).
Backward: d x_b / d x = (1/o) |x|^((1-o)/o)      for interval < |x| <= t
                      = interval^(1/o) / interval  for |x| <= interval
                      = 0                          for |x| > t
          i.e. the derivative of the power function sign(x)|x|^(1/o), linearised
          on [-interval, interval] to stay finite.
Schedule: o(p) = 1 + (o_end - 1)(1 - cos(pi p / 2)), from 1 (identity) to o_end.

Upstream applies the same estimator to the activations (t_a = t, o_a = o), so
ReSTE defines its own activation quantizer instead of ApproxSign.

Paper: Wu, Zheng, Liu & Zheng, "Estimator meets equilibrium perspective: a
rectified straight through estimator for binary neural networks training",
ICCV 2023.  Defaults t = 1.5, o_end = 3, interval = 0.1 from the official code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bnnbench import elementwise
from bnnbench.elementwise import pow_float32, r
from bnnbench.functional import fused_formulas
from bnnbench.method import Method, Progress, as_progress, mean_abs, schedule, scheduled
from bnnbench.registry import register_method


def reste_derivative(x: Tensor, o: float | Tensor, interval: float, t: float) -> Tensor:
    """(1/o)|x|^((1-o)/o) on interval < |x| <= t, interval^(1/o) / interval on |x| <= interval, 0 beyond t.

    The torch formula, or bit for bit its value in fewer passes where the kernels cover x: bfloat16 by lookup
    (:func:`bnnbench.elementwise.tabulated`; torch's bfloat16 pow rounds some values differently in its scalar
    tail for some exponents, -1/2 among them), else :data:`RESTE_BASE`, torch's pow in place, :data:`RESTE_PIECES`.
    Float32 with the fused fp32 formulas: one pass with the power's own float32 arithmetic (:data:`RESTE_ONE_PASS`,
    not bit for bit)."""
    fused = elementwise.tabulated(_reste, x, o, interval, t)
    fused = _fused_reste(x, o, interval, t) if fused is None else fused
    return fused if fused is not None else _reste(x, o, interval, t)


def _reste(x: Tensor, o: float | Tensor, interval: float, t: float) -> Tensor:
    ax = x.abs()
    inner = torch.pow(torch.as_tensor(interval, dtype=torch.float64), 1.0 / o) / interval
    power = (1.0 / o) * ax.clamp(min=interval) ** ((1.0 - o) / o)
    return torch.where(ax <= interval, inner, torch.where(ax <= t, power, torch.zeros_like(x)))


def _reste_base(x: np.float32, interval: np.float32) -> np.float32:
    """``|x|.clamp(min=interval)`` (NaN stays NaN)."""
    a = abs(x)
    return interval if a < interval else a


def _reste_pieces(power: np.float32, x: np.float32, interval: np.float32, t: np.float32, inner: np.float32, scale: np.float32) -> np.float32:
    """``where(|x| <= interval, inner, where(|x| <= t, (1/o) * power, 0))`` after torch's pow."""
    a = abs(x)
    return inner if a <= interval else (r(scale * power) if a <= t else np.float32(0.0))


def _reste_one_pass(x: np.float32, interval: np.float32, t: np.float32, inner: np.float32, scale: np.float32, exponent: np.float32) -> np.float32:
    """The pieces with the power ``|x|.clamp(min=interval) ** exponent`` in the same pass
    (:func:`~bnnbench.elementwise.pow_float32`): 0 where |x| > t or x is NaN, as the formula's selects give, whatever
    the power's value there."""
    a = abs(x)
    power = pow_float32(interval if a < interval else a, exponent)
    return inner if a <= interval else (scale * power if a <= t else np.float32(0.0))


RESTE_ONE_PASS = elementwise.Kernel("reste_one_pass", _reste_one_pass)
"""The fused fp32 formulas' estimator (:func:`_reste_one_pass`): within a few float32 ulps of the exact value."""
RESTE_BASE = elementwise.Kernel("reste_base", _reste_base)
RESTE_PIECES = elementwise.Kernel("reste_pieces", _reste_pieces)


def _fused_reste(x: Tensor, o: float | Tensor, interval: float, t: float) -> Tensor | None:
    if not elementwise.covered(x):
        return None
    mode, scale = x.dtype, 1.0 / o  # comparisons and where's inner: the scalars in x's dtype; ``scale * power`` below
    if mode == torch.float32 and fused_formulas(torch.float32) and x.numel():
        inner = float(torch.pow(torch.as_tensor(interval, dtype=torch.float64), 1.0 / o) / interval)
        params = tuple(np.float32(float(v)) for v in (interval, t, inner, scale, (1.0 - o) / o))
        return elementwise.apply(RESTE_ONE_PASS, x, params=params, final=True)
    base = elementwise.apply(RESTE_BASE, x, params=(elementwise.operand(interval, mode, False),))
    if base is None:
        return None
    power = base.pow_((1.0 - o) / o)
    inner = torch.pow(torch.as_tensor(interval, dtype=torch.float64), 1.0 / o) / interval
    bounds = [elementwise.operand(v, mode, False) for v in (interval, t, inner)]
    params = (*bounds, elementwise.operand(scale, mode, not isinstance(scale, Tensor)))
    return elementwise.apply(RESTE_PIECES, power, x, params=params, out=(power,), final=True)


@register_method("reste")
@dataclass
class ReSTE(Method):
    """Rectified STE with a cosine schedule of the power o."""

    t: float = 1.5
    o_end: float = 3.0
    interval: float = 0.1

    positive = ("t", "o_end", "interval")

    paper = "Wu et al., ReSTE, ICCV 2023"
    weight_forward = "mean|w|_layer * sign(w)"
    weight_backward = "(1/o)|w|^((1-o)/o) on 0.1<|w|<=t; 0.1^(1/o)/0.1 on |w|<=0.1; 0 beyond t"
    activation_backward = "same estimator as the weights"
    scale = "mean_abs_layer"
    takes_fp32_formulas = True  # the estimator in one pass with formulas(fp32="fused")

    @schedule
    def o(self, progress: Progress) -> Progress:
        """The power o(p) = 1 + (o_end - 1)(1 - cos(pi p / 2))."""
        return scheduled(progress, 1.0 + (self.o_end - 1.0) * (1.0 - torch.cos(math.pi * as_progress(progress) / 2.0)))

    def derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return reste_derivative(x, self.o(progress), self.interval, self.t)

    def weight_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return self.derivative(x, progress)

    def activation_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return self.derivative(x, progress)

    def weight_scale(self, w: Tensor) -> Tensor:
        return mean_abs(w, tuple(range(w.dim())))

    def schedule(self, progress: Progress) -> dict[str, float]:
        return {"o": float(self.o(progress))}
