"""TensorBoard event files beside ``metrics.csv``: ``tensorboard --logdir results/runs``.

Per epoch (global step = epochs trained so far, both stages counted): every numeric
``metrics.csv`` column as a scalar (``train/``, ``test/``, ``diagnostics/``, ``schedule/``,
``time/``), every per-layer diagnostic as ``layers/<metric>/<layer>``, and a histogram of each
binary layer's latent weights (``latent_weights/<layer>``).  Written by rank 0, only where the
``tensorboard`` package is installed (``pip install tensorboard``); elsewhere :meth:`open`
returns a log that writes nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from bnnbench.layers import binary_layers

_GROUPS = (("train_", "train"), ("test_", "test"), ("schedule_", "schedule"), ("epoch_time", "time"), ("eval_time", "time"))
_SKIPPED = {"stage", "epoch", "epochs", "train_images"}


def available() -> bool:
    """True where the ``tensorboard`` package (which ``torch.utils.tensorboard`` writes with) is installed."""
    return importlib.util.find_spec("tensorboard") is not None


def scalar_tag(column: str) -> str:
    """``test_top1`` -> ``test/top1``, ``qe`` -> ``diagnostics/qe``, ``lr`` -> ``train/lr``."""
    if column in ("lr", "progress"):
        return f"train/{column}"
    for prefix, group in _GROUPS:
        if column.startswith(prefix):
            return f"{group}/{column.removeprefix(prefix) if group != 'time' else column}"
    return f"diagnostics/{column}"


class TensorBoardLog:
    """One run's event files (a no-op when disabled or where tensorboard is missing)."""

    def __init__(self, writer: Any | None) -> None:
        self.writer = writer

    @classmethod
    def open(cls, run_dir: Path, enabled: bool = True) -> TensorBoardLog:
        if not (enabled and available()):
            return cls(None)
        from torch.utils.tensorboard import SummaryWriter

        return cls(SummaryWriter(log_dir=str(run_dir), flush_secs=30))

    def epoch(self, step: int, row: Mapping[str, Any], layer_rows: Sequence[Mapping[str, Any]], model: nn.Module) -> None:
        """Log one finished epoch as global ``step`` (epochs of the run so far, so a resumed run goes on)."""
        if self.writer is None:
            return
        for column, value in row.items():
            if column not in _SKIPPED and isinstance(value, (int, float)):
                self.writer.add_scalar(scalar_tag(column), value, step)
        for layer in layer_rows:
            for metric, value in layer.items():
                if metric not in ("stage", "epoch", "layer", "numel") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"layers/{metric}/{layer['layer']}", value, step)
        for name, module in binary_layers(model):
            self.writer.add_histogram(f"latent_weights/{name}", module.weight.detach().float().cpu(), step)

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.writer is not None:
            self.writer.close()


__all__ = ["TensorBoardLog", "available", "scalar_tag"]
