"""Figures 2-4 of the BiPer paper, written as PNG and PDF.

* Figure 2: density of ``w_hat = sin(w0 w)`` for Laplace weights ``w ~ La(0, b)``
  at ``w0 = 1`` (Eq. 14, corrected; see :mod:`bnnbench.theory`), one panel per
  ``b``, over a histogram of sampled ``sin(w0 w)``.
* Figure 3: quantization error against the frequency ``w0`` for several ``b``:
  closed-form curves (Eq. 17 with Eq. 18, corrected) and empirical points, the
  Eq. 15 error of BiPer's own pre-sign tensor on sampled Laplace weights.
* Figure 4: the frequency sweep (needs training runs): a DataFrame with one row
  per trained model and the columns of :data:`SWEEP_COLUMNS`.
* Training curves of a comparison (not a paper figure): chosen ``metrics.csv``
  columns against the epoch, one line per method (:func:`training_curves`).
* The intervals of a comparison with a reference row (:func:`interval_plot`).

Figures are drawn on ``matplotlib.figure.Figure`` objects (Agg canvas, no pyplot
and no global style change) and written atomically (temp file, then rename).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure

from .io import atomic_write
from .metrics import quantization_error
from .registry import get_method
from .theory import QE_LIMIT, pdf_sin_laplace, qe_laplace, qe_peak

FIG2_B = (0.2, 0.5, 1.0, 2.0)
FIG3_B = (0.01, 0.02, 0.05, 0.1)
FIG3_W0_POINTS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)

SWEEP_COLUMNS = {
    "w0": "BiPer frequency of the run",
    "stage1_top1": "Top-1 accuracy (%) at the end of stage 1 (binary activations, weights sin(w0 w))",
    "qe": "model QE (Eq. 15, mean over binary layers) of the weights at the end of stage 1",
    "b": "model Laplace scale (mean over binary layers of mean|w|) at the end of stage 1",
    "top1": "Top-1 accuracy (%) of the full binary model at the end of stage 2",
}
"""Columns a Figure 4 sweep table must have; several rows per w0 (seeds) are averaged, +-1 sd shown."""

FORMATS = ("png", "pdf")


def _style():
    """Seaborn's whitegrid look and paper sizes, for the figure built inside the block only."""
    return sns.axes_style("whitegrid"), sns.plotting_context("paper")


def _sample_laplace(b: float, samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).laplace(0.0, b, samples)


def figure2(b_values: Sequence[float] = FIG2_B, w0: float = 1.0, samples: int = 200_000, seed: int = 0) -> Figure:
    """Fig. 2: pdf of w_hat = sin(w0 w), w ~ La(0, b), Eq. 14 (corrected) over a histogram of samples."""
    style, context = _style()
    with style, context:
        fig = Figure(figsize=(3.0 * len(b_values), 2.8), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(b_values), sharex=True))
        x = np.linspace(-0.999, 0.999, 2001)
        for i, (ax, b) in enumerate(zip(axes, b_values)):
            w_hat = np.sin(w0 * _sample_laplace(b, samples, seed + i))
            sns.histplot(
                x=w_hat, stat="density", bins=80, binrange=(-1, 1), ax=ax, color="0.75", edgecolor="0.6", label="samples"
            )
            density = pdf_sin_laplace(x, b, w0)
            sns.lineplot(x=x, y=density, ax=ax, color="C3", label="Eq. 14")
            ax.set_ylim(0, min(1.15 * float(np.max(density[np.abs(x) < 0.9])) + 0.3, 6.0))
            ax.set_title(f"b = {b:g}, $\\omega_0$ = {w0:g}")
            ax.set_xlabel(r"$\hat{w} = \sin(\omega_0 w)$")
            ax.set_ylabel("density" if i == 0 else "")
            if i > 0:
                ax.get_legend().remove()
        fig.suptitle(r"pdf of $\hat{w}$ for $w \sim La(0, b)$ (Eq. 14, corrected)")
    return fig


def empirical_qe(b: float, w0: float, samples: int, seed: int) -> float:
    """Eq. 15 on BiPer's pre-sign tensor sin(w0 w) of ``samples`` Laplace(0, b) weights."""
    w = torch.from_numpy(_sample_laplace(b, samples, seed))
    return float(quantization_error(get_method("biper", w0=w0).pre_sign(w, 0.0)))


def figure3(
    b_values: Sequence[float] = FIG3_B,
    w0_points: Sequence[float] = FIG3_W0_POINTS,
    samples: int = 100_000,
    seed: int = 0,
) -> Figure:
    """Fig. 3: QE against w0 for several b: closed form (curves) and sampled BiPer weights (points)."""
    w0_grid = np.geomspace(min(w0_points) / 2, max(w0_points) * 2, 400)
    style, context = _style()
    with style, context:
        fig = Figure(figsize=(6.0, 3.8), layout="constrained")
        ax = fig.subplots()
        palette = sns.color_palette("viridis", len(b_values))
        for i, (b, color) in enumerate(zip(b_values, palette)):
            sns.lineplot(x=w0_grid, y=qe_laplace(w0_grid * b), ax=ax, color=color, label=f"b = {b:g}")
            points = [empirical_qe(b, w0, samples, seed + 1000 * i + j) for j, w0 in enumerate(w0_points)]
            ax.scatter(w0_points, points, color=color, edgecolor="k", linewidth=0.5, s=22, zorder=3)
        u_star, qe_max = qe_peak()
        ax.axhline(QE_LIMIT, color="0.4", linestyle="--", linewidth=1, label=r"$1/2 - 4/\pi^2$")
        ax.axhline(qe_max, color="0.4", linestyle=":", linewidth=1, label=f"max {qe_max:.6f} at $\\omega_0 b$ = {u_star:.6f}")
        ax.set_xscale("log")
        ax.set_xlabel(r"frequency $\omega_0$")
        ax.set_ylabel("QE")
        ax.set_title(f"QE vs $\\omega_0$: Eq. 17-18 (corrected, lines), {samples:,} sampled weights (dots)")
        ax.legend(fontsize="small")
    return fig


def validate_sweep(sweep: pd.DataFrame) -> pd.DataFrame:
    """The sweep table with numeric columns, or a ValueError naming what is missing."""
    missing = [c for c in SWEEP_COLUMNS if c not in sweep.columns]
    if missing:
        expected = "; ".join(f"{c}: {d}" for c, d in SWEEP_COLUMNS.items())
        raise ValueError(f"sweep table lacks column(s) {', '.join(missing)}; Figure 4 needs {expected}")
    if sweep.empty:
        raise ValueError("sweep table has no rows; Figure 4 needs one row per trained model")
    numeric = sweep.copy()
    for column in SWEEP_COLUMNS:
        try:
            numeric[column] = pd.to_numeric(sweep[column])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"sweep column {column!r} must be numeric: {exc}") from None
    return numeric


def read_sweep(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read and validate a Figure 4 sweep CSV (columns :data:`SWEEP_COLUMNS`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep table {path} does not exist; it is written by the frequency-sweep training runs")
    return validate_sweep(pd.read_csv(path))


def figure4(sweep: pd.DataFrame) -> Figure:
    """Fig. 4: the w0 sweep, from a table with the columns of :data:`SWEEP_COLUMNS`.

    Panels: (a) stage-1 Top-1, (b) stage-1 QE with the Laplace prediction
    (the optional column ``qe_theory``, the mean over layers of
    ``qe_laplace(w0 b_layer)`` as :mod:`bnnbench.runners.sweep` computes it; else
    ``qe_laplace(w0 b)`` at the layer-mean b), (c) the Laplace scale b, (d) Top-1
    of the full binary model (stage-1 Top-1 dashed for reference).  Rows that
    share a w0 (seeds) are averaged, with +-1 standard deviation bands.
    """
    data = validate_sweep(sweep)
    per_layer = "qe_theory" in sweep
    if per_layer:
        data["qe_theory"] = pd.to_numeric(sweep["qe_theory"], errors="coerce").to_numpy()
    else:
        data["qe_theory"] = qe_laplace(np.asarray(data["w0"] * data["b"], dtype=float))
    style, context = _style()
    with style, context:
        fig = Figure(figsize=(12.0, 3.2), layout="constrained")
        ax_a, ax_b, ax_c, ax_d = fig.subplots(1, 4, sharex=True)
        line = {"x": "w0", "data": data, "marker": "o", "errorbar": "sd"}
        sns.lineplot(y="stage1_top1", ax=ax_a, **line)
        ax_a.set(title="(a) stage 1 Top-1", ylabel="Top-1 (%)")
        sns.lineplot(y="qe", ax=ax_b, label="measured", **line)
        theory = r"Laplace theory, per-layer $b$" if per_layer else r"Laplace theory at mean $b$"
        sns.lineplot(y="qe_theory", ax=ax_b, label=theory, linestyle="--", **line)
        ax_b.set(title="(b) stage 1 QE (Eq. 15)", ylabel="QE")
        sns.lineplot(y="b", ax=ax_c, **line)
        ax_c.set(title="(c) Laplace scale b (MLE)", ylabel="b")
        sns.lineplot(y="top1", ax=ax_d, label="stage 2 (binary weights)", **line)
        sns.lineplot(y="stage1_top1", ax=ax_d, label="stage 1", linestyle="--", color="0.5", **line)
        ax_d.set(title="(d) full binary model Top-1", ylabel="Top-1 (%)")
        for ax in (ax_a, ax_b, ax_c, ax_d):
            ax.set_xlabel(r"frequency $\omega_0$")
    return fig


CURVE_LABELS = {
    "test_top1": "test Top-1 (%)",
    "train_loss": "train loss",
    "qe": "QE (Eq. 15, layer mean)",
    "qe_relative": "QE / E[w_hat^2] (layer mean)",
    "qe_l1_upstream": "QE, upstream L1 form",
    "laplace_b": "Laplace scale b (layer mean)",
    "flip_rate": "weight flip rate per epoch",
    "grad_norm_mean": "latent-weight gradient L2 norm",
    "dead_share": "share with zero surrogate gradient",
}


LOG_SCALE = {"grad_norm_mean", "grad_norm_last", "train_loss"}
"""Metrics drawn on a log axis (they span orders of magnitude across methods)."""


def training_curves(curves: pd.DataFrame, metrics: Sequence[str]) -> Figure:
    """One panel per metric against the epoch counted over both stages, one line per ``label``.

    ``curves`` is long-form ``metrics.csv`` data with the columns ``label``,
    ``stage``, ``epoch`` and the ``metrics``; a dotted vertical line marks where
    stage 2 begins; several runs with one label (seeds) are averaged, +-1 sd
    shown.  Runs that did not log a metric (e.g. QE of the
    full-precision model) are left out of that panel.
    """
    missing = sorted({"label", "stage", "epoch", *metrics} - set(curves.columns))
    if missing:
        raise ValueError(f"training curves need the column(s) {', '.join(missing)}")
    if curves.empty or not metrics:
        raise ValueError("training curves need at least one run and one metric")
    data = curves.copy()
    stage1_epochs = int(data.loc[data["stage"] == 1, "epoch"].max()) if (data["stage"] == 1).any() else 0
    data["global_epoch"] = data["epoch"] + np.where(data["stage"] == 2, stage1_epochs, 0)
    style, context = _style()
    with style, context:
        fig = Figure(figsize=(3.6 * len(metrics), 3.4), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(metrics), sharex=True))
        last = len(metrics) - 1
        labels = list(dict.fromkeys(data["label"]))
        palette = dict(zip(labels, sns.color_palette("tab20", len(labels))))
        for i, (ax, metric) in enumerate(zip(axes, metrics)):
            shown = data.dropna(subset=[metric])
            sns.lineplot(data=shown, x="global_epoch", y=metric, hue="label", palette=palette, marker="o", errorbar="sd", ax=ax, legend=i == last)
            if metric in LOG_SCALE and (shown[metric] > 0).all():
                ax.set_yscale("log")
            if stage1_epochs:
                ax.axvline(stage1_epochs + 0.5, color="0.5", linestyle=":")
            ax.set(title=CURVE_LABELS.get(metric, metric), xlabel="epoch (stage 1, then stage 2)", ylabel="")
        sns.move_legend(axes[last], "center left", bbox_to_anchor=(1.02, 0.5), title=None)
    return fig


def interval_plot(comparison: pd.DataFrame, value_label: str = "top-1 (%)") -> Figure:
    """Every row's mean with its 95% interval over seeds (a forest plot, rows in table order), the reference
    row's mean as a vertical line; rows whose paired t test against it is significant (Holm) in colour.

    ``comparison``: :func:`bnnbench.stats.compare_to_reference`'s frame (``attrs["reference"]`` names the row).
    """
    needed = {"mean", "ci_low", "ci_high", "sig_t"}
    if not needed <= set(comparison.columns) or comparison.empty:
        raise ValueError(f"an interval plot needs compare_to_reference's columns {sorted(needed)} and at least one row")
    reference = comparison.attrs.get("reference")
    labels = list(comparison.index)
    y = np.arange(len(labels))[::-1]
    low = (comparison["mean"] - comparison["ci_low"]).fillna(0.0).to_numpy()
    high = (comparison["ci_high"] - comparison["mean"]).fillna(0.0).to_numpy()
    style, context = _style()
    with style, context:
        fig = Figure(figsize=(6.4, 0.28 * len(labels) + 1.0), layout="constrained")
        ax = fig.subplots()
        significant = comparison["sig_t"].fillna(False).astype(bool).to_numpy()
        for mask, colour, name in ((~significant, "0.45", "not significant"), (significant, "tab:red", "paired t test significant (Holm, 5%)")):
            if mask.any():
                ax.errorbar(comparison["mean"].to_numpy()[mask], y[mask], xerr=[low[mask], high[mask]], fmt="o", color=colour, capsize=3, label=name)
        if reference in comparison.index:
            ax.axvline(comparison.loc[reference, "mean"], color="tab:blue", linestyle=":", label=f"reference: {reference}")
        ax.set_yticks(y, labels)
        ax.set(xlabel=f"{value_label}, mean and 95% interval over seeds", ylabel="")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.6 / (0.28 * len(labels) + 1.0)), fontsize="small", frameon=False)  # below the axes: it never covers a row
    return fig


def save_figure(fig: Figure, out_dir: str | os.PathLike[str], stem: str, dpi: int = 200) -> list[Path]:
    """Write ``fig`` as ``out_dir/stem.png`` (``dpi``) and ``.pdf`` (temp file + rename each); return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in FORMATS:
        written.append(atomic_write(out / f"{stem}.{fmt}", lambda f, fmt=fmt: fig.savefig(f, format=fmt, dpi=dpi)))
    return written


__all__ = [
    "FIG2_B",
    "FIG3_B",
    "FIG3_W0_POINTS",
    "SWEEP_COLUMNS",
    "empirical_qe",
    "figure2",
    "figure3",
    "figure4",
    "interval_plot",
    "read_sweep",
    "save_figure",
    "training_curves",
    "validate_sweep",
]
