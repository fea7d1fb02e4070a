"""Bi-Real Net's binarizer pair as its official code trains it.

Weights:  w_b = alpha_c sign(w),  alpha_c = mean|w_c| per output channel (detached);
          backward: the gradient of clamp(w, -1, 1), i.e. 1{|w| < 1}, not multiplied by
          alpha (upstream ``HardBinaryConv``: ``alpha sign(w)`` forward, ``clamp(w, -1, 1)``'s
          gradient backward).  torch.clamp passes no gradient at exactly |w| = 1, and neither
          does this method (clip-STE and ReActNet here keep SPEC's 1{|w| <= 1}).
Activations: ApproxSign (Eq. 6-7): sign(a) forward, max(0, 2 - 2|a|) backward.
sign(0) = +1 throughout.

Bi-Real's ApproxSign is an *activation* estimator: the official code never applies it to the
weights.  bnnbench's ``polynomial`` method is ApproxSign on both paths (as the BiPer paper's
Eq. 6-7 read on their own); this method is the pair Bi-Real trains.

Not modelled: the real-valued shortcut of every binary conv (the backbones here have a
double skip already) and the two-step training of the paper's ImageNet recipe.

Paper: Liu, Wu, Luo, Yang, Liu & Cheng, "Bi-Real Net: Enhancing the Performance of 1-bit
CNNs with Improved Representational Capability and Advanced Training Algorithm", ECCV 2018;
upstream: liuzechun/Bi-Real-net ``pytorch_implementation/BiReal18_34/birealnet.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from bnnbench.method import Method, Progress, mean_abs, per_output_dims
from bnnbench.registry import register_method


@register_method("bireal")
@dataclass
class BiReal(Method):
    """mean|w_c| sign(w) with clamp(w, -1, 1)'s gradient; ApproxSign activations."""

    paper = "Liu et al., Bi-Real Net, ECCV 2018 (official code's weight and activation binarizers)"
    weight_forward = "mean|w_c| sign(w) (scale detached)"
    weight_backward = "1{|w| < 1}: the gradient of clamp(w, -1, 1) (scale not in the backward)"
    scale = "mean_abs_channel"
    scale_in_backward = False

    def weight_scale(self, w: Tensor) -> Tensor:
        return mean_abs(w, per_output_dims(w)).detach()

    def weight_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return (x.abs() < 1).to(x.dtype)
