"""The run directory: atomic files, checkpoints, per-epoch CSV logs and provenance.

Layout of ``<out>/runs/<run-id>/``::

    config.json          resolved configuration + provenance (git commit, versions, device)
    metrics.csv          one row per finished epoch (both stages)
    layers.csv           per-layer diagnostics from epoch callbacks (only when a callback reports any)
    stage{1,2}_last.pt   state after the stage's latest finished epoch (resume point)
    stage{1,2}_best.pt   state at the stage's best test top-1
    final.json           summary, written once the last stage finishes
    failure.json         why the run stopped (non-finite loss), when it did
    .lock                held by the process training the run (runners/locks.py)

Every file is written to a temporary name in the same directory and moved
into place with ``os.replace``, so a killed process leaves either the old or
the new version, never half a file.  Checkpoints hold only tensors, dicts,
lists, numbers and strings so that ``torch.load(weights_only=True)`` reads them.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import platform
import random
import subprocess
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnnbench import hardware
from bnnbench.io import atomic_write, read_json, read_torch, write_text

CONFIG, METRICS, LAYERS, FINAL, FAILURE = "config.json", "metrics.csv", "layers.csv", "final.json", "failure.json"
PREDICTIONS = "predictions.npz"


# ------------------------------------------------------------------ atomic files
# (bnnbench.io: atomic_write, write_text, write_json, read_json)


def read_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path`` (None when there is no such file); a ValueError names a file that holds anything else."""
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    state = read_torch(path, "checkpoint")
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{str(path)!r} is not a bnnbench checkpoint (no 'model' state)")
    return state


def load_model_state(model: torch.nn.Module, state: dict[str, Any], source: Path, expected: str) -> None:
    """Load checkpoint ``state`` (read from ``source``) into ``model`` (``expected``: what the model is, for
    the message), or refuse in one line naming the first weights that are missing, extra or of another shape."""
    saved, own = state["model"], model.state_dict()
    if not isinstance(saved, dict):
        raise ValueError(f"{str(source)!r} is not a bnnbench checkpoint (its 'model' state is not a dict of tensors)")
    problems = [f"missing {k}" for k in own if k not in saved] + [f"unexpected {k}" for k in saved if k not in own]
    problems += [
        f"{k} has shape {tuple(saved[k].shape)}, expected {tuple(own[k].shape)}"
        for k in own
        if k in saved and torch.is_tensor(saved[k]) and saved[k].shape != own[k].shape
    ]
    if problems:
        spec = state.get("spec") if isinstance(state.get("spec"), dict) else {}
        model_spec = spec.get("model") if isinstance(spec.get("model"), dict) else {}
        trained = f"{model_spec.get('net')} with method {model_spec.get('method')}" if model_spec else "an unrecorded network"
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ValueError(
            f"checkpoint {str(source)!r} ({trained}) does not fit {expected}: {'; '.join(problems[:3])}{more}. "
            "Pass a checkpoint of the same network and method"
        )
    model.load_state_dict(saved)


def checkpoint_name(stage: int, kind: str) -> str:
    """``stage1_last.pt``, ``stage2_best.pt``, ..."""
    return f"stage{stage}_{kind}.pt"


# ------------------------------------------------------------------ CSV logs
class BrokenRunWarning(UserWarning):
    """A file of a run directory was damaged (cut, empty, not JSON); the warning names it and says what was done."""


def read_log(path: Path) -> tuple[str, bool]:
    """The text of a CSV log written by :class:`CsvLog`, up to its last complete row, and whether
    anything after that row was cut off (an empty file counts as cut: CsvLog writes a header first).

    CsvLog ends every row with a newline, so text after the last newline is a row cut short (by a
    copy or a disk that failed mid-write).  A complete row whose field count differs from the
    header's is a ValueError naming the file and line.
    """
    text = Path(path).read_text()
    whole = text[: text.rfind("\n") + 1]
    records = list(csv.reader(io.StringIO(whole)))
    for line, record in enumerate(records[1:], start=2):
        if len(record) != len(records[0]):
            raise ValueError(
                f"{path}, line {line}: {len(record)} fields where the header has {len(records[0])}; "
                "restore the file from a copy or remove the run directory"
            )
    return whole, whole != text or not text


def log_position(row: dict[str, Any], path: Path) -> tuple[int, int]:
    """(stage, epoch) of a row of ``path``; a ValueError names the file when they are not numbers."""
    try:
        return int(row["stage"]), int(row["epoch"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: a row has no numeric stage and epoch ({row.get('stage')!r}, {row.get('epoch')!r}); restore the file from a copy") from None


class CsvLog:
    """A CSV file of dict rows ordered by (stage, epoch), rewritten atomically on each append.

    Columns are the union of the rows' keys in first-seen order, so a
    callback that starts reporting a new value later still gets a column.
    """

    def __init__(self, path: Path, rows: list[dict[str, Any]] | None = None) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = rows or []

    @classmethod
    def resume(cls, path: Path, upto: tuple[int, int]) -> CsvLog:
        """Rows already on disk up to and including (stage, epoch) ``upto``; later rows are dropped
        (they belong to an epoch whose checkpoint was never written), and so is a row cut short (with
        a :class:`BrokenRunWarning`)."""
        path = Path(path)
        if not path.is_file():
            return cls(path)
        text, cut = read_log(path)
        if cut:
            warnings.warn(f"{path}: the last row was cut short; resuming from the complete rows before it", BrokenRunWarning, stacklevel=2)
        rows = [r for r in csv.DictReader(io.StringIO(text)) if log_position(r, path) <= upto]
        return cls(path, rows)

    def append(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)
        columns: dict[str, None] = {}
        for row in self.rows:
            columns.update(dict.fromkeys(row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _csv_value(v) for k, v in row.items()} for row in self.rows)
        write_text(self.path, buffer.getvalue())


def _csv_value(value: Any) -> Any:
    return repr(value) if isinstance(value, float) else value  # repr round-trips floats exactly


# ------------------------------------------------------------------ RNG state
def rng_state() -> dict[str, Any]:
    """Every global RNG as tensors/lists (loadable with ``weights_only=True``)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


# ------------------------------------------------------------------ provenance
def git_commit(path: Path | None = None) -> dict[str, Any] | None:
    """Commit of the source tree holding bnnbench (and whether it has local changes); None outside git."""
    cwd = path or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


@functools.cache
def source_commit() -> dict[str, Any] | None:
    """:func:`git_commit` of bnnbench's source tree, read once a process, at its first run: the code that process
    imported.  A pool worker trains several runs with the code it started with, while the tree may move on (a
    campaign's finished runs committed as they finish): HEAD at each run's start would name code it did not run."""
    return git_commit()


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("bnnbench", "torch", "torchvision", "numpy", "ffcv", "rich"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["torch"] = torch.__version__  # with the build tag, e.g. 2.4.1+cu121
    return versions


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "platform": platform.platform(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = hardware.cpu_model()
        info["cpu_family_model"] = hardware.cpu_family_model()
        info["isa"] = hardware.isa()
        info["cpu_count"] = os.cpu_count()
    return info
