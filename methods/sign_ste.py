"""Sign with the plain straight-through estimator (Eq. 4 of the BiPer paper).

Forward:  w_b = sign(w),  a_b = sign(a)          (sign(0) = +1)
Backward: d w_b / d w = 1,  d a_b / d a = 1

Paper: Bengio, Leonard & Courville, "Estimating or propagating gradients through
stochastic neurons", arXiv:1308.3432 (2013); used by BinaryConnect (NeurIPS 2015).
"""

from __future__ import annotations

from dataclasses import dataclass

from bnnbench.functional import identity_derivative
from bnnbench.method import Method
from bnnbench.registry import register_method


@register_method("sign-ste")
@dataclass
class SignSTE(Method):
    """sign(x) forward, identity backward, on weights and activations."""

    paper = "Bengio et al. 2013 (STE); Courbariaux et al., BinaryConnect, NeurIPS 2015"
    activation_backward = "1"

    activation_surrogate = staticmethod(identity_derivative)
