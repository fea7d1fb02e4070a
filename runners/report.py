"""Every run in one pandas DataFrame, for users' own analysis (``bnnbench report``).

One line per run directory (finished or not), with

* identity and status: ``run_id``, ``path``, ``status`` (finished, unfinished,
  diverged, failed), ``created``, ``data_label``, ``machine``;
* the run's spec flattened with dots: ``spec.model.method``, ``spec.model.hparams.w0``,
  ``spec.model.act_method``, ``spec.recipe.stage1.lr``, ``spec.seed``, ...; how it ran:
  ``settings.device``, ``settings.amp``, ... and ``resolved.amp_bf16`` (runs from before specs
  existed are read into the same columns);
* the summary of ``final.json`` (``final_test_top1``, ``best_test_top1``, ``train_time_s``, ...);
* per stage ``s``: ``stage{s}_epochs`` (epochs logged), ``stage{s}_best_top1`` and its
  epoch, and every numeric ``metrics.csv`` column at the stage's last epoch as
  ``stage{s}_last_<column>`` (test top-1/top-5, QE, Laplace b, flip rate, ... when the
  run logged diagnostics).
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

import pandas as pd

from bnnbench import stats
from bnnbench.io import atomic_write

from .catalog import RunRecord, scan_runs
from .significance import ALPHA, BOOTSTRAP, load_correct

_SKIPPED_METRICS = ("stage", "epoch", "epochs")
_FINAL_SKIPPED = ("stages", "run_id", "method", "net", "data", "seed", "recipe", "status", "note", "skipped_bad_images")


def flatten(data: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"prefix.a.b": 1}``; lists become their string form."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = str(value) if isinstance(value, (list, tuple)) else value
    return flat


def run_row(record: RunRecord) -> dict[str, Any]:
    """The report line of one run."""
    row: dict[str, Any] = {
        "run_id": record.run_id,
        "path": str(record.path),
        "status": record.status,
        "created": record.created,
        "data_label": record.data_label,
        "machine": record.machine_label,
    }
    spec = record.spec
    if spec is not None:
        row.update(flatten(spec.to_dict(), "spec"))
    row.update(flatten(record.machine.to_dict(), "settings"))
    row.update(flatten(record.saved.get("resolved") or {}, "resolved"))
    if record.final is not None:
        row.update({k: v for k, v in record.final.items() if k not in _FINAL_SKIPPED})
    if record.failure is not None:
        row["failure"] = record.failure.get("error")
    metrics = record.metrics
    for stage in spec.stages if spec is not None else ():
        last = record.stage_end(stage)
        if last is None:
            continue
        best = record.stage_best(stage)
        row[f"stage{stage}_epochs"] = int((metrics["stage"] == stage).sum())
        row[f"stage{stage}_best_top1"] = float(best["test_top1"])
        row[f"stage{stage}_best_epoch"] = int(best["epoch"])
        for column, value in last.items():
            if column not in _SKIPPED_METRICS and isinstance(value, numbers.Number):
                row[f"stage{stage}_last_{column}"] = value
    return row


def runs_frame(root: str | Path = "results/runs") -> pd.DataFrame:
    """One line per run directory under ``root``, oldest first (an empty frame when there is none)."""
    return pd.DataFrame([run_row(r) for r in scan_runs(root)])


def export(frame: pd.DataFrame, csv: str | Path | None = None, parquet: str | Path | None = None) -> list[Path]:
    """Write the frame as CSV and/or Parquet (atomically); Parquet needs pyarrow (or fastparquet)."""
    written = []
    if csv is not None:
        path = Path(csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(frame.to_csv(index=False).encode()))
        written.append(path)
    if parquet is not None:
        path = Path(parquet)
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            try:
                import fastparquet  # noqa: F401
            except ImportError:
                raise ImportError("Parquet export needs pyarrow: pip install pyarrow (or use --csv)") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        # columns mixing numbers and strings across runs (e.g. a hyper-parameter given as text) are stored as text
        mixed = [c for c in frame.columns if frame[c].dtype == object]
        typed = frame.astype({c: "string" for c in mixed})
        atomic_write(path, lambda f: typed.to_parquet(f, index=False))
        written.append(path)
    return written


def experiment_label(record: RunRecord) -> str:
    """The run's spec without its seed, in words: what several seeds of one experiment share."""
    spec = record.spec
    return spec.describe().replace(f", seed {spec.seed}", "") if spec is not None else record.run_id


def statistics_frame(records: list[RunRecord], reference: str | None = None, value: str = "final_test_top1") -> pd.DataFrame:
    """The finished runs grouped into experiments (same spec but the seed), each against ``reference`` (a part of one
    experiment's label; default the first): :func:`bnnbench.stats.compare_to_reference` over seeds, with McNemar and
    the bootstrap when every run saved its per-image predictions on one test set."""
    finished = [r for r in records if r.status == "finished" and r.spec is not None]
    if not finished:
        raise ValueError("no finished runs to compare")
    lines, correct = [], {}
    for record in reversed(finished):  # newest first: of several runs of one experiment and seed, the newest counts
        label = experiment_label(record)
        if record.final is None or value not in record.final:
            raise ValueError(f"run {record.run_id} has no {value!r} in final.json; choose --value among {sorted(record.final or {})}")
        if any(line["method"] == label and line["seed"] == record.spec.seed for line in lines):
            continue
        lines.append({"method": label, "seed": record.spec.seed, "value": float(record.final[value])})
        flags = load_correct(record.path)
        correct.setdefault(label, {})[record.spec.seed] = flags
    lines.reverse()  # back to the order the runs were made
    labels = list(dict.fromkeys(line["method"] for line in lines))
    chosen = labels[0] if reference is None else next((label for label in labels if reference in label), None)
    if chosen is None:
        raise ValueError(f"no experiment matches --reference {reference!r}; experiments: {'; '.join(labels)}")
    per_image = all(flags is not None for by_seed in correct.values() for flags in by_seed.values())
    sizes = {len(f) for by_seed in correct.values() for f in by_seed.values() if f is not None}
    usable = correct if per_image and len(sizes) == 1 else None
    return stats.compare_to_reference(pd.DataFrame(lines), chosen, usable, alpha=ALPHA, n_boot=BOOTSTRAP)


__all__ = ["experiment_label", "export", "flatten", "run_row", "runs_frame", "statistics_frame"]
