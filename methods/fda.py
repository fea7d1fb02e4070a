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

import numpy as np
import torch
from torch import Tensor

from bnnbench import elementwise
from bnnbench.elementwise import r
from bnnbench.method import Method, Progress, as_progress, mean_abs, per_output_dims, schedule
from bnnbench.registry import register_method


def fourier_sign_derivative(x: Tensor, omega: float, n: int | Tensor, max_n: int | None = None) -> Tensor:
    """(4 omega / pi) sum_{i=0..n} cos((2i+1) omega x), zero for |x| > 1.

    ``n`` may be a 0-dim tensor (a schedule of the training progress) that never exceeds
    ``max_n``: the terms ``i <= max_n`` are evaluated and those beyond ``n`` multiplied by 0,
    which leaves the sum bit for bit as with the integer ``n``.

    The torch formula, or bit for bit its value in fewer passes where the kernels cover x: bfloat16 by lookup
    (:func:`bnnbench.elementwise.tabulated`), float32 as one torch cos in place and one fused pass per term (from :data:`FUSED_FROM` elements).
    """
    fused = elementwise.tabulated(_fourier, x, omega, n, max_n) if x.dtype == torch.bfloat16 else _fourier_float32(x, omega, n, max_n)
    return fused if fused is not None else _fourier(x, omega, n, max_n)


def _fourier(x: Tensor, omega: float, n: int | Tensor, max_n: int | None = None) -> Tensor:
    last = int(n) if max_n is None else max_n
    series = sum(torch.cos((2 * i + 1) * omega * x) * (i <= n) for i in range(last + 1))
    return (4.0 * omega / math.pi) * series * (x.abs() <= 1).to(x.dtype)


def _fourier_step(cos: np.float32, x: np.float32, total: np.float32, c: np.float32) -> tuple[np.float32, np.float32]:
    """One term of the sum, ``total + cos * 1`` (the term's ``* (i <= n)``), and the next cosine's argument ``c x``."""
    return r(total + r(cos * np.float32(1.0))), r(c * x)


def _fourier_first(cos: np.float32, x: np.float32, c: np.float32) -> tuple[np.float32, np.float32]:
    """The first term: Python's ``sum`` starts from 0, ``0 + t``."""
    return _fourier_step(cos, x, np.float32(0.0), c)


def _fourier_last(cos: np.float32, x: np.float32, total: np.float32, scale: np.float32, beyond: np.float32) -> np.float32:
    """The last term, ``(4 omega / pi) * series``, times ``(|x| <= 1)`` as 1 or 0; NaN where a term not evaluated
    (the largest coefficient ``beyond``, 0 for none) has an infinite argument: cos(inf) * 0 is NaN."""
    series = _fourier_step(cos, x, total, np.float32(0.0))[0]
    if abs(r(beyond * x)) == np.float32(np.inf):
        series = np.float32(np.nan)
    return r(r(scale * series) * (np.float32(1.0) if abs(x) <= np.float32(1.0) else np.float32(0.0)))


FOURIER_FIRST = elementwise.Kernel("fourier_first", _fourier_first, outputs=2)
FOURIER_STEP = elementwise.Kernel("fourier_step", _fourier_step, outputs=2)
FOURIER_LAST = elementwise.Kernel("fourier_last", _fourier_last)


FUSED_FROM = 1 << 15
"""Elements from which the float32 series takes its kernels: below, torch's three operators a term cost less than
a kernel call's overhead (a 3x3 weight of 16 x 16 channels: 300 us against 720 us; of 64 x 64 channels the two are
even; measured 2026-12-02 on an AMD EPYC 25/17, 2 threads).  Both give the same bits."""


def _fourier_float32(x: Tensor, omega: float, n: int | Tensor, max_n: int | None) -> Tensor | None:
    """The terms i <= n only: a term beyond n adds cos * 0, +-0 where its argument is finite, which leaves a partial
    sum unchanged unless it were -0, which none is (0 + t is +0 for t = -0, an exact cancellation rounds to +0),
    and NaN where the argument overflows (:func:`_fourier_last` checks the largest)."""
    if x.dtype != torch.float32 or not elementwise.covered(x) or x.numel() == 0 or x.numel() < FUSED_FROM:
        return None
    last = min(int(n), int(n) if max_n is None else max_n)
    if last < 0:
        return None
    coefficient = lambda i: np.float32((2 * i + 1) * omega)  # noqa: E731  (a float times x: float32 opmath)
    beyond = coefficient(max_n) if max_n is not None and max_n > last else np.float32(0.0)
    argument = omega * x  # the torch formula's (2 * 0 + 1) * omega * x
    total = torch.zeros_like(x) if last == 0 else torch.empty_like(x)  # one term: 0 + t in the last pass
    for i in range(last + 1):
        torch.cos(argument, out=argument)
        if i == last:
            return elementwise.apply(FOURIER_LAST, argument, x, total, params=(np.float32(4.0 * omega / math.pi), beyond), out=(total,), final=True)
        kernel, inputs = (FOURIER_FIRST, (argument, x)) if i == 0 else (FOURIER_STEP, (argument, x, total))
        elementwise.apply(kernel, *inputs, params=(coefficient(i + 1),), out=(total, argument))
    return None


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

    @schedule
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
