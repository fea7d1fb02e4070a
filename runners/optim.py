"""Optimiser and learning-rate schedule of one stage: SGD, weight-decay groups, warm-up + cosine.

The schedule follows the upstream BiPer scripts and is stepped once per epoch:
epochs ``e = 0 .. E-1`` of a stage with ``W`` warm-up epochs and base rate ``lr`` use

    lr_e = lr (e + 1) / W                                   for e < W   (linear warm-up)
    lr_e = lr/2 (1 + cos(pi (e - o) / (E - o))),  o = max(W - 1, 0)   otherwise

so the cosine starts at the full rate on the last warm-up epoch and never
reaches 0 within the stage (upstream: ``CosineAnnealingLR(T_max=E-4)`` after
five warm-up epochs; ``T_max=E`` without warm-up).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from bnnbench.layers import binary_layers
from .recipes import WD_GROUPS, Recipe, StageRecipe


@dataclass
class WarmupCosine:
    """Per-epoch multiplier of the base learning rate (see the module docstring).

    A dataclass rather than a closure so that ``LambdaLR.state_dict`` stores
    its fields (plain numbers) in the checkpoint.
    """

    epochs: int
    warmup_epochs: int = 0

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return (epoch + 1) / self.warmup_epochs
        offset = max(self.warmup_epochs - 1, 0)
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - offset) / (self.epochs - offset)))


def decayed_parameters(model: nn.Module, grouping: str) -> set[int]:
    """ids of the parameters that get weight decay under ``grouping`` (one of ``WD_GROUPS``)."""
    if grouping not in WD_GROUPS:
        raise ValueError(f"unknown weight-decay grouping {grouping!r}; valid: {', '.join(WD_GROUPS)}")
    if grouping == "all":
        return {id(p) for p in model.parameters()}
    if grouping == "weights_only":
        return {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    # conv_fc: the layers upstream names conv*/fc*: binary layers, the stem conv, the classifier
    binary = [layer for _, layer in binary_layers(model)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    owners = binary + convs[:1] + linears[-1:]
    return {id(p) for m in owners for p in m.parameters(recurse=False)}


def make_optimizer(model: nn.Module, stage: StageRecipe, recipe: Recipe) -> torch.optim.SGD:
    """SGD with momentum over two groups: decayed parameters and the rest (weight decay 0)."""
    decayed = decayed_parameters(model, recipe.wd_groups)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) in decayed], "weight_decay": stage.weight_decay},
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=stage.lr, momentum=recipe.momentum)


@dataclass
class Multipliers:
    """A per-epoch multiplier list (LambdaLR stores its fields in the checkpoint)."""

    values: list[float]

    def __call__(self, epoch: int) -> float:
        return self.values[min(epoch, len(self.values) - 1)]


def official_biper_stage2(epochs: int, warmup: bool) -> Multipliers:
    """The multipliers the official BiPer stage-2 loop uses for its epochs e = 1..E-1 (``main_stage2.py``):
    warm-up lr (e+1)/5 for e < 5, and torch's ``CosineAnnealingLR(T_max = E - 4 warm_up, eta_min=0,
    last_epoch=0)``, stepped after every epoch from epoch 4 on, whose recursive update runs from the
    rate the warm-up left.  Computed by running that scheduler on a dummy parameter."""
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [param], "initial_lr": 1.0}], lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about stepping the scheduler without optimizer.step()
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs - 4 * warmup, eta_min=0.0, last_epoch=0)
        values = []
        for epoch in range(1, epochs):
            if warmup and epoch < 5:
                optimizer.param_groups[0]["lr"] = (epoch + 1) / 5
            values.append(optimizer.param_groups[0]["lr"])
            if epoch >= 4 * warmup:
                scheduler.step()
    return Multipliers(values)


def make_scheduler(optimizer: torch.optim.Optimizer, stage: StageRecipe) -> torch.optim.lr_scheduler.LambdaLR:
    """The stage's per-epoch schedule (``StageRecipe.schedule``): bnnbench's warm-up + cosine or the official BiPer loop's."""
    if stage.schedule == "biper-official":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, official_biper_stage2(stage.epochs, stage.warmup_epochs > 0))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(stage.epochs, stage.warmup_epochs))
