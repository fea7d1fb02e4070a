"""BiPer: binary periodic function (Vargas et al., CVPR 2024).

Forward:  stage 2: w_b = sign(sin(w0 w))          (Eq. 8, a square wave of period 2 pi / w0)
          stage 1: w_hat = sin(w0 w)               (Eq. 10, real weights)
Backward: d w_b / d w = w0 cos(w0 w)                (Eq. 9: the sine is the surrogate)
Scale:    a learned alpha per output channel multiplies the conv output.
Activations: sign forward, ApproxSign backward (Eq. 6-7) evaluated on the
          per-sample variance-normalised input in training (upstream).
Regulariser (upstream CIFAR scripts, absent from the paper's text):
          tau * mean(sin^2(w0 w)) per binary layer, tau = 0.037 in stage 1 and
          0.0468 in stage 2; set both to 0 for the paper-text variant.

``periodic=False`` replaces sin(w0 w) by w (sign and STE), the ablation of
Table 1 ("BiPer without the periodic function").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bnnbench.method import Method, Progress
from bnnbench.registry import register_method


@register_method("biper")
@dataclass
class BiPer(Method):
    """Square-wave binarization with its sine as the backward surrogate."""

    w0: float = 20.0
    reg_tau_stage1: float = 0.037
    reg_tau_stage2: float = 0.0468
    periodic: bool = True

    positive = ("w0",)

    paper = "Vargas et al., BiPer: Binary Neural Networks using a Periodic Function, CVPR 2024"
    weight_forward = "stage 2: sign(sin(w0 w)) (Eq. 8); stage 1: sin(w0 w) (Eq. 10)"
    weight_backward = "w0 cos(w0 w) (Eq. 9)"
    scale = "learned_alpha"
    default_act_norm = True

    def pre_sign(self, w: Tensor, progress: Progress) -> Tensor:
        return torch.sin(self.w0 * w) if self.periodic else w

    def stage1_weight(self, w: Tensor) -> Tensor:
        return self.pre_sign(w, 0.0)

    def regularizer(self, w: Tensor, stage: int) -> Tensor | None:
        tau = self.reg_tau_stage1 if stage == 1 else self.reg_tau_stage2
        if not self.periodic or tau == 0:
            return None
        return tau * torch.sin(self.w0 * w).pow(2).mean()
