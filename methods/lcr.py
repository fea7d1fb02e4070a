"""LCR-BNN: Lipschitz continuity retained by matching retention matrices with a full-precision teacher.

The binarizer underneath is another method's, unchanged (its forward and backward, formulas
in its module): IR-Net's (``lcr-irnet``, the official ImageNet code, ``LCR/imagenet``) or
RBNN's (``lcr-rbnn``: the authors' README says the CIFAR code, not released, is built on RBNN).
LCR adds one loss term over the block features (:mod:`bnnbench.teacher`) of the binary network
(student, in the graph) and of a frozen full-precision network of the same backbone (teacher,
detached) that see the same batch.  For n block features f_0 .. f_{n-1} (shape N x C_i x H_i x
W_i; the student's multiplied by a learned scale gamma_i, initial value 1) and each consecutive
pair (i, i+1):

    A_i    = f_i average-pooled to H_{i+1} x W_{i+1} (when larger), as N x C_i x P,  P = H_{i+1} W_{i+1}
    B_i    = f_{i+1} as N x C_{i+1} x P
    RM_i   = A_i B_i^T / P                          (retention matrix, N x C_i x C_{i+1})
    K_i    = RM_i RM_i^T                            (N x C_i x C_i)
    lam_i  = sqrt(||K_i 1||_2)                      per sample (one power-iteration step from the
                                                    ones vector, the value upstream takes)
    L      = alpha / (N 10^4) sum_{i=0}^{n-2} mean_N (lam_i^student - lam_i^teacher)^2 / 2^(n-1-i)

Backward: autograd's through all of it, to the student's features (hence its weights) and to
gamma; nothing reaches the teacher.  ``alpha = 0`` trains the binarizer alone.  The recipe's
regulariser switch turns the term on or off (both stages of bnnbench's protocol when on).

Hyper-parameters: ``alpha`` 3.2 (``lcr-rbnn``: the README's CIFAR command) or 8 (``lcr-irnet``:
the README's ImageNet command and ``utils/options.py``); ``lcr-irnet`` takes the ImageNet code's
EDE range T_min = 1e-3, T_max = 10 (its ``--Tmin``/``--Tmax`` defaults); ``lcr-rbnn`` RBNN's
defaults.  ``teacher_bn``: ``"eval"`` (default, bnnbench's reading: a frozen teacher normalises
with its running statistics) or ``"batch"`` (the official code never puts its ``fp_net`` in
eval mode, so its BatchNorm normalises with each batch's statistics; here its running ones are
left unchanged).

Fidelity.  Follows the official code (``LCR/imagenet/LCR.py``, ``main.py``, ``models/resnet_ir.py``):
the pooling, the retention matrix and its division by P, K = RM RM^T, the single power-iteration
step and its unnormalised value, the 2^-(n-1-i) weights, ``alpha / batch / 10^4``, the learned
per-feature scale of the binary features (``scaleable_feature``'s gamma, decayed with every
parameter) and the features as the stage outputs after the non-linearity (``preReLU=False``).
bnnbench's choices, not upstream's: the teacher is a trained ``fp`` run of the *same* backbone,
data, recipe and seed (upstream ImageNet: torchvision's pretrained ResNet-18, a standard ResNet
with ReLU, while the binary net has Bi-Real's double skip; its ResNet-34 teacher is built with
``pretrained=False``); N is the batch the features have (upstream divides by the configured
batch size: they differ on a smaller last batch); the features come from the training forward
itself (upstream runs the binary net a second time for them: the same values and gradients in
training mode, but its BatchNorm running statistics move twice per step).  Not checked: the
paper's own equations and hyper-parameters (its text was not at hand: only its abstract), so
whether the paper's loss has gamma, the 10^4 and the pair weights is unknown; the CIFAR code,
so what ``lcr-rbnn`` does beyond the ImageNet code's loss on top of RBNN.

Paper: Shang, Xu, Duan, Zong, Nie & Yan, "Lipschitz Continuity Retained Binary Neural Network",
ECCV 2022; code github.com/42Shawn/LCR_BNN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bnnbench.errors import ConfigError
from bnnbench.method import Method, Progress
from bnnbench.registry import register_method

from .irnet import IRNet
from .rbnn import RBNN

TEACHER_BN = ("eval", "batch")
LOSS_DIVISOR = 1e4  # upstream main.py: alpha * loss / batch_size / 10000


def retention_matrix(first: Tensor, second: Tensor) -> Tensor:
    """RM = A B^T / P: ``first`` pooled to ``second``'s spatial size (when larger), N x C_1 x C_2."""
    if first.shape[2] > second.shape[2]:
        first = F.adaptive_avg_pool2d(first, second.shape[2:])
    a = first.flatten(2)
    b = second.flatten(2)
    return torch.bmm(a, b.transpose(1, 2)) / a.shape[2]


def top_eigenvalue(rm: Tensor) -> Tensor:
    """sqrt(||K 1||_2), K = RM RM^T, per sample (shape N): one power-iteration step from the ones vector."""
    k = torch.bmm(rm, rm.transpose(1, 2))
    return torch.linalg.vector_norm(k.sum(dim=2), dim=1).sqrt()


def lipschitz_loss(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """sum_i mean_N (lam_i^student - lam_i^teacher)^2 / 2^(n-1-i) over consecutive feature pairs (no alpha, no 1/(N 10^4))."""
    n = len(student)
    terms = []
    for i in range(n - 1):
        lam_s = top_eigenvalue(retention_matrix(student[i], student[i + 1]))
        lam_t = top_eigenvalue(retention_matrix(teacher[i], teacher[i + 1]))
        terms.append(F.mse_loss(lam_s, lam_t) / 2 ** (n - 1 - i))
    return torch.stack(terms).sum()


def _at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32 when it is in a narrower type (bf16 features under autocast), else as it is."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass
class LipschitzRetention(Method):
    """The LCR loss over block features against a full-precision teacher; the binarizer comes from the other base."""

    alpha: float = 3.2
    teacher_bn: str = "eval"

    teacher = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.alpha >= 0:
            raise ConfigError(f"method {self.name!r}: alpha={self.alpha!r} must be 0 or more (--hp alpha=...)")
        if self.teacher_bn not in TEACHER_BN:
            raise ConfigError(f"method {self.name!r}: teacher_bn must be one of {', '.join(TEACHER_BN)}, got {self.teacher_bn!r}")

    def feature_parameters(self, num_features: int) -> dict[str, Tensor]:
        return {"gamma": torch.ones(num_features)}

    def feature_loss(self, student: list[Tensor], teacher: list[Tensor], stage: int, progress: Progress, **params: Tensor) -> Tensor | None:
        if len(student) < 2 or self.alpha == 0:
            return None
        gamma = params["gamma"]
        scaled = [_at_least_float32(f) * gamma[i] for i, f in enumerate(student)]
        batch = student[0].shape[0]
        return self.alpha / (batch * LOSS_DIVISOR) * lipschitz_loss(scaled, [_at_least_float32(t) for t in teacher])

    def teacher_batch_statistics(self) -> bool:
        return self.teacher_bn == "batch"


@register_method("lcr-irnet")
@dataclass
class LCRIRNet(LipschitzRetention, IRNet):
    """IR-Net's binarizer (T_min = 1e-3 as the LCR ImageNet code) with the LCR loss (alpha = 8)."""

    t_min: float = 1e-3
    alpha: float = 8.0

    paper = "Shang et al., LCR-BNN, ECCV 2022 (over IR-Net, as its ImageNet code)"


@register_method("lcr-rbnn")
@dataclass
class LCRRBNN(LipschitzRetention, RBNN):
    """RBNN's binarizer with the LCR loss (alpha = 3.2, the README's CIFAR command)."""

    paper = "Shang et al., LCR-BNN, ECCV 2022 (over RBNN, as its CIFAR code per the README)"
