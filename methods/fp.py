"""Full precision: no binarization (the FP rows of Tables 2-4).

Forward:  w, a (identity)
Backward: 1

Binary layers built with this method are plain convolutions, and the backbones
use ReLU instead of hardtanh (as the real-valued ResNets do).
"""

from __future__ import annotations

from dataclasses import dataclass

from bnnbench.method import Method
from bnnbench.registry import register_method


@register_method("fp")
@dataclass
class FullPrecision(Method):
    """Real weights and activations."""

    paper = "He et al., Deep Residual Learning, CVPR 2016 (full-precision reference)"
    weight_forward = "w"
    activation_forward = "a"
    activation_backward = "1"
    binary_weights = False
    binary_activations = False
