"""Tiny training runs for the tests: a RunSpec and a Machine made from one call."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bnnbench.runners.recipes import Recipe, get_recipe
from bnnbench.runners.spec import Machine, RunSpec

MACHINE_FIELDS = {f.name for f in dataclasses.fields(Machine)}


@dataclass
class TinyRun:
    """A test run: its spec and machine, with the (mutable) recipe and the results root at hand."""

    spec: RunSpec
    machine: Machine

    @property
    def recipe(self) -> Recipe:
        return self.spec.recipe

    @property
    def out(self) -> str:
        return self.machine.out

    def __iter__(self) -> Iterator[Any]:
        """``run_training(*tiny, ...)``: the spec, then the machine."""
        return iter((self.spec, self.machine))

    def run_dir(self) -> Path:
        """The one run directory under ``out``."""
        (path,) = (Path(self.out) / "runs").iterdir()
        return path


def tiny_recipe(train: int = 48, test: int = 30, batch: int = 16, epochs: tuple[int, int] = (1, 1)) -> Recipe:
    """The ``quick`` recipe cut to ``train`` / ``test`` images, batches of ``batch`` and ``epochs`` per stage."""
    recipe = get_recipe("quick")
    recipe.train_subset, recipe.test_subset, recipe.batch_size = train, test, batch
    recipe.stage1.epochs, recipe.stage2.epochs = epochs
    return recipe


def tiny_run(recipe: Recipe, out: str | Path, *, data: str = "digits", **changes: Any) -> TinyRun:
    """A run of ``recipe`` on ``data`` (resnet20 + biper unless ``changes`` say otherwise); Machine
    fields among ``changes`` (amp, device, name, ...) go to the machine, the rest to the spec."""
    machine = Machine(out=str(out), **{k: v for k, v in changes.items() if k in MACHINE_FIELDS})
    model = {"net": "resnet20", "method": "biper", **{k: v for k, v in changes.items() if k not in MACHINE_FIELDS}}
    if "stages" in model:
        model["stages"] = tuple(model["stages"])
    return TinyRun(RunSpec.make(data, recipe=recipe, **model), machine)
