"""Which differences of a table are real: every row against a reference row, over seeds and test images.

A table spec that names a ``reference`` row (its label) gets, for its ``compare`` column
(default ``top1``), the columns of :func:`bnnbench.stats.compare_to_reference`: the paired
difference to the reference with its 95% interval (over seeds: the same seed gives every
row the same initial weights and data order), the paired t test across seeds and McNemar's
test on the pooled per-image test predictions (``predictions.npz`` of each run), both
Holm-corrected over the table's comparisons, the probability that the row is the best and
its 95% rank interval (a bootstrap over seeds and test images).  Runs trained before
predictions were saved enter the t test but not McNemar or the bootstrap.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np
import pandas as pd

from bnnbench import stats

from .results import PREDICTIONS, BrokenRunWarning

if TYPE_CHECKING:
    from .experiments import Plan
    from .tables import TableSpec

ALPHA = 0.05
BOOTSTRAP = 2000


def load_correct(run_dir: Path) -> np.ndarray | None:
    """Per test image, whether the run's final model was right (None when the run saved no predictions,
    or, with a :class:`~.results.BrokenRunWarning` naming the file, when they cannot be read)."""
    path = Path(run_dir) / PREDICTIONS
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            return saved["predictions"] == saved["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        warnings.warn(f"{path} cannot be read ({type(exc).__name__}: {exc}); the run is left out of the per-image tests", BrokenRunWarning, stacklevel=2)
        return None


def comparison(spec: TableSpec, values: pd.DataFrame, runs: Plan, seeds: list[int]) -> pd.DataFrame | None:
    """The statistics of ``spec``'s rows against its reference row (None when the spec names no reference).

    Indexed by row label; the columns of :func:`bnnbench.stats.compare_to_reference`.
    """
    if spec.reference is None:
        return None
    finished = values[(values["column"] == spec.compare) & values["value"].notna()]
    accuracy = finished.rename(columns={"label": "method"})[["method", "seed", "value"]]
    if spec.reference not in set(accuracy["method"]):
        return None  # the reference has no finished run yet
    correct: dict[str, dict[int, np.ndarray]] = {}
    for row in spec.rows:
        if row.run is None:
            continue
        for seed in seeds:
            job = runs.job(row.run, seed)
            flags = load_correct(job.record.path) if job.status == "finished" and job.record is not None else None
            if flags is not None:
                correct.setdefault(row.label, {})[seed] = flags
    complete = _complete(correct, accuracy)
    return stats.compare_to_reference(accuracy, spec.reference, complete, alpha=ALPHA, n_boot=BOOTSTRAP)


def _complete(correct: Mapping[str, Mapping[int, np.ndarray]], accuracy: pd.DataFrame) -> dict[str, dict[int, np.ndarray]] | None:
    """The per-image flags when every finished run of the table has them (and they cover one test set), else None."""
    needed = {(m, int(s)) for m, s in zip(accuracy["method"], accuracy["seed"])}
    have = {(m, s) for m, by_seed in correct.items() for s in by_seed}
    sizes = {len(v) for by_seed in correct.values() for v in by_seed.values()}
    if not needed <= have or len(sizes) != 1:
        return None
    return {m: {s: v for s, v in by_seed.items() if (m, s) in needed} for m, by_seed in correct.items() if any((m, s) in needed for s in by_seed)}


def columns(table: pd.DataFrame, label: str, digits: int, latex: bool = False) -> dict[str, str]:
    """The statistics cells of one row: difference to the reference [95% CI] with a marker, adjusted p-values,
    P(best) and the rank interval."""
    if label not in table.index:
        return dict.fromkeys(HEADERS, "")
    line = table.loc[label]
    reference = table.attrs["reference"]
    if label == reference:
        diff = "reference"
    else:
        mark = stats.significance_marker(line["p_t_holm"], ALPHA, latex) + _dagger(line["p_mcnemar_holm"], latex)
        diff = stats.format_diff(line["diff"], line["diff_low"], line["diff_high"], digits) + mark
    return {
        HEADERS[0]: diff,
        HEADERS[1]: stats.format_p(line["p_t_holm"], latex=latex) if label != reference else "",
        HEADERS[2]: stats.format_p(line["p_mcnemar_holm"], latex=latex) if label != reference else "",
        HEADERS[3]: "" if np.isnan(line["p_best"]) else f"{line['p_best']:.2f}",
        HEADERS[4]: "" if np.isnan(line["rank_low"]) else f"{line['rank_low']:g}-{line['rank_high']:g}",
    }


def _dagger(p_adjusted: float, latex: bool) -> str:
    if not p_adjusted < ALPHA:
        return ""
    return "$^{\\dagger}$" if latex else "†"


HEADERS = ("Δ vs reference [95% CI]", "p (t, Holm)", "p (McNemar, Holm)", "P(best)", "rank [95%]")

LEGEND = (
    "Δ: the row minus the reference row, mean over paired seeds with its 95% Student-t interval; "
    "* paired t test across seeds and † McNemar's test on the pooled per-image predictions, each significant at 5% "
    f"after Holm's correction over the table's comparisons; P(best) and rank: bootstrap over seeds and test images ({BOOTSTRAP} draws)."
)


__all__ = ["ALPHA", "HEADERS", "LEGEND", "columns", "comparison", "load_correct"]
