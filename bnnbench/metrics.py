"""Per-layer training diagnostics for every method (SPEC section 4).

For each binary layer, with latent weights ``w`` and the pre-sign tensor
``w_hat = layer.method.pre_sign(w, layer.progress, **layer.weight_tensors())`` (``sin(w0 w)`` for BiPer,
the standardised and clamped ``w`` for ReCU, ``w`` for the STE family):

``qe``
    Quantization error, Eq. 15 of the BiPer paper evaluated on the layer:
    ``mean((w_hat - gamma sign(w_hat))^2)`` with the optimal layer-wise scale
    ``gamma = mean|w_hat|`` (Eq. 18).  The model value is the mean over layers.
``qe_relative``
    ``qe / mean(w_hat^2)`` = ``1 - gamma^2 / mean(w_hat^2)``: the same error
    without the units of ``w_hat``, comparable across methods whose pre-sign
    tensors differ in scale (0 for a binary ``w_hat``, 1/2 for Laplace, 1 - 2/pi
    for Gaussian ``w_hat``).  The model value is the mean over layers.
``gamma``
    That optimal scale ``mean|w_hat|``.
``qe_l1_upstream``
    The form the official BiPer code logs: ``mean|w_hat - sign(w_hat)|`` per
    layer, **summed** over layers for the model (not averaged).  Upstream uses
    ``torch.sign`` (sign(0) = 0); here sign(0) = +1, which differs only at exact
    zeros of ``w_hat``.
``laplace_b``
    Maximum-likelihood scale of a zero-mean Laplace law fitted to the latent
    weights: ``mean|w|``.  The model value is the mean over layers; the upstream
    script sums it over layers (``laplace_b_sum_upstream`` in the summary).
``grad_norm``
    L2 norm of ``w.grad`` (NaN when the layer has no gradient); the model value
    is the global norm ``sqrt(sum of squares)`` over the layers that have one.
``dead_share``
    Share of binary weights whose surrogate gradient is exactly zero, i.e.
    rows of the Jacobian ``d w_b / d w`` that vanish (``w_b`` as the layer's
    current stage computes it, without the scale).  See :func:`dead_mask`.
``flip_rate``
    Share of binary weights whose sign changed since the last
    :meth:`FlipTracker.snapshot` (NaN when no tracker is given).

Model-level shares (``dead_share``, ``flip_rate``) are weighted by the number
of weights per layer.  Everything is computed without touching the model's
gradients or the global random number generators.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.autograd.functional import jvp

from .functional import sign
from .layers import binary_layers
from .method import Method

# ------------------------------------------------------------ tensor metrics


def optimal_scale(w_hat: Tensor) -> Tensor:
    """The QE-optimal layer-wise scale gamma = E|w_hat| (Eq. 18)."""
    return w_hat.abs().mean()


def quantization_error(w_hat: Tensor) -> Tensor:
    """Eq. 15: mean((w_hat - gamma sign(w_hat))^2) with gamma = mean|w_hat| (Eq. 18)."""
    return (w_hat - optimal_scale(w_hat) * sign(w_hat)).pow(2).mean()


def relative_quantization_error(w_hat: Tensor) -> Tensor:
    """Eq. 15 divided by mean(w_hat^2): a scale-free QE in [0, 1] (NaN for w_hat = 0)."""
    return quantization_error(w_hat) / w_hat.pow(2).mean()


def qe_l1_upstream(w_hat: Tensor) -> Tensor:
    """The official BiPer code's per-layer term mean|w_hat - sign(w_hat)| (no scale)."""
    return (w_hat - sign(w_hat)).abs().mean()


def laplace_scale(w: Tensor) -> Tensor:
    """Maximum-likelihood b of a zero-mean Laplace law: mean|w| (SPEC section 4)."""
    return w.abs().mean()


def grad_norm(param: Tensor) -> float:
    """L2 norm of ``param.grad`` over all its elements; NaN when there is no gradient."""
    if param.grad is None:
        return math.nan
    return float(torch.linalg.vector_norm(param.grad.detach()))


def sign_bits(w_hat: Tensor) -> Tensor:
    """Boolean tensor of the binary weights, True for +1 (sign(0) = +1 as in :func:`bnnbench.sign`)."""
    return w_hat.detach() >= 0


def flip_rate(before: Tensor, after: Tensor) -> float:
    """Share of elements whose sign bit differs between two :func:`sign_bits` snapshots."""
    if before.shape != after.shape:
        raise ValueError(f"sign snapshots differ in shape: {tuple(before.shape)} vs {tuple(after.shape)}")
    return float((before != after).float().mean())


def dead_mask(
    method: Method,
    w: Tensor,
    progress: float = 0.0,
    stage: int = 2,
    generator: torch.Generator | None = None,
    tensors: dict[str, Tensor] | None = None,
) -> Tensor:
    """True where the binary weight passes no gradient back: its surrogate derivative is exactly 0.

    The weight path is the one the layer's stage uses, without the scale:
    ``method.binarize_weight`` in stage 2 (``method.stage1_weight`` in stage 1
    or for a method without binary weights).  An element ``i`` is dead when row
    ``i`` of the Jacobian ``J = d w_b / d w`` is zero, found as an exact zero of
    one Jacobian-vector product ``J v`` with a Gaussian ``v`` (any nonzero row
    gives a nonzero entry with probability one).  The product is taken with
    autograd's double-backward trick, so it goes through the method's own
    surrogate (``surrogate_sign``) and any override of its hooks.

    For element-wise binarizers row ``i`` is the derivative of ``w_b[i]`` with
    respect to ``w[i]``, so this is the share of latent weights that get no
    gradient (e.g. ``|w| > 1`` for the clipped STE).  For ReCU it is the share of
    clamped weights; back-propagating ones instead would report none, because
    the per-channel standardisation still sends every weight a little gradient
    through the mean and the variance, and a constant ``v`` would report all of
    them, because standardisation is shift invariant.
    """
    w = w.detach()
    if stage == 2 and method.binary_weights:

        fixed = {name: t.detach() for name, t in (tensors or {}).items()}  # the layer's weight_params/state

        def forward(x: Tensor) -> Tensor:
            return method.binarize_weight(x, progress, **fixed)

    else:
        forward = method.stage1_weight
    v = torch.randn(w.shape, generator=generator, device=w.device, dtype=w.dtype)
    _, tangent = jvp(forward, (w,), (v,))
    return tangent == 0


# ------------------------------------------------------------- flip tracking


class FlipTracker:
    """Sign flips of every binary layer's weights between two moments (e.g. one epoch).

    ``tracker = FlipTracker(model)`` snapshots the signs of
    ``method.pre_sign(w, progress)`` now; after training an epoch,
    ``tracker.flip_rates()`` gives the share of weights per layer whose sign
    changed, and ``tracker.snapshot()`` starts the next epoch.  The snapshot
    holds one bool per weight (11 MB for ResNet-18) on the weights' device.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._signs: dict[str, Tensor] = {}
        self.snapshot()

    @staticmethod
    def _current(layer: nn.Module) -> Tensor:
        with torch.no_grad():
            return sign_bits(layer.method.pre_sign(layer.weight, layer.progress, **layer.weight_tensors()))

    def snapshot(self) -> None:
        """Remember the current signs of every binary layer."""
        self._signs = {name: self._current(layer) for name, layer in binary_layers(self.model)}

    def flip_rates(self) -> dict[str, float]:
        """Per layer, the share of binary weights whose sign changed since :meth:`snapshot`."""
        rates = {}
        for name, layer in binary_layers(self.model):
            if name not in self._signs:
                raise KeyError(f"binary layer {name!r} is not in the last snapshot; call FlipTracker.snapshot() after changing the model")
            rates[name] = flip_rate(self._signs[name], self._current(layer))
        return rates


# --------------------------------------------------------------- per layer


@dataclasses.dataclass(frozen=True)
class LayerDiagnostics:
    """The diagnostics of one binary layer (see the module docstring)."""

    layer: str
    numel: int
    qe: float
    qe_relative: float
    gamma: float
    qe_l1_upstream: float
    laplace_b: float
    grad_norm: float
    dead_share: float
    flip_rate: float

    METRICS: ClassVar[tuple[str, ...]] = (
        "qe",
        "qe_relative",
        "gamma",
        "qe_l1_upstream",
        "laplace_b",
        "grad_norm",
        "dead_share",
        "flip_rate",
    )


def _weighted_share(layers: list[LayerDiagnostics], metric: str) -> float:
    values = [(getattr(d, metric), d.numel) for d in layers if not math.isnan(getattr(d, metric))]
    if not values:
        return math.nan
    return sum(v * n for v, n in values) / sum(n for _, n in values)


@dataclasses.dataclass(frozen=True)
class ModelDiagnostics:
    """Diagnostics of every binary layer of a model, in module order."""

    layers: list[LayerDiagnostics]

    def rows(self) -> list[dict[str, Any]]:
        """Long format for pandas: one ``{"layer", "metric", "value"}`` per layer and metric."""
        return [{"layer": d.layer, "metric": m, "value": getattr(d, m)} for d in self.layers for m in LayerDiagnostics.METRICS]

    def summary(self) -> dict[str, float]:
        """Model-level values (means, sums and weighted shares as the module docstring states)."""
        if not self.layers:
            raise ValueError("the model has no binary layers (build it with bnnbench.build_model)")
        n = len(self.layers)
        grads = [d.grad_norm for d in self.layers if not math.isnan(d.grad_norm)]
        return {
            "n_layers": n,
            "n_weights": sum(d.numel for d in self.layers),
            "qe": sum(d.qe for d in self.layers) / n,
            "qe_relative": sum(d.qe_relative for d in self.layers) / n,
            "gamma": sum(d.gamma for d in self.layers) / n,
            "qe_l1_upstream": sum(d.qe_l1_upstream for d in self.layers),
            "laplace_b": sum(d.laplace_b for d in self.layers) / n,
            "laplace_b_sum_upstream": sum(d.laplace_b for d in self.layers),
            "grad_norm": math.sqrt(sum(g * g for g in grads)) if grads else math.nan,
            "dead_share": _weighted_share(self.layers, "dead_share"),
            "flip_rate": _weighted_share(self.layers, "flip_rate"),
        }


def model_diagnostics(model: nn.Module, flips: FlipTracker | None = None, seed: int = 0) -> ModelDiagnostics:
    """Diagnostics of every binary layer of ``model`` (built with :func:`bnnbench.build_model`).

    Call after ``loss.backward()`` for gradient norms, and with the epoch's
    :class:`FlipTracker` for flip rates.  ``seed`` seeds the private generator
    of the random tangent of :func:`dead_mask`; global RNG state is untouched.
    """
    rates = flips.flip_rates() if flips is not None else {}
    generators: dict[torch.device, torch.Generator] = {}
    layers = []
    for name, layer in binary_layers(model):
        w = layer.weight.detach()
        if w.device not in generators:
            generators[w.device] = torch.Generator(device=w.device).manual_seed(seed)
        with torch.no_grad():
            w_hat = layer.method.pre_sign(w, layer.progress, **layer.weight_tensors())
            qe, rel, gamma = quantization_error(w_hat), relative_quantization_error(w_hat), optimal_scale(w_hat)
            l1, b = qe_l1_upstream(w_hat), laplace_scale(w)
        dead = dead_mask(layer.method, w, layer.progress, layer.stage, generators[w.device], layer.weight_tensors())
        layers.append(
            LayerDiagnostics(
                layer=name,
                numel=w.numel(),
                qe=float(qe),
                qe_relative=float(rel),
                gamma=float(gamma),
                qe_l1_upstream=float(l1),
                laplace_b=float(b),
                grad_norm=grad_norm(layer.weight),
                dead_share=float(dead.float().mean()),
                flip_rate=rates.get(name, math.nan),
            )
        )
    return ModelDiagnostics(layers)


__all__ = [
    "FlipTracker",
    "LayerDiagnostics",
    "ModelDiagnostics",
    "dead_mask",
    "flip_rate",
    "grad_norm",
    "laplace_scale",
    "model_diagnostics",
    "optimal_scale",
    "qe_l1_upstream",
    "quantization_error",
    "relative_quantization_error",
    "sign_bits",
]
