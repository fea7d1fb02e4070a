"""XNOR-Net: sign weights scaled by the mean |W| of each output filter, clipped-STE activations.

Forward:  W_b = alpha_c sign(W),  alpha_c = ||W_c||_1 / n = mean|W_c|  (paper Sec. 3.1;
          n = C_in k_h k_w weights per filter, sign(0) = +1)
          a_b = sign(a)
Backward (paper, Sec. 3.1):
          d W_b / d W = 1/n + alpha_c 1{|W| <= 1}        (``weight_grad="paper"``, default)
          the upstream Torch7 code multiplies this by n (1 - 1/C_in)
          (``updateBinaryGradWeight`` in allenai/XNOR-Net)   (``weight_grad="upstream"``)
          d a_b / d a = 1{|a| <= 1}   (upstream ``BinActiveZ``; clipped STE)
The scale is a forward factor whose contribution to the backward is the 1/n
term above, not autograd's sign(W)/n sum over the filter.  Upstream zeroes the
gradients at |W| >= 1 and |a| >= 1; SPEC's clipped STE keeps |x| = 1: at exactly
|W| = 1 (or |a| = 1) the surrogate is 1 here and 0 upstream, a set of measure zero.

Not modelled: the activation scale K (the upstream code does not use it) and
the upstream training loop's in-place mean-centering and clamping of the latent
weights before every step.

Paper: Rastegari, Ordonez, Redmon & Farhadi, "XNOR-Net: ImageNet Classification
Using Binary Convolutional Neural Networks", ECCV 2016.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from bnnbench.functional import clip_derivative
from bnnbench.method import Method, Progress, mean_abs, per_output_dims
from bnnbench.registry import register_method

WEIGHT_GRADS = ("paper", "upstream")


@register_method("xnor")
@dataclass
class XNOR(Method):
    """alpha_c sign(W) with the paper's 1/n + alpha 1{|W|<=1} weight gradient."""

    weight_grad: str = "paper"

    paper = "Rastegari et al., XNOR-Net, ECCV 2016"
    weight_forward = "mean|W_c| sign(W) per output filter"
    weight_backward = "1/n + alpha_c 1{|W|<=1} (paper); x n(1 - 1/C_in) upstream"
    activation_backward = "1{|a| <= 1}"
    scale = "mean_abs_channel"
    scale_in_backward = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weight_grad not in WEIGHT_GRADS:
            raise ValueError(f"xnor: weight_grad must be one of {WEIGHT_GRADS}, got {self.weight_grad!r}")

    def weight_scale(self, w: Tensor) -> Tensor:
        return mean_abs(w, per_output_dims(w))

    def weight_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        n = x[0].numel()
        grad = clip_derivative(x) * mean_abs(x, per_output_dims(x)) + 1.0 / n
        if self.weight_grad == "upstream":
            grad = grad * (n * (1.0 - 1.0 / x.shape[1]))
        return grad

    activation_surrogate = staticmethod(clip_derivative)
