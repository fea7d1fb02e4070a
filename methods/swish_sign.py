"""BNN+ SignSwish: sign forward, the derivative of SignSwish backward.

Forward:  x_b = sign(x)   (sign(0) = +1), on weights and activations
Backward: the derivative of SS_beta(x) = 2 sigmoid(beta x)[1 + beta x (1 - sigmoid(beta x))] - 1,
          d x_b / d x = beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x)),  beta = 5
          (it peaks at beta for x = 0 and turns negative for |x| > 2.4/beta)

Not modelled: BNN+'s weight regulariser and its trainable scales.  BNN+ has
no official code; the formulas follow the paper.

Paper: Darabi, Belbahri, Courbariaux & Nia, "BNN+: Improved Binary Network
Training", arXiv:1812.11800 (2018).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bnnbench.method import Method, Progress
from bnnbench.registry import register_method


def swish_sign_derivative(x: Tensor, beta: float) -> Tensor:
    """d SS_beta / dx = beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x))."""
    bx = beta * x
    return beta * (2.0 - bx * torch.tanh(bx / 2.0)) / (1.0 + torch.cosh(bx))


@register_method("swish-sign")
@dataclass
class SwishSign(Method):
    """Sign with the SignSwish surrogate on weights and activations."""

    beta: float = 5.0

    positive = ("beta",)

    paper = "Darabi et al., BNN+: Improved Binary Network Training, arXiv:1812.11800"
    weight_backward = "beta (2 - beta w tanh(beta w / 2)) / (1 + cosh(beta w)), beta = 5"
    activation_backward = "beta (2 - beta a tanh(beta a / 2)) / (1 + cosh(beta a))"

    def weight_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return swish_sign_derivative(x, self.beta)

    def activation_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return swish_sign_derivative(x, self.beta)
