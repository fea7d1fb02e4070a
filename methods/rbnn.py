"""RBNN: Rotated Binary Neural Network, a learned bi-rotation of the weights before the sign.

Weights, per binary layer with C_out filters of N = C_in kh kw weights, N = n1 n2 (n1 the
largest divisor of N not above sqrt N):
    w_std = per-filter standardised w (mean 0, unbiased std 1)        (upstream)
    X_i   = w_std of filter i as an n1 x n2 matrix
    W~_i  = R1^T X_i R2                                               (bi-rotation)
    w'    = w_std + |sin(theta_i)| (W~ - w_std)                       (adjustable rotated weight)
    w_b   = sign(w')                                                  (sign(0) = +1)
    output scaled by a learned alpha per output channel
R1 (n1 x n1) and R2 (n2 x n2) are orthogonal, shared by the filters of the layer and trained
by alternating minimisation of sum_i ||B_i - R1^T X_i R2||^2 (the paper's bilinear
optimisation), not by
gradient: at the start of every stage-2 epoch (``update_state(event="progress")``), 3 rounds of
    B  = sign(R1^T X R2)
    R1 = V1 U1^T,  U1 S1 V1^T = svd(sum_i B_i R2^T X_i^T)
    R2 = U2 V2^T,  U2 S2 V2^T = svd(sum_i X_i^T R1 B_i)
on the current (detached) w_std.  R1, R2 start as random orthogonal matrices; theta, one per
filter, starts at pi/2 (full rotation) and is learned.
Backward (the paper's training-aware sign approximation), on weights (through w', the
rotation and the standardisation, by autograd) and activations:
    weights      d sign(x)/dx = k max(0, sqrt(2) t - t^2 |x|)
    activations  d sign(x)/dx = max(0, sqrt(2) t_a - t_a^2 |x|),  t_a = max(t, 1)
    t(p) = 10^(log10 T_min + (log10 T_max - log10 T_min) p),  k = max(1/t, 1),
    T_min = 1e-2, T_max = 1e1 (upstream CIFAR defaults).
No extra loss term.  With act_norm and the fused formulas (bfloat16's default, ``--fp32-formulas fused``) the activation surrogate
is evaluated in act_norm's float32 sweep (:meth:`RBNN.activation_formula`), not by torch on a float32 copy.

``rotation_grad="paper"`` (default) differentiates w' with R1, R2 held fixed:
d w'/d w_std = (1 - |sin theta|) + |sin theta| R1 (.) R2^T.  The official code detaches the
rotated weights, so the latent weights receive only the (1 - |sin theta|) share, none at
theta = pi/2: ``rotation_grad="upstream"``.  Both give theta its gradient
sign(sin theta) cos(theta) sum (W~ - w_std) dL/dw'.

Fidelity (official code lmbxmu/RBNN, ``cifar/modules/binarized_modules.py`` and ``main.py``):
the standardisation, n1 x n2, the 3 rounds per epoch, theta's initial value and both surrogates
follow it.  Not modelled: upstream standardises the activations per sample before the sign
(mean and std over C, H, W), which moves the threshold; here the forward stays sign(a) and
``act_norm`` (on by default) evaluates the surrogate at a / std(a), as for ReCU.  alpha starts
uniform in [0, 1) like every learned_alpha method here (upstream: mean|w_c|); a BatchNorm
follows every binary conv.  R1, R2 start from torch's generator (upstream: scipy's
``ortho_group``).

Paper: Lin, Ji, Xu, Zhang, Wang, Wu, Huang & Lin, "Rotated Binary Neural Network", NeurIPS 2020
(its equation numbers are not quoted: the paper's text was not at hand to check them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bnnbench import elementwise
from bnnbench.elementwise import r
from bnnbench.functional import sign
from bnnbench.method import Method, Progress, as_progress, schedule, scheduled, standardized
from bnnbench.registry import register_method

ROTATION_GRADS = ("paper", "upstream")


def factor_pair(n: int) -> tuple[int, int]:
    """(n1, n2) with n1 n2 = n and n1 the largest divisor of n not above sqrt(n)."""
    for n1 in range(math.isqrt(n), 0, -1):
        if n % n1 == 0:
            return n1, n // n1
    return 1, n


def random_orthogonal(n: int, dtype: torch.dtype) -> Tensor:
    """A Haar-distributed n x n orthogonal matrix (QR of a Gaussian, signs fixed by diag(R))."""
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))).to(dtype)


def rbnn_derivative(x: Tensor, k: float | Tensor, t: float | Tensor) -> Tensor:
    """k max(0, sqrt(2) t - t^2 |x|): the torch formula, or bit for bit its value in one pass (:data:`RBNN_DERIVATIVE`)
    where the kernels cover x."""
    peak, slope = math.sqrt(2.0) * t, t * t
    fused = None
    if elementwise.covered(x):  # the scalars as torch uses them in ``slope * |x|``, ``peak - y``, ``k * y``
        opmath = [not isinstance(v, Tensor) for v in (k, slope)]
        params = (elementwise.operand(k, x.dtype, opmath[0]), elementwise.operand(peak, x.dtype, False), elementwise.operand(slope, x.dtype, opmath[1]))
        fused = elementwise.apply(RBNN_DERIVATIVE, x, params=params)
    return fused if fused is not None else k * (peak - slope * x.abs()).clamp(min=0)


def _rbnn_derivative(x: np.float32, k: np.float32, peak: np.float32, slope: np.float32) -> np.float32:
    v = r(peak - r(slope * abs(x)))
    return r(k * (np.float32(0.0) if v < np.float32(0.0) else v))


RBNN_DERIVATIVE = elementwise.Kernel("rbnn_derivative", _rbnn_derivative)


@register_method("rbnn")
@dataclass
class RBNN(Method):
    """Bi-rotated, standardised weights with a learned rotation share; training-aware sign surrogate."""

    t_min: float = 1e-2
    t_max: float = 10.0
    rounds: int = 3
    rotation_grad: str = "paper"

    paper = "Lin et al., Rotated Binary Neural Network (RBNN), NeurIPS 2020"
    weight_forward = "sign(w_std + |sin theta| (R1^T W_std R2 - w_std)), R1, R2 updated each epoch"
    weight_backward = "k max(0, sqrt2 t - t^2|x|) through rotation and standardisation; t = 10^(lg Tmin + (lg Tmax - lg Tmin) p), k = max(1/t, 1)"
    activation_backward = "max(0, sqrt2 t_a - t_a^2 |a|), t_a = max(t, 1)"
    scale = "learned_alpha"
    default_act_norm = True

    positive = ("t_min", "t_max")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rotation_grad not in ROTATION_GRADS:
            raise ValueError(f"rbnn: rotation_grad must be one of {ROTATION_GRADS}, got {self.rotation_grad!r}")

    # --------------------------------------------------------------- schedule
    @schedule
    def t(self, progress: Progress) -> Progress:
        lo, hi = math.log10(self.t_min), math.log10(self.t_max)
        return scheduled(progress, torch.pow(10.0, lo + (hi - lo) * as_progress(progress)))

    @schedule
    def k(self, progress: Progress) -> Progress:
        return scheduled(progress, torch.clamp(1.0 / as_progress(self.t(progress)), min=1.0))

    @schedule
    def t_activation(self, progress: Progress) -> Progress:
        return scheduled(progress, torch.clamp(as_progress(self.t(progress)), min=1.0))

    def schedule(self, progress: Progress) -> dict[str, float]:
        return {"t": float(self.t(progress)), "k": float(self.k(progress))}

    # --------------------------------------------------------------- tensors
    def weight_parameters(self, w: Tensor) -> dict[str, Tensor]:
        return {"theta": torch.full((w.shape[0], *([1] * (w.dim() - 1))), math.pi / 2, dtype=w.dtype)}

    def weight_state(self, w: Tensor) -> dict[str, Tensor]:
        n1, n2 = factor_pair(w[0].numel())
        return {"r1": random_orthogonal(n1, w.dtype), "r2": random_orthogonal(n2, w.dtype)}

    # ---------------------------------------------------------------- weights
    def rotate(self, w_std: Tensor, r1: Tensor, r2: Tensor) -> Tensor:
        """R1^T X_i R2 for every filter i, back in w's shape."""
        x = w_std.reshape(w_std.shape[0], r1.shape[0], r2.shape[0])
        return (r1.t().to(x.dtype) @ x @ r2.to(x.dtype)).reshape(w_std.shape)

    def pre_sign(self, w: Tensor, progress: Progress, **tensors: Tensor) -> Tensor:
        """w' = w_std + |sin theta| (R1^T W_std R2 - w_std); w_std without the rotation tensors."""
        w_std = standardized(w)
        if not {"r1", "r2", "theta"} <= set(tensors):
            return w_std
        rotated = self.rotate(w_std, tensors["r1"], tensors["r2"])
        if self.rotation_grad == "upstream":
            rotated = rotated.detach()
        return w_std + torch.abs(torch.sin(tensors["theta"].to(w.dtype))) * (rotated - w_std)

    def weight_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return rbnn_derivative(x, self.k(progress), self.t(progress))

    def activation_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return rbnn_derivative(x, 1.0, self.t_activation(progress))

    def activation_formula(self, progress: Progress):
        def parameters() -> tuple[float, float, float]:  # (k, peak, slope) of _rbnn_derivative
            t = float(self.t_activation(progress))
            return 1.0, math.sqrt(2.0) * t, t * t

        return _rbnn_derivative, parameters

    # ------------------------------------------------------------- rotations
    def rotation_rounds(self, w: Tensor, r1: Tensor, r2: Tensor) -> tuple[Tensor, Tensor]:
        """``rounds`` rounds of the alternating update of (R1, R2) on the standardised weights."""
        x = standardized(w.detach()).reshape(w.shape[0], r1.shape[0], r2.shape[0]).to(r1.dtype)
        for _ in range(self.rounds):
            b = sign(r1.t() @ x @ r2)
            u1, _, v1h = torch.linalg.svd((b @ r2.t() @ x.transpose(1, 2)).sum(dim=0))
            r1 = v1h.t() @ u1.t()
            u2, _, v2h = torch.linalg.svd((x.transpose(1, 2) @ r1 @ b).sum(dim=0))
            r2 = u2 @ v2h
        return r1, r2

    def update_state(self, w: Tensor, progress: Progress, stage: int, event: str, **tensors: Tensor) -> None:
        if event != "progress" or stage != 2 or not {"r1", "r2"} <= set(tensors):
            return
        r1, r2 = self.rotation_rounds(w, tensors["r1"], tensors["r2"])
        tensors["r1"].copy_(r1)
        tensors["r2"].copy_(r2)
