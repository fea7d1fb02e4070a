"""``RunDirectory``: the files of one run, written by rank 0 only (layout: ``runners/results.py``).

A run directory is chosen (fresh: ``<out>/runs/<name or net-method-data-seed-timestamp-hash>``)
or reopened (resume) before training starts; it holds the run's :class:`~.spec.RunSpec` and
:class:`~.spec.Machine`, its provenance, the per-epoch logs, the checkpoints that mark an epoch
as done, the per-image test predictions, and ``final.json`` or ``failure.json`` at the end.
Every other rank holds the same object with ``writes = False``: its calls write nothing.

While a process trains into a run directory it holds the directory's lock (:meth:`RunDirectory.claim`,
``runners/locks.py``): a fresh directory is created atomically under a name no other process took,
an existing one is refused while another process trains it, and a resume first removes the
temporary files a killed process left.  Resuming checks ``metrics.csv`` against the checkpoints: a
row cut short is dropped, the row of an epoch a checkpoint holds is restored from it, and a log
missing rows that no checkpoint holds is refused (nothing is rewritten).  A directory that holds a
checkpoint (a finished epoch) is never removed.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from filelock import FileLock

from bnnbench.errors import UnknownMethodError
from bnnbench.io import atomic_write, remove_stale_temporaries, write_json

from . import distributed
from .locks import hold_run_directory
from .results import CONFIG, FAILURE, FINAL, LAYERS, METRICS, PREDICTIONS, BrokenRunWarning, CsvLog, checkpoint_name, load_checkpoint, log_position, read_object, save_checkpoint
from .spec import Machine, RunSpec


def new_run_name(spec: RunSpec) -> str:
    """net-method-data-seed-timestamp-hash; the short hash of the spec keeps runs that differ only in
    hyper-parameters or recipe apart when they start in the same second (parallel jobs)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    digest = hashlib.sha1(spec.key().encode()).hexdigest()[:6]
    acts = "" if spec.model.paired else f"+{spec.model.act_method}"
    return f"{spec.model.net}-{spec.model.method}{acts}-{spec.data}-s{spec.seed}-{stamp}-{digest}"


def choose_path(spec: RunSpec, machine: Machine) -> Path:
    """``<out>/runs/<--name or new_run_name>``, not yet made (:func:`create_directory` makes it); a
    ``--name`` that exists is an error now, before training starts."""
    runs = machine.run_root()
    if machine.name:
        path = runs / machine.name
        if path.exists():
            raise ValueError(_name_taken(path))
        return path
    return runs / new_run_name(spec)


def create_directory(path: Path, unique: bool) -> Path:
    """Make run directory ``path`` atomically (``mkdir`` fails when it exists); when ``unique``, a name
    another process took meanwhile becomes ``<name>-2``, ``-3``, ... (else that is an error)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = path, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            if not unique:
                raise ValueError(_name_taken(path)) from None
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")


def _name_taken(path: Path) -> str:
    return f"run directory {str(path)!r} already exists; continue it with --resume {path} or choose another --name"


class RunDirectory:
    """One run's directory: its spec, machine, logs and checkpoints (see the module docstring)."""

    def __init__(self, path: Path, spec: RunSpec, machine: Machine, fresh: bool) -> None:
        self.path, self.spec, self.machine, self.fresh = Path(path), spec, machine, fresh
        self.writes = distributed.is_main_process()
        self.metrics = CsvLog(self.path / METRICS)
        self.layers = CsvLog(self.path / LAYERS)

    @classmethod
    def new(cls, spec: RunSpec, machine: Machine) -> RunDirectory:
        """A fresh run (rank 0 picks the name and tells the other ranks); made by :meth:`claim`."""
        return cls(distributed.main_process_value(lambda: choose_path(spec, machine)), spec, machine, fresh=True)

    @classmethod
    def open(cls, path: str | Path) -> RunDirectory:
        """An existing run directory, to resume (its spec and machine come from ``config.json``)."""
        path = Path(path)
        saved = read_object(path / CONFIG)
        if saved is None:
            raise FileNotFoundError(f"{str(path)!r} is not a run directory (no {CONFIG}); pass the directory printed when the run started")
        try:
            return cls(path, RunSpec.from_saved(saved), Machine.from_saved(saved), fresh=False)
        except UnknownMethodError:
            raise  # a sound config.json naming a method not registered here (a plugin's): the caller hints at --plugin
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path / CONFIG} is not the configuration of a bnnbench run ({type(exc).__name__}: {exc}); restore it from a copy") from None

    # ------------------------------------------------------------------ state
    @property
    def finished(self) -> bool:
        return (self.path / FINAL).is_file()

    def final(self) -> dict[str, Any]:
        final = read_object(self.path / FINAL)
        if final is None:
            raise FileNotFoundError(f"{self.path / FINAL} does not exist")
        return final

    @contextmanager
    def claim(self) -> Iterator[None]:
        """Train into this directory under its lock (held by rank 0; see the module docstring).

        A fresh directory is created here (every rank learns its name); an existing one raises
        :class:`~.locks.RunBusy` when another process holds it, and loses the temporary files a
        killed writer left.  A fresh run that stops before its first checkpoint is removed on the
        way out.
        """
        held: list[FileLock] = []

        def take() -> Path:
            path = create_directory(self.path, unique=not self.machine.name) if self.fresh else self.path
            held.append(hold_run_directory(path))
            if not self.fresh:
                remove_stale_temporaries(path)
            return path

        self.path = distributed.main_process_value(take)
        try:
            yield
        except BaseException:
            self.remove_if_empty()
            raise
        finally:
            for lock in held:
                lock.release()

    def start(self, provenance: Mapping[str, Any]) -> dict[str, Any] | None:
        """Write a fresh run's ``config.json`` (within :meth:`claim`); load the logs, checked against the
        checkpoints, and return the latest checkpoint (None for a fresh run or one with no finished epoch)."""
        if self.fresh and self.writes:
            write_json(self.path / CONFIG, {"run_id": self.path.name, "created": datetime.now().isoformat(timespec="seconds"), **provenance})
        latest = self.latest_checkpoint()
        position = (latest["stage"], latest["epoch"]) if latest else (0, 0)
        self.metrics = self.checked_metrics(CsvLog.resume(self.path / METRICS, position), latest)
        self.layers = CsvLog.resume(self.path / LAYERS, position)
        return latest

    def latest_checkpoint_path(self) -> Path | None:
        """The checkpoint of the latest finished epoch: the latest stage's ``last``, or its ``best`` when
        an interruption came between writing the two (a new best is written first)."""
        for stage in (2, 1):
            for kind in ("last", "best"):
                path = self.checkpoint_path(stage, kind)
                if path.is_file():
                    return path
        return None

    def latest_checkpoint(self) -> dict[str, Any] | None:
        path = self.latest_checkpoint_path()
        return None if path is None else load_checkpoint(path)

    def finished_epochs(self, latest: dict[str, Any] | None) -> list[tuple[int, int]]:
        """(stage, epoch) of every epoch that finished up to checkpoint ``latest``, in training order."""
        if latest is None:
            return []
        epochs = {stage: self.spec.recipe.stage(stage).trained_epochs for stage in self.spec.stages if stage < latest["stage"]}
        epochs[latest["stage"]] = latest["epoch"]
        return [(stage, epoch) for stage, last in epochs.items() for epoch in range(1, last + 1)]

    def checked_metrics(self, log: CsvLog, latest: dict[str, Any] | None) -> CsvLog:
        """``log`` (metrics.csv up to checkpoint ``latest``) with one row per finished epoch: the row of an
        epoch that a checkpoint holds (each saves its epoch's row) is restored from it and the file
        rewritten with every row kept; a ValueError names the file when rows repeat, belong to no
        finished epoch, or are missing where no checkpoint holds them (the file is left as it is)."""
        expected = self.finished_epochs(latest)
        have = {log_position(row, log.path): row for row in log.rows}
        if len(have) != len(log.rows) or not set(have) <= set(expected):
            raise ValueError(
                f"{log.path} has rows that repeat or belong to no finished epoch of this run; "
                "restore the file from a copy, or train the run again in a new directory (without --resume)"
            )
        missing = [position for position in expected if position not in have]
        for stage, epoch in missing:
            row = self.checkpointed_row(stage, epoch)
            if row is None:
                raise ValueError(
                    f"{log.path} has no row for stage {stage} epoch {epoch}, which finished, and no checkpoint of this run holds it; "
                    "restore metrics.csv from a copy, or train the run again in a new directory (without --resume)"
                )
            have[(stage, epoch)] = row
        if not missing:
            return log
        log.rows = [have[position] for position in expected]
        if self.writes:
            log.append([])
            restored = ", ".join(f"stage {stage} epoch {epoch}" for stage, epoch in missing)
            warnings.warn(f"{log.path}: restored the row of {restored} from its checkpoint", BrokenRunWarning, stacklevel=2)
        return log

    def checkpointed_row(self, stage: int, epoch: int) -> dict[str, Any] | None:
        """The metrics row a checkpoint of ``stage`` saved at ``epoch`` (None when none of them is of that epoch)."""
        for kind in ("last", "best"):
            path = self.checkpoint_path(stage, kind)
            if path.is_file():
                state = load_checkpoint(path)
                if state.get("epoch") == epoch and "metrics" in state:
                    return dict(state["metrics"])
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
        """Whether a complete checkpoint (``last`` or ``best``) marks an epoch as finished."""
        return self.latest_checkpoint_path() is not None

    def last_checkpoint_note(self) -> str:
        path = self.latest_checkpoint_path()
        if path is None:
            return f"no epoch has finished yet in {self.path}"
        latest = load_checkpoint(path)
        return f"the last good checkpoint is {path} (stage {latest['stage']}, epoch {latest['epoch']})"

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


__all__ = ["RunDirectory", "choose_path", "create_directory", "new_run_name"]
