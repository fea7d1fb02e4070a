"""ReActNet: RSign (a learned per-channel threshold) on Bi-Real-style binarization.

Activations (RSign, paper Eq. 3): a_b = sign(a + beta_c), beta a learnable
          tensor per input channel (shape C_in x 1 x 1, initialised to 0);
          backward Bi-Real ApproxSign max(0, 2 - 2|a + beta_c|), to a and to beta.
Weights:  w_b = alpha_c sign(w), alpha_c = mean|w_c| per output channel (detached);
          backward 1{|w| <= 1}, not multiplied by alpha (upstream ``HardBinaryConv``
          takes the gradient of clamp(w, -1, 1)).  Convention at exactly |w| = 1: 1 here
          (SPEC's clipped STE), 0 upstream (torch.clamp passes no gradient at its bounds);
          a set of measure zero.  ``bireal`` follows torch.clamp there.
sign(0) = +1 throughout.

Not modelled: RPReLU (a learned shift, PReLU and shift after each block's
residual add) needs a change of the backbones' non-linearity, which lies
outside the binarizer interface; the backbones keep their hardtanh.

Paper: Liu, Shen, Savvides & Cheng, "ReActNet: Towards Precise Binary Neural
Network with Generalized Activation Functions", ECCV 2020; upstream:
liuzechun/ReActNet ``resnet/2_step2/birealnet.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bnnbench.functional import approx_sign_derivative, clip_derivative, surrogate_sign
from bnnbench.method import Method, Progress, mean_abs, per_output_dims
from bnnbench.registry import register_method


@register_method("reactnet")
@dataclass
class ReActNet(Method):
    """RSign activations with a learned per-channel threshold; scaled sign weights."""

    signs_its_input = False  # sign(a + beta): the hardtanh before has no signs to hand over
    takes_bf16_formulas = True  # beta's gradient summed in the surrogate's pass unless formulas(bf16="torch")
    takes_fp32_formulas = True  # likewise with formulas(fp32="fused")

    paper = "Liu et al., ReActNet, ECCV 2020"
    weight_forward = "mean|w_c| sign(w) (scale detached)"
    weight_backward = "1{|w| <= 1} (scale not in the backward)"
    activation_forward = "sign(a + beta_c), beta learned per input channel (RSign)"
    activation_backward = "max(0, 2 - 2|a + beta_c|)"
    scale = "mean_abs_channel"
    scale_in_backward = False

    def weight_scale(self, w: Tensor) -> Tensor:
        return mean_abs(w, per_output_dims(w)).detach()

    def weight_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return clip_derivative(x)

    def activation_parameters(self, in_channels: int, spatial_dims: int) -> dict[str, Tensor]:
        return {"beta": torch.zeros(in_channels, *([1] * spatial_dims))}

    def activation(self, a: Tensor, progress: Progress = 0.0, beta: Tensor | None = None) -> Tensor:
        """sign(a + beta) with ApproxSign backward; ``beta=None`` means a zero threshold."""
        return surrogate_sign(a, approx_sign_derivative, shift=beta)
