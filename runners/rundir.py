"""``RunDirectory``: the files of one run, written by rank 0 only (layout: ``runners/results.py``).

A run directory is chosen (fresh: ``<out>/runs/<name or net-method-data-seed-timestamp-hash>``)
or reopened (resume) before training starts; it holds the run's :class:`~.spec.RunSpec` and
:class:`~.spec.Machine`, its provenance, the per-epoch logs, the checkpoints that mark an epoch
as done, the per-image test predictions, and ``final.json`` or ``failure.json`` at the end.
Every other rank holds the same object with ``writes = False``: its calls write nothing.
"""

from __future__ import annotations

import hashlib
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from bnnbench.io import atomic_write, read_json, write_json

from . import distributed
from .results import CONFIG, FAILURE, FINAL, LAYERS, METRICS, PREDICTIONS, CsvLog, checkpoint_name, load_checkpoint, save_checkpoint
from .spec import Machine, RunSpec


def new_run_name(spec: RunSpec) -> str:
    """net-method-data-seed-timestamp-hash; the short hash of the spec keeps runs that differ only in
    hyper-parameters or recipe apart when they start in the same second (parallel jobs)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    digest = hashlib.sha1(spec.key().encode()).hexdigest()[:6]
    acts = "" if spec.model.paired else f"+{spec.model.act_method}"
    return f"{spec.model.net}-{spec.model.method}{acts}-{spec.data}-s{spec.seed}-{stamp}-{digest}"


def choose_path(spec: RunSpec, machine: Machine) -> Path:
    """``<out>/runs/<--name or new_run_name>``, not yet made."""
    runs = machine.run_root()
    if machine.name:
        path = runs / machine.name
        if path.exists():
            raise ValueError(f"run directory {str(path)!r} already exists; continue it with --resume {path} or choose another --name")
        return path
    base = runs / new_run_name(spec)
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


class RunDirectory:
    """One run's directory: its spec, machine, logs and checkpoints (see the module docstring)."""

    def __init__(self, path: Path, spec: RunSpec, machine: Machine, fresh: bool) -> None:
        self.path, self.spec, self.machine, self.fresh = Path(path), spec, machine, fresh
        self.writes = distributed.is_main_process()
        self.metrics = CsvLog(self.path / METRICS)
        self.layers = CsvLog(self.path / LAYERS)

    @classmethod
    def new(cls, spec: RunSpec, machine: Machine) -> RunDirectory:
        """A fresh run (rank 0 picks the name and tells the other ranks); made by :meth:`start`."""
        return cls(distributed.main_process_value(lambda: choose_path(spec, machine)), spec, machine, fresh=True)

    @classmethod
    def open(cls, path: str | Path) -> RunDirectory:
        """An existing run directory, to resume (its spec and machine come from ``config.json``)."""
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a run directory (no {CONFIG}); pass the directory printed when the run started")
        saved = read_json(path / CONFIG)
        return cls(path, RunSpec.from_saved(saved), Machine.from_saved(saved), fresh=False)

    # ------------------------------------------------------------------ state
    @property
    def finished(self) -> bool:
        return (self.path / FINAL).is_file()

    def final(self) -> dict[str, Any]:
        return read_json(self.path / FINAL)

    def start(self, provenance: Mapping[str, Any]) -> dict[str, Any] | None:
        """Make a fresh directory and write ``config.json``; load the logs and return the latest
        checkpoint (None for a fresh run or one with no finished epoch)."""
        if self.fresh and self.writes:
            self.path.mkdir(parents=True)
            write_json(self.path / CONFIG, {"run_id": self.path.name, "created": datetime.now().isoformat(timespec="seconds"), **provenance})
        latest = self.latest_checkpoint()
        position = (latest["stage"], latest["epoch"]) if latest else (0, 0)
        self.metrics = CsvLog.resume(self.path / METRICS, position)
        self.layers = CsvLog.resume(self.path / LAYERS, position)
        return latest

    def latest_checkpoint(self) -> dict[str, Any] | None:
        for stage in (2, 1):
            path = self.path / checkpoint_name(stage, "last")
            if path.is_file():
                return load_checkpoint(path)
        return None

    def checkpoint_path(self, stage: int, kind: str) -> Path:
        return self.path / checkpoint_name(stage, kind)

    # ------------------------------------------------------------------ one finished epoch
    def record_epoch(self, row: Mapping[str, Any], layer_rows: list[dict[str, Any]], state: dict[str, Any], best: bool) -> None:
        """Logs first, then the checkpoint that marks the epoch as done (a kill in between replays it)."""
        if not self.writes:
            return
        self.metrics.append([dict(row)])
        if layer_rows:
            self.layers.append(layer_rows)
        if best:
            save_checkpoint(self.checkpoint_path(state["stage"], "best"), state)
        save_checkpoint(self.checkpoint_path(state["stage"], "last"), state)

    def save_predictions(self, predictions: np.ndarray, labels: np.ndarray, stage: int, epoch: int) -> None:
        """The final model's per-image test predictions (``predictions.npz``), in the test loader's order."""
        if self.writes:
            small = np.uint8 if max(int(predictions.max(initial=0)), int(labels.max(initial=0))) < 256 else np.uint16
            atomic_write(
                self.path / PREDICTIONS,
                lambda f: np.savez_compressed(f, predictions=predictions.astype(small), labels=labels.astype(small), stage=stage, epoch=epoch),
            )

    # ------------------------------------------------------------------ the end
    def finish(self, final: Mapping[str, Any]) -> None:
        if self.writes:
            write_json(self.path / FINAL, dict(final))
            (self.path / FAILURE).unlink(missing_ok=True)  # a resumed run that finished is no longer failed

    def fail(self, exc: BaseException) -> str:
        """Record why the run stopped and say where its last good state is (a fresh run with no
        finished epoch removes its directory)."""
        if self.remove_if_empty():
            return "no epoch had finished, so the run directory was removed"
        if self.writes:
            write_json(self.path / FAILURE, {"error": str(exc), "type": type(exc).__name__, "time": datetime.now().isoformat(timespec="seconds")})
        return self.last_checkpoint_note()

    def remove_if_empty(self) -> bool:
        """A fresh run that stops before its first checkpoint leaves nothing behind; True if removed."""
        if self.fresh and self.writes and self.path.is_dir() and not self.has_checkpoint():
            shutil.rmtree(self.path)
            return True
        return False

    def has_checkpoint(self) -> bool:
        return any(self.path.glob("stage*_last.pt"))

    def last_checkpoint_note(self) -> str:
        latest = self.latest_checkpoint()
        if latest is None:
            return f"no epoch has finished yet in {self.path}"
        name = checkpoint_name(latest["stage"], "last")
        return f"the last good checkpoint is {self.path / name} (stage {latest['stage']}, epoch {latest['epoch']})"

    def summary(self) -> dict[str, Any]:
        """``final.json``: per stage the epochs, last and best test numbers; the run's identity."""
        rows = self.metrics.rows
        stages: dict[str, Any] = {}
        for stage in self.spec.stages:
            mine = [r for r in rows if int(r["stage"]) == stage]
            last = mine[-1]
            best = max(mine, key=lambda r: (float(r["test_top1"]), -int(r["epoch"])))
            stages[str(stage)] = {
                "epochs": int(last["epoch"]),
                "last": {k: float(last[k]) for k in ("test_top1", "test_top5", "test_loss")},
                "best": {"test_top1": float(best["test_top1"]), "epoch": int(best["epoch"])},
            }
        final_stage = stages[str(self.spec.stages[-1])]
        model = self.spec.model
        return {
            "run_id": self.path.name,
            "status": "finished",
            "method": model.method,
            "act_method": model.act_method,
            "net": model.net,
            "data": self.spec.data,
            "seed": self.spec.seed,
            "recipe": self.spec.recipe.name,
            "final_test_top1": final_stage["last"]["test_top1"],
            "final_test_top5": final_stage["last"]["test_top5"],
            "best_test_top1": final_stage["best"]["test_top1"],
            "stages": stages,
            "train_time_s": sum(float(r["epoch_time_s"]) for r in rows),
            "note": "best = highest test top-1 over the stage's epochs (upstream practice: selected on the test set)",
        }


__all__ = ["RunDirectory", "choose_path", "new_run_name"]
