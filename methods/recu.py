"""ReCU: rectified clamp unit, reviving "dead" weights by clamping the tails.

Forward, per output channel c of the latent weights w:
    z  = w - mean_c(w)
    z1 = z / (sqrt(var_c(z) + eps) / (2 sqrt 2))       (var unbiased, eps = 1e-5)
    Q  = -mean|z1| * ln(2 - 2 tau)                      (mean over the whole layer, detached)
    w_b = sign(clamp(z1, -Q, Q)),  output scaled by a learned alpha per channel
Backward: identity through the sign; through the clamp (zero where clamped) and
    the standardisation by autograd.  Convention at exactly |z1| = Q: 1/2 here, because
    torch.clamp with tensor bounds splits the gradient between the input and the bound
    (Q stays a device tensor: no host synchronisation per forward); 0 upstream, whose
    ``.item()`` makes Q a Python float.  A set of measure zero.
Schedule: tau(p) = A e^p + B rising from tau_min = 0.85 to tau_max = 0.99,
    A = (tau_max - tau_min)/(e - 1), B = tau_min - A.
Activations: ApproxSign, evaluated on a per-sample variance-normalised input in
    training (upstream), see ``BinaryConv2d(act_norm=...)``.

Paper: Xu et al., "ReCU: Reviving the dead weights in binary neural networks",
ICCV 2021.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bnnbench.functional import per_output_variance
from bnnbench.method import Method, Progress, as_progress, per_output_dims, schedule, scheduled
from bnnbench.registry import register_method
from bnnbench.standardize import fuses as fuses_standardization
from bnnbench.standardize import standardized as fused_standardized


@register_method("recu")
@dataclass
class ReCU(Method):
    """Standardise, clamp at the tau-quantile, sign; learned alpha."""

    tau_min: float = 0.85
    tau_max: float = 0.99
    eps: float = 1e-5

    positive = ("tau_min", "tau_max", "eps")

    paper = "Xu et al., ReCU, ICCV 2021"
    weight_forward = "sign(clamp(z1, -Q, Q)), z1 = standardised w (x 2 sqrt 2), Q = -mean|z1| ln(2 - 2 tau)"
    weight_backward = "1 through sign; 0 where clamped; autograd through standardisation"
    scale = "learned_alpha"
    default_act_norm = True

    @schedule
    def tau(self, progress: Progress) -> Progress:
        """tau(p) = A e^p + B, tau(0) = tau_min, tau(1) = tau_max."""
        a = (self.tau_max - self.tau_min) / (math.e - 1.0)
        return scheduled(progress, a * torch.exp(as_progress(progress)) + (self.tau_min - a))

    def standardize(self, w: Tensor) -> Tensor:
        """z1 = 2 sqrt 2 z / sqrt(var(z) + eps), z = w - mean(w), per output channel: torch's formula, or one node in
        float64 under bfloat16 autocast with the fused formulas (:mod:`bnnbench.standardize`)."""
        if fuses_standardization(w):
            return fused_standardized(w, self.eps, 2.0 * math.sqrt(2.0))
        dims = per_output_dims(w)
        z = w - w.mean(dim=dims, keepdim=True)
        return z / (torch.sqrt(per_output_variance(z) + self.eps) / (2.0 * math.sqrt(2.0)))

    def threshold(self, z1: Tensor, progress: Progress) -> Tensor:
        """Q = -mean|z1| ln(2 - 2 tau), detached (a constant for the backward); ln(2 - 2 tau) is
        rounded to z1's dtype first, as a Python scalar would be."""
        return (-z1.abs().mean() * torch.log(2.0 - 2.0 * as_progress(self.tau(progress))).to(z1.dtype)).detach()

    def pre_sign(self, w: Tensor, progress: Progress) -> Tensor:
        z1 = self.standardize(w)
        q = self.threshold(z1, progress)
        return torch.clamp(z1, -q, q)

    def schedule(self, progress: Progress) -> dict[str, float]:
        return {"tau": float(self.tau(progress))}
