"""Sign with the clipped straight-through estimator (Eq. 5 of the BiPer paper).

Forward:  w_b = sign(w),  a_b = sign(a)          (sign(0) = +1)
Backward: d w_b / d w = 1{|w| <= 1},  d a_b / d a = 1{|a| <= 1}

Paper: Hubara, Courbariaux, Soudry, El-Yaniv & Bengio, "Binarized Neural
Networks", NeurIPS 2016.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from bnnbench.functional import clip_derivative
from bnnbench.method import Method, Progress
from bnnbench.registry import register_method


@register_method("clip-ste")
@dataclass
class ClipSTE(Method):
    """sign(x) forward, 1{|x| <= 1} backward, on weights and activations."""

    paper = "Hubara et al., Binarized Neural Networks, NeurIPS 2016"
    weight_backward = "1{|w| <= 1}"
    activation_backward = "1{|a| <= 1}"

    def weight_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return clip_derivative(x)

    activation_surrogate = staticmethod(clip_derivative)
