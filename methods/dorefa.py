"""DoReFa-Net with 1-bit weights: the layer's mean |w| times sign(w), identity gradient.

Forward:  w_b = E sign(w),  E = mean|w| over the whole layer (a detached scalar;
          sign(0) = +1, as the upstream ``tf.where(x == 0, 1, sign(x))``)
Backward: d w_b / d w = 1   (the gradient passes straight through the scaled sign)
Activations: DoReFa's own 1-bit activation quantizer is round(clip(a, 0, 1)),
          i.e. {0, 1}; bnnbench's binary layers use +-1, so this method keeps
          the suite's default activation quantizer (sign forward, Bi-Real
          ApproxSign backward max(0, 2 - 2|a|)).

Paper: Zhou, Wu, Ni, Zhou, Wen & Zou, "DoReFa-Net: Training Low Bitwidth
Convolutional Neural Networks with Low Bitwidth Gradients", arXiv:1606.06160
(2016), Sec. 2.3; upstream: tensorpack ``examples/DoReFa-Net/dorefa.py`` (``fw``
for bitW = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from bnnbench.method import Method, mean_abs
from bnnbench.registry import register_method


@register_method("dorefa")
@dataclass
class DoReFa(Method):
    """E sign(w) with a layer-wise detached E and a straight-through gradient of 1."""

    paper = "Zhou et al., DoReFa-Net, arXiv:1606.06160 (1-bit weights)"
    weight_forward = "mean|w|_layer sign(w)"
    weight_backward = "1 (straight through the scaled sign)"
    scale = "mean_abs_layer"
    scale_in_backward = False

    def weight_scale(self, w: Tensor) -> Tensor:
        return mean_abs(w, tuple(range(w.dim()))).detach()
