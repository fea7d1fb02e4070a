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

import torch
from torch import Tensor

from bnnbench.method import Method, Progress, as_progress, mean_abs, scheduled
from bnnbench.registry import register_method


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

    def o(self, progress: Progress) -> Progress:
        """The power o(p) = 1 + (o_end - 1)(1 - cos(pi p / 2))."""
        return scheduled(progress, 1.0 + (self.o_end - 1.0) * (1.0 - torch.cos(math.pi * as_progress(progress) / 2.0)))

    def derivative(self, x: Tensor, progress: Progress) -> Tensor:
        o = self.o(progress)
        ax = x.abs()
        inner = torch.pow(torch.as_tensor(self.interval, dtype=torch.float64), 1.0 / o) / self.interval
        power = (1.0 / o) * ax.clamp(min=self.interval) ** ((1.0 - o) / o)
        return torch.where(ax <= self.interval, inner, torch.where(ax <= self.t, power, torch.zeros_like(x)))

    def weight_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return self.derivative(x, progress)

    def activation_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return self.derivative(x, progress)

    def weight_scale(self, w: Tensor) -> Tensor:
        return mean_abs(w, tuple(range(w.dim())))

    def schedule(self, progress: Progress) -> dict[str, float]:
        return {"o": float(self.o(progress))}
