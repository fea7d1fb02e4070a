"""RAD: a BNN (sign, straight-through) trained with the activation-distribution loss.

Binarizer (the BinaryNet pair the official code builds on):
    weights      forward sign(w),  backward 1 (straight through)
    activations  forward sign(a),  backward 1{|a| <= 1}  (hardtanh then sign with the STE)
    sign(0) = +1; at exactly |a| = 1 the clipped STE passes 1 here (SPEC), 0 in torch's hardtanh.
Extra loss term (the paper's distribution loss against degeneration, saturation and gradient
mismatch, written as the official ``Distrloss_layer`` computes it; the paper's equation
numbers are not quoted, its text was not at hand), on every binary layer's real input
activations a, with the per-channel batch statistics over (N, H, W):
    mu_c = mean(a_c),  sigma_c = sqrt(mean((a_c - mu_c)^2) + 1e-10)
    L1 = mean_c (max(0, 2 - |mu_c| - sigma_c))^2 + mean_c (max(0, sigma_c - 4))^2
    L2 = mean_c max(0, mu_c^2 - sigma_c^2)
    loss = lambda * mean over layers of (L1 + L2)   while p < active_until, 0 afterwards
lambda = 2 and active_until = 60/65 (the loss is dropped for the last 5 of 65 epochs) are the
official ImageNet command's values (``--distrloss 2 --distr_epoch 60 --epochs 65``); the
mean over layers is ``loss_reduction = "mean"``.  The term is bnnbench's regulariser, so the
recipe's regulariser switch turns it on or off.

Fidelity: the statistics are of the binary layer's input.  In the official AlexNet they are
taken after BatchNorm, before the hardtanh; bnnbench's backbones hand a binary layer the
hardtanh's output, clamped to [-1, 1], so here the saturation term cannot fire (sigma <= 1)
and the loss acts through the unclamped values only.  Not modelled: BinaryNet's clamping of
the latent weights to [-1, 1] after each step (a training-loop operation).

Paper: Ding, Chin, Liu & Marculescu, "Regularizing Activation Distribution for Training
Binarized Deep Networks", CVPR 2019; official code: ruizhoud/DistributionLoss
(``models/distrloss_layer.py``, ``custom_main_binary_imagenet.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bnnbench.functional import clip_derivative, saved_as_recipe
from bnnbench.method import Method, Progress, as_progress
from bnnbench.registry import register_method


def distribution_loss(a: Tensor, eps: float = 1e-10) -> Tensor:
    """L1 + L2 of the official ``Distrloss_layer`` for one layer's input (N, C, ...), in float32 at least.

    The same autograd graph as the formula's, keeping for the backward only ``a`` and the per-channel means:
    the square's saved input, the float32 centred copy (twice a bfloat16 activation), is recomputed."""
    widen = a.dtype in (torch.float16, torch.bfloat16)
    x = a.float() if widen else a
    dims = (0, *range(2, x.dim()))
    mean = x.mean(dim=dims)
    per_channel = mean.view(1, -1, *([1] * (x.dim() - 2)))
    centered = x - per_channel
    # the square's backward reads the centred values: rebuilt then from a (which the layer keeps) and the mean
    with saved_as_recipe(centered, lambda a, m: (a.float() if widen else a) - m, a, per_channel):
        squared = centered**2
    var = squared.mean(dim=dims) + eps
    std = var.abs().sqrt()
    l1 = (2 - mean.abs() - std).clamp(min=0).pow(2).mean() + (std - 4).clamp(min=0).pow(2).mean()  # min(2-mu-sd, 2+mu-sd)
    l2 = (mean.pow(2) - std.pow(2)).clamp(min=0).mean()
    return l1 + l2


@register_method("rad")
@dataclass
class RAD(Method):
    """sign + STE with the activation-distribution loss on every binary layer's input."""

    loss_weight: float = 2.0
    active_until: float = 60.0 / 65.0

    paper = "Ding et al., Regularizing Activation Distribution for Training Binarized Deep Networks (RAD), CVPR 2019"
    weight_backward = "1"
    activation_backward = "1{|a| <= 1}; + lambda * distribution loss of a, mean over layers"
    loss_reduction = "mean"

    activation_surrogate = staticmethod(clip_derivative)

    def activation_loss(self, a: Tensor, stage: int, progress: Progress) -> Tensor | None:
        if self.loss_weight == 0:
            return None
        loss = distribution_loss(a)
        on = (as_progress(progress) < self.active_until).to(device=loss.device, dtype=loss.dtype)
        return self.loss_weight * on * loss

    def schedule(self, progress: Progress) -> dict[str, float]:
        return {"lambda": self.loss_weight * float(as_progress(progress) < self.active_until)}
