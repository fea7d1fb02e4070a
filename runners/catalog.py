"""Reading finished and unfinished run directories (``<out>/runs/<run-id>/``, see ``runners/results.py``).

A :class:`RunRecord` is what one run directory says about itself: its saved
configuration and provenance (``config.json``), its per-epoch log
(``metrics.csv``), its summary once finished (``final.json``) and why it
stopped when it failed (``failure.json``).  The tables, the report and the
Figure 4 sweep all read runs through :func:`scan_runs`.

Status of a run
---------------
``finished``  ``final.json`` exists;
``diverged``  ``failure.json`` says the loss became non-finite (rerunning gives the same);
``failed``    ``failure.json`` names another error (resuming may get further);
``unfinished`` neither: interrupted, or still training.

Damaged folders
---------------
:func:`scan_runs` skips a run directory whose ``config.json``, ``final.json`` or
``failure.json`` is not a JSON object, or whose ``metrics.csv`` cannot be read (empty, a
row with the wrong number of fields, or cut short in a finished run), with a
:class:`BrokenRunWarning` naming the file; the other runs are read as usual.  The
``metrics.csv`` of an unfinished run that was cut mid-row is read without that row (and
``bnnbench run --resume`` repairs it).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from .results import CONFIG, FAILURE, FINAL, LAYERS, METRICS, BrokenRunWarning, read_log, read_object
from .spec import Machine, RunSpec

DIVERGED_ERROR = "TrainingDiverged"


@dataclass
class RunRecord:
    """One run directory, read lazily (the CSV logs only when asked for)."""

    path: Path
    saved: dict[str, Any]  # config.json: {"run_id", "created", "spec", "settings", "resolved", "model", "data", "machine", ...}
    final: dict[str, Any] | None
    failure: dict[str, Any] | None

    @property
    def run_id(self) -> str:
        return self.path.name

    @cached_property
    def spec(self) -> RunSpec | None:
        """The run's :class:`~.spec.RunSpec` (None when its config.json names something unknown
        here, such as a plugin method that is not loaded)."""
        try:
            return RunSpec.from_saved(self.saved)
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def machine(self) -> Machine:
        """Where and how the run executed (:class:`~.spec.Machine`)."""
        return Machine.from_saved(self.saved)

    @property
    def status(self) -> str:
        if self.final is not None:
            return "finished"
        if self.failure is not None:
            return "diverged" if self.failure.get("type") == DIVERGED_ERROR else "failed"
        return "unfinished"

    @cached_property
    def metrics(self) -> pd.DataFrame:
        """``metrics.csv`` (empty when no epoch has finished)."""
        return _read_csv(self.path / METRICS, finished=self.final is not None)

    @cached_property
    def layers(self) -> pd.DataFrame:
        """``layers.csv`` (empty when the run logged no per-layer diagnostics)."""
        return _read_csv(self.path / LAYERS, finished=self.final is not None)

    def stage_end(self, stage: int) -> pd.Series | None:
        """The ``metrics.csv`` row of the last logged epoch of ``stage`` (None if the stage has none)."""
        rows = self.metrics
        if rows.empty or "stage" not in rows:
            return None
        mine = rows[rows["stage"] == stage]
        return None if mine.empty else mine.loc[mine["epoch"].idxmax()]

    def stage_best(self, stage: int, column: str = "test_top1") -> pd.Series | None:
        """The row of ``stage`` with the highest ``column`` (earliest epoch on ties), or None."""
        rows = self.metrics
        if rows.empty or "stage" not in rows or column not in rows:
            return None
        mine = rows[rows["stage"] == stage].sort_values("epoch")
        return None if mine.empty else mine.loc[mine[column].idxmax()]

    @property
    def data_label(self) -> str:
        """What the run trained on, as a caption should say it (e.g. "CIFAR-10 (JPEG q75 copy)")."""
        info = self.saved.get("data") or {}
        if info.get("note"):
            return str(info["note"])
        name = str(info.get("description") or (self.spec.data if self.spec else "?")).split(":")[0]
        return f"{name} ({info['root']})" if info.get("root") else name

    @property
    def machine_label(self) -> str:
        """The device the run used: the GPU's name, or the CPU and its core count."""
        info = self.saved.get("machine") or {}
        if info.get("gpu"):
            return str(info["gpu"])
        if not info:
            return "unknown machine"
        cores = f", {info['cpu_count']} cores" if info.get("cpu_count") else ""
        isa = f" ({info['isa']})" if info.get("isa") else ""
        cpu = str(info.get("cpu") or "")
        if cpu in ("", "x86_64", "aarch64", "arm64", "i386"):  # runs before 2026-12-01 kept only the architecture
            cpu = f"an {cpu} CPU whose model was not recorded" if cpu else "a CPU whose model was not recorded"
        return f"{cpu}{isa}{cores}"

    @property
    def created(self) -> str:
        return str(self.saved.get("created", ""))


def _read_csv(path: Path, finished: bool) -> pd.DataFrame:
    """A CSV log of a run (:func:`~.results.read_log`); a ValueError names it when it cannot be trusted."""
    if not path.is_file():
        return pd.DataFrame()
    text, cut = read_log(path)
    if cut and finished:
        raise ValueError(f"{path} is empty or cut short although the run finished; restore it from a copy or remove the run directory")
    if cut:
        warnings.warn(f"{path}: the last row was cut short; read without it (bnnbench run --resume {path.parent} repairs it)", BrokenRunWarning, stacklevel=3)
    return pd.read_csv(io.StringIO(text)) if text else pd.DataFrame()


def read_run(path: str | Path) -> RunRecord:
    """The record of one run directory, its ``metrics.csv`` read; a ValueError names the file that makes it unreadable."""
    path = Path(path)
    saved = read_object(path / CONFIG)
    if saved is None:
        raise ValueError(f"{path} is not a run directory (no {CONFIG})")
    try:
        Machine.from_saved(saved)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path / CONFIG} has no valid settings ({type(exc).__name__}: {exc})") from None
    record = RunRecord(path, saved, read_object(path / FINAL), read_object(path / FAILURE))
    _ = record.metrics  # read now, so that a damaged log is found by the scan
    return record


def scan_runs(root: str | Path) -> list[RunRecord]:
    """Every run directory directly under ``root`` (e.g. ``results/runs``), oldest first.

    Folders without ``config.json`` (a run that failed before its first epoch
    removes itself; anything else is not ours) are skipped, and so are damaged
    ones, each with a :class:`BrokenRunWarning` naming the file at fault.  A
    missing ``root`` holds no runs.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    records = []
    for path in sorted(root.iterdir()):
        if not (path.is_dir() and (path / CONFIG).is_file()):
            continue
        try:
            records.append(read_run(path))
        except ValueError as exc:
            warnings.warn(f"skipping run directory {path}: {exc}", BrokenRunWarning, stacklevel=2)
    return sorted(records, key=lambda r: (r.created, r.run_id))


__all__ = ["DIVERGED_ERROR", "BrokenRunWarning", "RunRecord", "read_run", "scan_runs"]
