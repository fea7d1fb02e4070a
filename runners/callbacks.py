"""The per-epoch hook of a training run: :class:`EpochCallback` and what it reports.

The training loop calls ``on_epoch_start`` before an epoch's first step,
``on_after_backward`` after every backward pass and ``on_epoch_end`` after the
epoch's evaluation; the :class:`EpochReport` returned becomes extra
``metrics.csv`` columns and ``layers.csv`` rows.  Every run records the
diagnostics of :mod:`bnnbench.runners.diagnostics` unless given other callbacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class EpochReport:
    """What a callback adds at the end of an epoch: metrics.csv columns and layers.csv rows."""

    columns: dict[str, float] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)


class EpochCallback:
    """Per-epoch diagnostics (per-layer QE, grad norms, flip rate, ...); override what you need."""

    def on_epoch_start(self, stage: int, epoch: int, model: nn.Module) -> None:
        """Before the first step of an epoch (e.g. snapshot the binary weights)."""

    def on_after_backward(self, stage: int, epoch: int, step: int, model: nn.Module) -> None:
        """After each backward pass, before the optimiser step (gradients are populated)."""

    def on_epoch_end(self, stage: int, epoch: int, model: nn.Module) -> EpochReport:
        """After the epoch's evaluation; returned values are logged with the epoch."""
        return EpochReport()
