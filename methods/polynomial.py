"""ApproxSign on both paths: sign forward, Bi-Real's piecewise-polynomial backward (Eq. 6-7) for weights and activations.

Forward:  x_b = sign(x)                          (sign(0) = +1)
Backward: d x_b / d x = max(0, 2 - 2|x|)
          (= 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere)

Applied to weights and activations alike, as the BiPer paper's Eq. 6-7 read on their own.
Bi-Real Net's official code uses ApproxSign on the activations only (its weights:
mean|w| sign(w) with the gradient of clamp(w, -1, 1)): that pair is the ``bireal``
method.  ApproxSign is also the default activation quantizer of every method that does
not define its own.

Paper: Liu et al., "Bi-Real Net: Enhancing the performance of 1-bit CNNs with
improved representational capability and advanced training algorithm",
ECCV 2018 / IJCV 2020.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from bnnbench.functional import approx_sign_derivative
from bnnbench.method import Method, Progress
from bnnbench.registry import register_method


@register_method("polynomial")
@dataclass
class Polynomial(Method):
    """Bi-Real ApproxSign on weights and activations."""

    paper = "Liu et al., Bi-Real Net, ECCV 2018: ApproxSign (Eq. 6-7 of BiPer) on weights and activations"
    weight_backward = "max(0, 2 - 2|w|)"

    def weight_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return approx_sign_derivative(x)
