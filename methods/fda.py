"""FDA: frequency-domain approximation of the sign's gradient by a Fourier series.

Forward:  w_b = alpha_c sign(w),  alpha_c = mean|w_c| per output channel (detached);
          a_b = sign(a)   (sign(0) = +1)
Backward, on weights (times alpha_c) and activations alike (paper Sec. 3):
          sign(x) = (4/pi) sum_i sin((2i+1) omega x) / (2i+1)  over i >= 0, so
          d sign(x) / dx ~ (4 omega / pi) sum_{i=0..n} cos((2i+1) omega x) 1{|x| <= 1}
          omega = 0.1,  n(p) = 9 + floor(9 p)   (SPEC section 1)

Not modelled: the noise-adaptation module (a small per-layer MLP whose output,
weighted by 0.05 (1 + cos(pi (epoch+1)/E)), is added to the binary weights and
activations during training, which makes the training forward non-binary).

Paper: Xu, Han, Wang, Zhao, Xu, Tao & Xu, "Learning Frequency Domain
Approximation for Binary Neural Networks", NeurIPS 2021.  The authors' public
release (huawei-noah/Efficient-Computing, ``BinaryNetworks``) holds evaluation code and
checkpoints only, no training code: the backward here follows the paper's truncated
Fourier series of sign (Sec. 3) with the constants of this project's specification
(SPEC section 1: omega = 0.1, n = 9 + floor(9 p)), not an official training script.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bnnbench.method import Method, Progress, as_progress, mean_abs, per_output_dims
from bnnbench.registry import register_method


def fourier_sign_derivative(x: Tensor, omega: float, n: int | Tensor, max_n: int | None = None) -> Tensor:
    """(4 omega / pi) sum_{i=0..n} cos((2i+1) omega x), zero for |x| > 1.

    ``n`` may be a 0-dim tensor (a schedule of the training progress) that never exceeds
    ``max_n``: the terms ``i <= max_n`` are evaluated and those beyond ``n`` multiplied by 0,
    which leaves the sum bit for bit as with the integer ``n``.
    """
    last = int(n) if max_n is None else max_n
    series = sum(torch.cos((2 * i + 1) * omega * x) * (i <= n) for i in range(last + 1))
    return (4.0 * omega / math.pi) * series * (x.abs() <= 1).to(x.dtype)


@register_method("fda")
@dataclass
class FDA(Method):
    """Sign forward, truncated-Fourier-series derivative backward, n growing with p."""

    omega: float = 0.1
    n_start: int = 9
    n_growth: int = 9

    positive = ("omega",)

    paper = "Xu et al., Learning Frequency Domain Approximation for Binary Neural Networks, NeurIPS 2021"
    weight_forward = "mean|w_c| sign(w) (scale detached)"
    weight_backward = "(4 omega/pi) sum_{i<=n} cos((2i+1) omega w) 1{|w|<=1}, omega=0.1, n = 9 + floor(9p)"
    activation_backward = "same Fourier series as the weights"
    scale = "mean_abs_channel"

    def n_terms(self, progress: Progress) -> int | Tensor:
        """n(p) = n_start + floor(n_growth p): the last index of the series (an int for a float progress)."""
        n = self.n_start + torch.floor(as_progress(progress) * self.n_growth)
        return n if isinstance(progress, Tensor) else int(n)

    def derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return fourier_sign_derivative(x, self.omega, self.n_terms(progress), self.n_start + self.n_growth)

    def weight_scale(self, w: Tensor) -> Tensor:
        return mean_abs(w, per_output_dims(w)).detach()

    def weight_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return self.derivative(x, progress)

    def activation_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return self.derivative(x, progress)

    def schedule(self, progress: Progress) -> dict[str, float]:
        return {"n": float(self.n_terms(progress))}
