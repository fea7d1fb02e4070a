"""IR-Net: Libra Parameter Binarization forward, Error Decay Estimator backward.

Forward (Libra-PB, paper Sec. 3.1), per output channel c of the latent weights w:
    w_std = (w - mean_c(w)) / std_c(w - mean_c(w))      (std unbiased, no eps, as upstream)
    s_c   = 2^round(log2(mean|w_std|_c))                 (detached power-of-two scale)
    w_b   = s_c sign(w_std),   a_b = sign(a)              (sign(0) = +1)
Backward (EDE, paper Sec. 3.2), on weights (through the standardisation, by
autograd, times s_c) and activations alike:
    d sign(x) / dx = k t (1 - tanh^2(t x))
    t(p) = 10^(log10 T_min + (log10 T_max - log10 T_min) p),   k = max(1/t, 1)
T_min = 1e-1, T_max = 1e1 are the paper's values (Sec. 4.1); the upstream
CIFAR ResNet-20 trainer (htqin/IR-Net ``trainer.py``) starts at T_min = 1e-3:
pass ``t_min=1e-3`` for that variant.

Paper: Qin, Gong, Liu, Bai, Song, Yu & Wang, "Forward and Backward Information
Retention for Accurate Binary Neural Networks", CVPR 2020.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bnnbench import elementwise
from bnnbench.elementwise import exp_float32, r
from bnnbench.functional import fused_formulas
from bnnbench.method import Method, Progress, as_progress, per_output_dims, schedule, scheduled, standardized
from bnnbench.registry import register_method


def ede_derivative(x: Tensor, k: float | Tensor, t: float | Tensor) -> Tensor:
    """Error Decay Estimator: d/dx [k tanh(t x)] = k t (1 - tanh^2(t x)).

    The torch formula, or bit for bit its value in fewer passes where the kernels cover x: bfloat16 by lookup
    (:func:`bnnbench.elementwise.tabulated`), float32 as ``t x``, torch's tanh in place, :data:`EDE_TAIL` in place.
    Float32 with the fused fp32 formulas: one pass from one exponential (:data:`EDE_FROM_EXP`, not bit for bit)."""
    fused = elementwise.tabulated(_ede, x, k, t) if x.dtype == torch.bfloat16 else _ede_float32(x, k, t)
    return fused if fused is not None else _ede(x, k, t)


def _ede(x: Tensor, k: float | Tensor, t: float | Tensor) -> Tensor:
    return k * t * (1.0 - torch.tanh(t * x).pow(2))


def _ede_tail(th: np.float32, kt: np.float32) -> np.float32:
    """k t (1 - th^2) after torch's tanh: ``pow(2)`` is th * th, ``1.0 - y`` and ``kt * y`` one rounding each."""
    return r(kt * r(np.float32(1.0) - r(th * th)))


EDE_TAIL = elementwise.Kernel("ede_tail", _ede_tail)


def _ede_from_exp(x: np.float32, kt: np.float32, t: np.float32) -> np.float32:
    """k t sech^2(t x) = k t 4 e / (1 + e)^2 with e = exp(-2 |t x|): 1 - tanh^2 without its cancellation where tanh
    nears 1 (more exact there than the formula's float32 value), kt at 0, NaN at NaN (0 far out and at infinity,
    where the formula's 1 - 1 is 0 too)."""
    e = exp_float32(np.float32(-2.0) * abs(t * x))
    wider = np.float32(1.0) + e
    return kt * (np.float32(4.0) * e / (wider * wider))


EDE_FROM_EXP = elementwise.Kernel("ede_from_exp", _ede_from_exp)
"""The fused fp32 formulas' EDE (:func:`_ede_from_exp`)."""


def _ede_float32(x: Tensor, k: float | Tensor, t: float | Tensor) -> Tensor | None:
    if x.dtype != torch.float32 or not elementwise.covered(x):
        return None
    if fused_formulas(torch.float32):
        return elementwise.apply(EDE_FROM_EXP, x, params=(np.float32(float(k * t)), np.float32(float(t))), final=True)
    u = torch.tanh_(t * x)
    return elementwise.apply(EDE_TAIL, u, params=(np.float32(float(k * t)),), out=(u,), final=True)


@register_method("irnet")
@dataclass
class IRNet(Method):
    """Standardised weights, power-of-two scale, tanh-shaped EDE surrogate."""

    t_min: float = 0.1
    t_max: float = 10.0

    positive = ("t_min", "t_max")

    paper = "Qin et al., IR-Net, CVPR 2020"
    weight_forward = "2^round(log2 mean|w_std|_c) sign(w_std), w_std = per-channel standardised w"
    weight_backward = "k t (1 - tanh^2(t w_std)) through the standardisation; t = 10^(lg Tmin + (lg Tmax - lg Tmin) p), k = max(1/t, 1)"
    activation_backward = "k t (1 - tanh^2(t a)) (EDE)"
    scale = "power_of_two"
    takes_bf16_formulas = True  # the standardisation under bfloat16 autocast: bnnbench.standardize unless formulas(bf16="torch")
    takes_fp32_formulas = True  # the EDE from one exponential with formulas(fp32="fused")

    @schedule
    def t(self, progress: Progress) -> Progress:
        """t(p) = 10^(log10 T_min + (log10 T_max - log10 T_min) p)."""
        lo, hi = math.log10(self.t_min), math.log10(self.t_max)
        return scheduled(progress, torch.pow(10.0, lo + (hi - lo) * as_progress(progress)))

    @schedule
    def k(self, progress: Progress) -> Progress:
        """k(p) = max(1/t(p), 1)."""
        return scheduled(progress, torch.clamp(1.0 / as_progress(self.t(progress)), min=1.0))

    def pre_sign(self, w: Tensor, progress: Progress) -> Tensor:
        return standardized(w)

    def weight_scale(self, w: Tensor) -> Tensor:
        mean_abs_std = standardized(w.detach()).abs().mean(dim=per_output_dims(w), keepdim=True)
        return torch.pow(2.0, torch.round(torch.log2(mean_abs_std))).detach()

    def weight_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return ede_derivative(x, self.k(progress), self.t(progress))

    def activation_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return ede_derivative(x, self.k(progress), self.t(progress))

    def schedule(self, progress: Progress) -> dict[str, float]:
        return {"t": float(self.t(progress)), "k": float(self.k(progress))}
