"""The frequency sweep of Fig. 4 (paper Sec. 5.2): BiPer two-stage runs over w0.

For each ``w0`` and seed, one BiPer run (both stages) is matched or trained
through :mod:`runners.experiments`; :func:`sweep_frame` then reads, per run,
the stage-1 test top-1, the model QE (Eq. 15) and Laplace scale b logged by the
diagnostics callback at the last epoch of stage 1, and the full binary model's
top-1 at the last epoch of stage 2: the columns of
:data:`bnnbench.figures.SWEEP_COLUMNS`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from bnnbench.figures import SWEEP_COLUMNS
from bnnbench.theory import qe_laplace

from .catalog import RunRecord
from .defaults import DEFAULT_SWEEP_NET, DEFAULT_W0
from .experiments import Plan
from .spec import RunSpec

# Figure 4 column -> (stage, metrics.csv column at the stage's last epoch); w0 comes from the experiment
_SOURCES = {"stage1_top1": (1, "test_top1"), "qe": (1, "qe"), "b": (1, "laplace_b"), "top1": (2, "test_top1")}


def sweep_runs(w0_values: Sequence[float], net: str = DEFAULT_SWEEP_NET, data: str = "cifar10") -> list[RunSpec]:
    """One BiPer two-stage experiment per frequency (other hyper-parameters at their defaults)."""
    if not w0_values:
        raise ValueError("the sweep needs at least one w0")
    if any(not w0 > 0 for w0 in w0_values):
        raise ValueError(f"every w0 must be positive, got {list(w0_values)}")
    return [RunSpec.make(data, net=net, method="biper", hparams={"w0": float(w0)}) for w0 in w0_values]


def sweep_frame(templates: Sequence[RunSpec], runs: Plan, seeds: Sequence[int]) -> pd.DataFrame:
    """One line per finished run: ``w0``, ``seed``, ``run_id`` and the Figure 4 columns.

    Runs that are not finished are left out; a finished run that logged no
    diagnostics (trained before they were recorded) has NaN QE and b.
    """
    lines = []
    for template in templates:
        for seed in seeds:
            job = runs.job(template, seed)
            if job.status != "finished" or job.record is None:
                continue
            line = {"w0": template.model.hparams["w0"], "seed": seed, "run_id": job.record.run_id}
            for column, (stage, value) in _SOURCES.items():
                row = job.record.stage_end(stage)
                line[column] = float(row[value]) if row is not None and value in row else math.nan
            line["qe_theory"] = _layer_mean_theory(job.record, line["w0"])
            lines.append(line)
    return pd.DataFrame(lines, columns=[*SWEEP_COLUMNS, "qe_theory", "seed", "run_id"])


def _layer_mean_theory(record: RunRecord, w0: float) -> float:
    """Mean over layers of qe_laplace(w0 b_l) at the end of stage 1: the prediction for the logged
    model QE, which is the mean of the per-layer QEs (QE is not linear in b, so not qe_laplace(w0 mean b))."""
    layers, end = record.layers, record.stage_end(1)
    if layers.empty or end is None or "laplace_b" not in layers:
        return math.nan
    last = layers[(layers["stage"] == 1) & (layers["epoch"] == end["epoch"])]
    return float(np.mean(qe_laplace(w0 * last["laplace_b"].to_numpy(dtype=float)))) if len(last) else math.nan


__all__ = ["DEFAULT_W0", "sweep_frame", "sweep_runs"]
