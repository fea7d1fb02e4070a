"""Per-epoch diagnostics of every binary layer, for every method (SPEC section 4).

:class:`DiagnosticsCallback` is an :class:`~bnnbench.runners.train.EpochCallback`
that logs, at the end of each epoch, the values of
:func:`bnnbench.metrics.model_diagnostics` (see that module for the exact
definitions):

========================  ==============================================================
``qe``                    Eq. 15 with the optimal gamma = mean|w_hat| (Eq. 18); model: mean over layers
``qe_relative``           ``qe / mean(w_hat^2)``; model: mean over layers
``gamma``                 the optimal scale mean|w_hat|; model: mean over layers
``qe_l1_upstream``        the official BiPer code's L1 form mean|w_hat - sign(w_hat)|; model: **sum** over layers
``laplace_b``             MLE Laplace scale mean|w| of the latent weights; model: mean over layers
``laplace_b_sum_upstream``  model only: the sum over layers, as the upstream script logs it
``grad_norm_last``        L2 norm of the weight gradient of the epoch's last step; model: global norm
``grad_norm_mean``        mean over the epoch's steps of that norm; model: mean of the global norm
``dead_share``            share of binary weights with zero surrogate gradient; model: weighted by size
``flip_rate``             share of binary weights whose sign changed during the epoch; model: weighted
========================  ==============================================================

Model-level values become ``metrics.csv`` columns; per-layer values become
``layers.csv`` rows (one per layer and epoch, with ``layer`` and ``numel``).

Cost: one bool per weight for the sign snapshot, one norm per binary layer per
step (no device synchronisation: the norms are summed on the device), and at
the end of the epoch one pass of the method's pre-sign function and one
Jacobian-vector product per layer.  Nothing touches the gradients, the weights
or the global random number generators, so a run's numbers are the same with
or without the callback.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from bnnbench.layers import binary_layers
from bnnbench.metrics import FlipTracker, LayerDiagnostics, model_diagnostics

from .callbacks import EpochCallback, EpochReport

MODEL_COLUMNS = (
    "qe",
    "qe_relative",
    "gamma",
    "qe_l1_upstream",
    "laplace_b",
    "laplace_b_sum_upstream",
    "grad_norm_last",
    "grad_norm_mean",
    "dead_share",
    "flip_rate",
)
"""The ``metrics.csv`` columns the callback adds (model-level values)."""

LAYER_COLUMNS = ("layer", "numel") + tuple("grad_norm_last" if m == "grad_norm" else m for m in LayerDiagnostics.METRICS) + ("grad_norm_mean",)
"""The ``layers.csv`` columns the callback fills, besides ``stage`` and ``epoch``."""


class GradNormAccumulator:
    """Sums, over the steps of an epoch, each binary layer's weight-gradient L2 norm and the global norm."""

    def __init__(self) -> None:
        self.layer_sums: Tensor | None = None
        self.global_sum: Tensor | None = None
        self.steps = 0

    def add(self, model: nn.Module) -> None:
        norms = []
        for _, layer in binary_layers(model):
            grad = layer.weight.grad
            norms.append(torch.linalg.vector_norm(grad.detach()).float() if grad is not None else layer.weight.new_tensor(math.nan, dtype=torch.float32))
        if not norms:
            return
        stacked = torch.stack(norms)
        total = torch.linalg.vector_norm(stacked.nan_to_num(0.0))
        if self.layer_sums is None:
            self.layer_sums, self.global_sum = stacked, total
        else:
            self.layer_sums, self.global_sum = self.layer_sums + stacked, self.global_sum + total
        self.steps += 1

    def means(self) -> tuple[list[float], float]:
        """Per-layer mean norms (module order) and the mean global norm; NaN when no step was seen."""
        if self.layer_sums is None or self.global_sum is None:
            return [], math.nan
        return (self.layer_sums / self.steps).tolist(), float(self.global_sum) / self.steps


class DiagnosticsCallback(EpochCallback):
    """Logs :mod:`bnnbench.metrics` diagnostics per epoch: ``metrics.csv`` columns and ``layers.csv`` rows."""

    def __init__(self) -> None:
        self.flips: FlipTracker | None = None
        self.grads = GradNormAccumulator()

    def on_epoch_start(self, stage: int, epoch: int, model: nn.Module) -> None:
        self.flips = FlipTracker(model)  # signs at the epoch's progress, after set_stage/set_progress
        self.grads = GradNormAccumulator()

    def on_after_backward(self, stage: int, epoch: int, step: int, model: nn.Module) -> None:
        self.grads.add(model)

    def on_epoch_end(self, stage: int, epoch: int, model: nn.Module) -> EpochReport:
        # The last step's gradients are still on the weights: the loop clears them before each backward.
        diagnostics = model_diagnostics(model, flips=self.flips, seed=1000 * stage + epoch)
        if not diagnostics.layers:
            return EpochReport()
        layer_means, global_mean = self.grads.means()
        if len(layer_means) != len(diagnostics.layers):
            layer_means = [math.nan] * len(diagnostics.layers)
        summary = diagnostics.summary()
        columns = {name: summary[name] for name in MODEL_COLUMNS if name in summary}
        columns["grad_norm_last"] = summary["grad_norm"]
        columns["grad_norm_mean"] = global_mean
        layers = [_layer_row(d, mean) for d, mean in zip(diagnostics.layers, layer_means)]
        return EpochReport(columns={name: columns[name] for name in MODEL_COLUMNS}, layers=layers)


def _layer_row(diag: LayerDiagnostics, grad_norm_mean: float) -> dict[str, Any]:
    row = dataclasses.asdict(diag)
    row["grad_norm_last"] = row.pop("grad_norm")
    row["grad_norm_mean"] = grad_norm_mean
    return {name: row[name] for name in LAYER_COLUMNS}


def default_callbacks() -> list[EpochCallback]:
    """The callbacks every bnnbench run records with: the per-layer diagnostics."""
    return [DiagnosticsCallback()]


__all__ = ["LAYER_COLUMNS", "MODEL_COLUMNS", "DiagnosticsCallback", "GradNormAccumulator", "default_callbacks"]
