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
from typing import Any

import numpy as np
import torch
from numba import njit
from torch import Tensor
from torch.autograd.function import once_differentiable

from bnnbench import elementwise, omp
from bnnbench.elementwise import _load, r
from bnnbench.functional import clip_derivative, fused_formulas, saved_as_recipe, sign, signs_of
from bnnbench.method import Method, Progress, as_progress
from bnnbench.registry import register_method


def distribution_loss(a: Tensor, eps: float = 1e-10) -> Tensor:
    """L1 + L2 of the official ``Distrloss_layer`` for one layer's input (N, C, ...), in float32 at least.

    The per-channel mean and mean square come from :func:`channel_moments`; the rest is the formula."""
    return loss_of_moments(*channel_moments(a), eps)


def loss_of_moments(mean: Tensor, mean_square: Tensor, eps: float = 1e-10) -> Tensor:
    """L1 + L2 from the per-channel mean and mean square about it (:func:`distribution_loss`)."""
    var = mean_square + eps
    std = var.abs().sqrt()
    l1 = (2 - mean.abs() - std).clamp(min=0).pow(2).mean() + (std - 4).clamp(min=0).pow(2).mean()  # min(2-mu-sd, 2+mu-sd)
    l2 = (mean.pow(2) - std.pow(2)).clamp(min=0).mean()
    return l1 + l2


def channel_moments(a: Tensor) -> tuple[Tensor, Tensor]:
    """(mu_c, mean_c((a_c - mu_c)^2)) over (N, H, W) in float32 at least: the formula's values and gradients,
    bit for bit, in fewer passes where the kernels cover a contiguous a (:class:`_ChannelMoments`), else by
    autograd through the formula (keeping a and the means, the float32 centred copy recomputed).  With the fused
    formulas of a's dtype (:func:`~bnnbench.functional.fused_formulas`: bfloat16's default, float32's opt-in) float32
    sweeps instead (:class:`_ChannelMomentsFused`: not bit for bit torch's, within float32's rounding of the exact
    values)."""
    detached = a.detach()
    if fuses(a):
        return _ChannelMomentsFused.apply(a)
    if a.dim() >= 2 and elementwise.covered(detached) and detached.is_contiguous() and a.numel() and not torch.compiler.is_compiling():
        return _ChannelMoments.apply(a, a)
    widen = a.dtype in (torch.float16, torch.bfloat16)
    x = a.float() if widen else a
    dims = (0, *range(2, x.dim()))
    mean = x.mean(dim=dims)
    per_channel = mean.view(1, -1, *([1] * (x.dim() - 2)))
    centered = x - per_channel
    # the square's backward reads the centred values: rebuilt then from a (which the layer keeps) and the mean
    with saved_as_recipe(centered, lambda a, m: (a.float() if widen else a) - m, a, per_channel):
        squared = centered**2
    return mean, squared.mean(dim=dims)


def _square(a: np.float32, mean: np.float32) -> np.float32:
    """``(x - mean) ** 2``: torch's square is a product."""
    c = r(a - mean)
    return r(c * c)


def _negated_centred_gradient(a: np.float32, mean: np.float32, share: np.float32) -> np.float32:
    """``-(grad * (2.0 * c.pow(1)))``, PowBackward's gradient of c = x - mean (negated: SubBackward's to the mean,
    which is summed), grad being the mean square's share ``g / M`` of each element."""
    c = r(a - mean)
    return -r(share * r(np.float32(2.0) * c))


def _input_gradient(negated: np.float32, share: np.float32) -> np.float32:
    """The centred value's gradient plus the mean's share ``g_mu / M`` (two terms: in either order)."""
    return r(-negated + share)


SQUARE = elementwise.Kernel("rad_square", _square)
NEGATED_CENTRED_GRADIENT = elementwise.Kernel("rad_negated_centred_gradient", _negated_centred_gradient)
INPUT_GRADIENT = elementwise.Kernel("rad_input_gradient", _input_gradient)


class _ChannelMoments(torch.autograd.Function):
    """:func:`channel_moments` in four passes forward (torch's float32 copy and its mean, the squares in one
    kernel pass, their mean) and three backward (the centred gradient, negated, in one pass; torch's sum of it to
    the channels; the input gradient in a's dtype in one pass), where autograd's graph through the formula
    makes the centred copy, its square, the square's backward, the negation, the broadcasts of each mean's
    gradient, their sum and the cast back, each a pass of its own.  The same torch operators' arithmetic in
    the same order: the means and the sum are torch's own, on tensors of the formula's values and layout.

    ``a`` comes in twice: a float32 a is the centred tensor's input itself, and its two gradient terms (the
    centred value's, the mean's share) go back separately, so that autograd adds them to a's other gradient (the
    binarizer's) in the order it did through the formula (floating-point addition is not associative); of a
    bfloat16 a, the formula's float32 copy took both, added, then cast: one term, one pass."""

    @staticmethod
    def forward(ctx, a: Tensor, a_again: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        dims = (0, *range(2, a.dim()))
        mean = (a.float() if a.dtype != torch.float32 else a).mean(dim=dims)
        squares = elementwise.apply(SQUARE, a, mode=torch.float32, channels=(mean,), dtypes=(torch.float32,))
        ctx.save_for_backward(a, mean)
        ctx.set_materialize_grads(False)  # an output no loss uses sends nothing back, as in autograd's graph
        return mean, squares.mean(dim=dims)

    @staticmethod
    @once_differentiable  # the kernels take no tracked tensor: a gradient of this gradient is refused, not wrong
    def backward(ctx, grad_mean: Tensor | None, grad_mean_square: Tensor | None):  # type: ignore[override]
        a, mean = ctx.saved_tensors
        count = a.numel() // a.shape[1]  # elements per channel: MeanBackward's divisor
        channels = (1, a.shape[1], *([1] * (a.dim() - 2)))
        negated = mean_share = None
        if grad_mean_square is not None:
            per_channel = (mean, grad_mean_square / count)
            negated = elementwise.apply(NEGATED_CENTRED_GRADIENT, a, mode=torch.float32, channels=per_channel, dtypes=(torch.float32,))
            through_centred = negated.sum_to_size(channels).view(-1)
            mean_share = (through_centred if grad_mean is None else grad_mean + through_centred) / count
        elif grad_mean is not None:
            mean_share = grad_mean / count
        spread = None if mean_share is None else mean_share.view(channels).expand_as(a)
        if a.dtype == torch.float32:  # a itself the centred tensor's input: its two terms go back as autograd's do
            return None if negated is None else negated.neg_(), spread
        if negated is None:
            return None if spread is None else spread.to(a.dtype), None
        return elementwise.apply(INPUT_GRADIENT, negated, mode=torch.float32, channels=(mean_share,), dtypes=(a.dtype,)), None


@njit(nogil=True, fastmath={"reassoc", "contract"}, cache=True)
def _moments_of_channels(x: np.ndarray, channels: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """(mean, mean square about it) of the channels ``channels`` of x, (N, C, L) bfloat16 bits, into out's rows:
    each sample's L elements summed in float32 vector lanes, the samples' sums added in float64; two sweeps."""  # (or float32)
    samples, _, length = x.shape
    count = samples * length
    for j in range(channels.size):
        c = channels[j]
        total = 0.0
        for n in range(samples):
            part = np.float32(0.0)
            for i in range(length):
                part += _load(x[n, c, i])
            total += part
        mean = np.float32(total / count)
        squares = 0.0
        for n in range(samples):
            part = np.float32(0.0)
            for i in range(length):
                d = _load(x[n, c, i]) - mean
                part += d * d
            squares += part
        out[j, 0], out[j, 1] = mean, np.float32(squares / count)


def _fused_input_gradient(a: np.float32, mean: np.float32, twice_share: np.float32, mean_share: np.float32) -> np.float32:
    """``2 (g_ms / M) (a - mu) + g_mu / M`` in float32, rounded once where stored."""
    return twice_share * (a - mean) + mean_share


FUSED_INPUT_GRADIENT = elementwise.Kernel("rad_fused_input_gradient", _fused_input_gradient)


class _ChannelMomentsFused(torch.autograd.Function):
    """:func:`channel_moments` of a contiguous bfloat16 or float32 a in float32 sweeps: forward two read-only sweeps per channel
    (:func:`_moments_of_channels`), no float32 copy of a; backward one pass, d/da_i = 2 (g_ms / M) (a_i - mu) +
    g_mu / M, rounded once to a's dtype.  The term the formula's graph adds through the mean of the centred values,
    -(2 g_ms / M) sum(a - mu) / M per channel, is zero in exact arithmetic and left out (torch's float32 value of it
    is rounding noise)."""

    @staticmethod
    def forward(ctx, a: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        mean, mean_square = _fused_moments(a)
        ctx.save_for_backward(a, mean)
        ctx.set_materialize_grads(False)
        return mean, mean_square

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mean: Tensor | None, grad_mean_square: Tensor | None):  # type: ignore[override]
        if grad_mean is None and grad_mean_square is None:
            return None
        a, mean = ctx.saved_tensors
        return _fused_moments_gradient(a, mean, grad_mean, grad_mean_square)


def _fused_moments_gradient(a: Tensor, mean: Tensor, grad_mean: Tensor | None, grad_mean_square: Tensor | None, grad_signs: Tensor | None = None) -> Tensor:
    """The gradient to a bfloat16 or float32 a of its channel moments, 2 (g_ms / M) (a - mu) + g_mu / M, and with ``grad_signs``
    the clipped STE's g 1{|a| <= 1} too, in one float32 pass rounded once (a missing moment's gradient is 0); torch's
    formula where the kernels do not take a and the gradients.  The mean's share alone is spread without the
    0 (a - mu) term (NaN where a is infinite)."""
    count = a.numel() // a.shape[1]
    channels = (1, -1, *([1] * (a.dim() - 2)))
    mean_share = torch.zeros_like(mean) if grad_mean is None else grad_mean.float() / count
    if grad_mean_square is None and grad_signs is None:
        return mean_share.view(channels).expand_as(a).to(a.dtype)
    twice_share = torch.zeros_like(mean) if grad_mean_square is None else 2.0 * grad_mean_square.float() / count
    per_channel = (mean, twice_share, mean_share)
    if grad_signs is None:
        fused = elementwise.apply(FUSED_INPUT_GRADIENT, a, mode=torch.float32, channels=per_channel, dtypes=(a.dtype,))
    else:
        if elementwise.channels_last(a) and elementwise.covered(grad_signs):  # (an NCHW gradient: copied to a's layout)
            grad_signs = elementwise.in_layout_of(grad_signs, a, grad_signs.dtype)
        fused = elementwise.apply(SIGN_AND_MOMENTS_GRADIENT, a, grad_signs, mode=torch.float32, channels=per_channel, dtypes=(a.dtype,))
    if fused is not None:
        return fused
    centred = twice_share.view(channels) * (a.float() - mean.view(channels)) + mean_share.view(channels)
    return (centred if grad_signs is None else grad_signs.float() * clip_derivative(a).float() + centred).to(a.dtype)


def _sign_and_moments_gradient(a: np.float32, g: np.float32, mean: np.float32, twice_share: np.float32, mean_share: np.float32) -> np.float32:
    """``g 1{|a| <= 1} + 2 (g_ms / M) (a - mu) + g_mu / M`` in float32, rounded once where stored."""
    passed = g if abs(a) <= np.float32(1.0) else g * np.float32(0.0)  # the clipped STE's product: NaN g stays NaN
    return passed + (twice_share * (a - mean) + mean_share)


SIGN_AND_MOMENTS_GRADIENT = elementwise.Kernel("rad_sign_and_moments_gradient", _sign_and_moments_gradient)
@njit(nogil=True, fastmath={"reassoc", "contract"}, cache=True)
def _sample_channel_sums(x: np.ndarray, mean: np.ndarray, centre: bool, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """Per channels_last sample (one row of x, bfloat16 bits or float32; an element's channel its index modulo the
    channels), each channel's float32 sum of its elements, or with ``centre`` of their squares about ``mean``."""
    channels = mean.size
    for n in range(x.shape[0]):
        xr, o = x[n], out[n]
        for c in range(channels):
            o[c] = np.float32(0.0)
        for p in range(xr.size // channels):
            for c in range(channels):
                v = _load(xr[p * channels + c])
                d = v - mean[c]
                o[c] += d * d if centre else v


def _fused_moments(a: Tensor) -> tuple[Tensor, Tensor]:
    """(mu_c, mean_c((a_c - mu_c)^2)) of a contiguous or channels_last bfloat16 or float32 a, (N, C, ...), from
    :func:`_moments_of_channels` (channels_last: :func:`_sample_channel_sums`, each sample's sums in float32, added
    across samples in float64, as there)."""
    channels, count = a.shape[1], a.numel() // a.shape[1]
    if elementwise.channels_last(a):
        rows, sums = elementwise.memory_rows(a, a.shape[0]), np.empty((a.shape[0], channels), dtype=np.float32)
        zeros = np.zeros(channels, dtype=np.float32)
        omp.run(_sample_channel_sums, a.shape[0], omp.Split(rows), zeros, False, omp.Split(sums), work=a.numel())
        mean = torch.from_numpy(sums).double().sum(dim=0).div_(count).float()
        omp.run(_sample_channel_sums, a.shape[0], omp.Split(rows), mean.numpy(), True, omp.Split(sums), work=a.numel())
        return mean, torch.from_numpy(sums).double().sum(dim=0).div_(count).float()
    bits = elementwise.stored(a, a.shape[0], channels, -1)
    out = np.empty((channels, 2), dtype=np.float32)
    omp.run(_moments_of_channels, channels, bits, omp.Split(np.arange(channels)), omp.Split(out), work=a.numel())
    moments = torch.from_numpy(out)
    return moments[:, 0].clone(), moments[:, 1].clone()


def fuses(a: Tensor) -> bool:
    """True where a's moments take the float32 sweeps: a contiguous or channels_last bfloat16 or float32 (N, C, ...) a
    the kernels cover, with the fused formulas of its dtype (:func:`~bnnbench.functional.fused_formulas`)."""
    detached = a.detach()
    return (
        a.dtype in (torch.bfloat16, torch.float32) and fused_formulas(a.dtype) and a.dim() >= 2 and a.numel() > 0
        and elementwise.covered(detached) and (detached.is_contiguous() or elementwise.channels_last(detached)) and not torch.compiler.is_compiling()
    )


class _SignAndMomentsFused(torch.autograd.Function):
    """RAD's binarizer and the moments of its input in one node, for an a with fused formulas (:func:`fuses`): forward
    sign(a) and :func:`_fused_moments`; backward the clipped STE's gradient and the moments' in one pass,
    g 1{|a| <= 1} + 2 (g_ms / M)(a - mu) + g_mu / M (:data:`SIGN_AND_MOMENTS_GRADIENT`), where the two nodes apart
    write two activation-sized gradients and autograd adds them: three passes.  The moments' gradient is
    :class:`_ChannelMomentsFused`'s, the sum rounded once to a's dtype."""

    @staticmethod
    def forward(ctx, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        mean, mean_square = _fused_moments(a)
        ctx.save_for_backward(a, mean)
        ctx.set_materialize_grads(False)
        return signs_of(sign(a), sign, a), mean, mean_square

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_signs: Tensor | None, grad_mean: Tensor | None, grad_mean_square: Tensor | None):  # type: ignore[override]
        a, mean = ctx.saved_tensors
        if grad_signs is None and grad_mean is None and grad_mean_square is None:
            return None
        grad_signs = torch.zeros_like(a) if grad_signs is None else grad_signs
        return _fused_moments_gradient(a, mean, grad_mean, grad_mean_square, grad_signs)


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
    takes_bf16_formulas = True  # the moments of a bfloat16 input: _ChannelMomentsFused unless formulas(bf16="torch")
    takes_fp32_formulas = True  # of a float32 input with formulas(fp32="fused")

    activation_surrogate = staticmethod(clip_derivative)

    def activation_loss(self, a: Tensor, stage: int, progress: Progress) -> Tensor | None:
        if self.loss_weight == 0:
            return None
        return self._weighted(distribution_loss(a), progress)

    def _weighted(self, loss: Tensor, progress: Progress) -> Tensor:
        """lambda * loss while p < active_until, 0 afterwards (a tensor either way: no host read of p)."""
        on = (as_progress(progress) < self.active_until).to(device=loss.device, dtype=loss.dtype)
        return self.loss_weight * on * loss

    def activation_with_loss(self, a: Tensor, stage: int, progress: Progress = 0.0, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        """An a with the fused formulas of its dtype: the binarizer and the loss's moments in one node
        (:class:`_SignAndMomentsFused`), whose backward is one pass; otherwise the two apart."""
        plain = self.activation_surrogate is clip_derivative and type(self).activation_derivative is Method.activation_derivative
        if kwargs or self.loss_weight == 0 or not plain or not (a.requires_grad and torch.is_grad_enabled()) or not fuses(a):
            return super().activation_with_loss(a, stage, progress, **kwargs)
        signs, mean, mean_square = _SignAndMomentsFused.apply(a)
        return signs, self._weighted(loss_of_moments(mean, mean_square), progress)

    def schedule(self, progress: Progress) -> dict[str, float]:
        return {"lambda": self.loss_weight * float(as_progress(progress) < self.active_until)}
