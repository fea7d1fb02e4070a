"""LQ-Net at 1 bit: a per-channel basis fitted by quantization-error minimisation (QEM).

LQ-Net quantizes the weights of output channel c as q = v_c^T e, e in {-1, +1}^K, with a
learned basis v_c.  At K = 1 bit:
    forward   w_b = v_c sign(w)                      (sign(0) = +1)
    backward  d w_b / d w = 1                        (straight through: "y = x"; the basis
                                                      is no gradient's: scale not in the backward)
QEM (the paper's quantization-error minimisation; the official ``QuantizedWeight`` at nbit = 1), after every training
forward (stage 2), per output channel with N weights b_i = sign(w_i):
    v_new = (sum_i b_i w_i + delta v) / (N + delta),   delta = 1e-4
    v     <- gamma v + (1 - gamma) v_new,              gamma = 0.9 (moving average)
i.e. v tracks mean|w_c|, the 1-bit least-squares basis.  Initial basis (official code):
    v0 = 0.6745 sqrt(2 / n),  n = kh kw C_out           (0.6745: the median of |N(0, 1)|)
No schedule, no extra loss term.  ``basis`` is a buffer of the layer (``weight_state``).

Activations: LQ-Net's activation quantizer is non-negative ({0, v} at 1 bit, after ReLU) and
bnnbench's binary layers carry +-1, so this method keeps the suite's default activation
quantizer (sign, ApproxSign backward).  The paper's number bnnbench compares (Table 2 of the
BiPer paper, ResNet-20 1W/32A) has real activations.

Fidelity: follows the official TensorFlow code (microsoft/LQ-Nets, ``learned_quantization.py``)
for delta, gamma, the initial basis and the update after each training step; at exactly
w = 0 the official code's code word is -1 (``x > threshold``), here +1.

Paper: Zhang, Yang, Ye & Hua, "LQ-Nets: Learned Quantization for Highly Accurate and Compact
Deep Neural Networks", ECCV 2018.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bnnbench.functional import sign
from bnnbench.method import Method, Progress, mean_abs, per_output_dims
from bnnbench.registry import register_method

NORM_PPF_0_75 = 0.6745


@register_method("lqnet")
@dataclass
class LQNet(Method):
    """v_c sign(w) with a QEM-fitted, moving-averaged per-channel basis; straight-through gradient."""

    momentum: float = 0.9
    delta: float = 1e-4

    paper = "Zhang et al., LQ-Nets, ECCV 2018 (1-bit weights)"
    weight_forward = "v_c sign(w), basis v_c fitted by QEM (moving average 0.9 of mean|w_c|)"
    weight_backward = "1 (straight through; the basis is not in the backward)"
    scale = "qem_basis"
    scale_in_backward = False

    def weight_state(self, w: Tensor) -> dict[str, Tensor]:
        n = w.shape[0] * (w[0, 0].numel() if w.dim() > 2 else 1)  # kh kw C_out (fan-out)
        v0 = NORM_PPF_0_75 * math.sqrt(2.0 / n)
        return {"basis": torch.full((w.shape[0], *([1] * (w.dim() - 1))), v0, dtype=w.dtype)}

    def pre_sign(self, w: Tensor, progress: Progress, **tensors: Tensor) -> Tensor:
        return w

    def weight_scale(self, w: Tensor, basis: Tensor | None = None, **tensors: Tensor) -> Tensor:
        """The layer's basis (mean|w_c|, QEM's fixed point, when called without it)."""
        return basis.to(w.dtype) if basis is not None else mean_abs(w, per_output_dims(w)).detach()

    def qem_basis(self, w: Tensor, basis: Tensor) -> Tensor:
        """One QEM solution at 1 bit: (sum b w + delta v) / (N + delta), b = sign(w), per output channel."""
        dims = per_output_dims(w)
        n = w[0].numel()
        return ((sign(w) * w).sum(dim=dims, keepdim=True) + self.delta * basis) / (n + self.delta)

    def update_state(self, w: Tensor, progress: Progress, stage: int, event: str, **tensors: Tensor) -> None:
        if event != "step" or stage != 2 or "basis" not in tensors:
            return
        basis = tensors["basis"]
        new = self.qem_basis(w.to(basis.dtype), basis)
        basis.mul_(self.momentum).add_((1.0 - self.momentum) * new)
