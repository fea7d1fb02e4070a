"""Statistics of the controlled comparison: which binarizer is best, and how sure are we.

A comparison trains every method on the same seeds 0..n-1, where one seed fixes
the initial weights and the data order for all methods.  Two methods are
therefore *paired by seed*, and on the shared test set *paired by image*.  The
functions below take plain arrays and return frozen dataclasses; nothing here
imports the rest of bnnbench.

Per method (a row of the table)
    :func:`mean_ci`: mean over seeds with a Student t interval
    ``mean ± t_{n-1, (1+c)/2} · sd / sqrt(n)``.  Assumes independent seeds with
    roughly normal accuracies; with n = 3 the interval is wide (t_{2, 0.975} = 4.30).

Method against a reference row
    :func:`paired_comparison`: paired t test over the seeds both methods have
    (``scipy.stats.ttest_rel``); it asks whether the method would still win
    with other seeds.
    :func:`mcnemar_test`: McNemar's test on the per-image predictions, pooled
    over seeds (``statsmodels``); it asks whether the trained models differ on
    this test set.  Pooling treats every (seed, image) pair as independent, but
    an image that is hard for one seed tends to be hard for all, so this test
    says nothing about seed-to-seed variation: read it next to the t test.
    :func:`holm`: Holm's step-down correction for the comparisons of a table.

All methods at once
    :func:`bootstrap_best`: probability that each method is the best and its
    rank interval, from a bootstrap that resamples seeds and test images.

:func:`compare_to_reference` puts all of this in one frame with a line per
method; :func:`format_mean_ci`, :func:`format_diff`, :func:`format_p` and
:func:`significance_marker` write its cells for Markdown and LaTeX tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests

EXACT_BELOW = 25
"""McNemar uses the exact binomial test when fewer than this many pairs are discordant."""

_NAN = float("nan")
_ROUNDING = 1e-12  # values closer than this, relative to 1 + their size, are equal up to rounding


@dataclass(frozen=True)
class MeanCI:
    """Mean of n values with a Student t confidence interval ``[low, high] = mean ± half_width``."""

    mean: float
    low: float
    high: float
    half_width: float
    sd: float  # sample standard deviation (ddof = 1)
    n: int


@dataclass(frozen=True)
class PairedTest:
    """Paired t test of ``a - b`` over seeds: mean difference, its confidence interval, t and p."""

    diff_mean: float
    low: float
    high: float
    n: int
    t: float
    p_value: float


@dataclass(frozen=True)
class McNemar:
    """McNemar's test on paired correctness; ``a_only``: pairs only a gets right, ``b_only``: only b."""

    a_only: int
    b_only: int
    statistic: float  # exact: min(a_only, b_only); otherwise the chi-square statistic
    p_value: float
    exact: bool


@dataclass(frozen=True)
class Ranking:
    """Bootstrap ranking of one method (rank 1 = best): P(best) and the rank interval."""

    p_best: float
    rank_low: float
    rank_median: float
    rank_high: float


def _values(values: ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"{name} must be one value per seed (1-D), got shape {x.shape}; pass one number per seed")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has NaN or infinite values {x.tolist()}; drop the runs without a result first")
    return x


def _is_constant(x: np.ndarray) -> bool:
    """All values equal up to rounding."""
    return bool(np.ptp(x) <= _ROUNDING * (1.0 + np.max(np.abs(x))))


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1 (e.g. 0.95), got {confidence}")


def mean_ci(values: ArrayLike, confidence: float = 0.95) -> MeanCI:
    """Mean over seeds with the Student t interval ``mean ± t_{n-1,(1+c)/2} · sd / sqrt(n)``.

    Computed by ``scipy.stats.ttest_1samp(...).confidence_interval``.  Assumes
    independent seeds and approximately normal values.  n = 1: the mean is the
    value, ``sd``, the interval and ``half_width`` are NaN (no spread can be
    estimated from one seed).  n = 0: everything is NaN.  Equal values give
    ``sd = 0`` and the zero-width interval ``[mean, mean]``.
    """
    _check_confidence(confidence)
    x = _values(values, "values")
    n = len(x)
    if n == 0:
        return MeanCI(_NAN, _NAN, _NAN, _NAN, _NAN, 0)
    mean = float(np.mean(x))
    if n == 1:
        return MeanCI(mean, _NAN, _NAN, _NAN, _NAN, 1)
    if _is_constant(x):
        return MeanCI(mean, mean, mean, 0.0, 0.0, n)
    low, high = sps.ttest_1samp(x, 0.0).confidence_interval(confidence)
    return MeanCI(mean, float(low), float(high), float(high - low) / 2, float(np.std(x, ddof=1)), n)


def paired_comparison(a: ArrayLike, b: ArrayLike, confidence: float = 0.95) -> PairedTest:
    """Paired t test of ``d = a - b``, where ``a[i]`` and ``b[i]`` come from the same seed.

    ``t = mean(d) / (sd(d) / sqrt(n))`` with n - 1 degrees of freedom, two-sided
    (``scipy.stats.ttest_rel``); the interval is ``mean(d) ± t_{n-1,(1+c)/2} · sd(d) / sqrt(n)``.
    Assumes independent seeds and approximately normal differences.

    Degenerate cases:

    * n = 0: everything NaN; n = 1: ``diff_mean`` is the one difference, the rest NaN.
    * All differences zero, up to rounding (e.g. two bit-identical methods):
      ``diff_mean = t = 0``, ``p = 1``, interval ``[0, 0]``: no difference was observed.
    * All differences equal but not zero: the interval is ``[d, d]`` and
      ``t = ±inf``, but ``p`` is NaN, not the limit 0.  With a few seeds and
      accuracies that are multiples of 1/images, a zero spread is a coincidence
      of discrete values, not infinite certainty; the t test cannot say more,
      and McNemar's test on the per-image predictions still measures the
      difference.  (scipy would report p = 0 here.)
    """
    _check_confidence(confidence)
    x, y = _values(a, "a"), _values(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must have one value per shared seed each, got {len(x)} and {len(y)}; match them by seed first")
    d = x - y
    n = len(d)
    if n < 2:
        return PairedTest(float(d[0]) if n else _NAN, _NAN, _NAN, n, _NAN, _NAN)
    mean = float(np.mean(d))
    if _is_constant(d):
        if np.max(np.abs(d)) <= _ROUNDING:
            return PairedTest(0.0, 0.0, 0.0, n, 0.0, 1.0)
        return PairedTest(mean, mean, mean, n, math.copysign(math.inf, mean), _NAN)
    result = sps.ttest_rel(x, y)
    low, high = result.confidence_interval(confidence)
    return PairedTest(mean, float(low), float(high), n, float(result.statistic), float(result.pvalue))


def _correctness(values: ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(values)
    if x.dtype != np.bool_:
        raise ValueError(
            f"{name} must be a boolean array (True = image classified correctly), got dtype {x.dtype}; "
            "pass predictions == labels"
        )
    return x


def mcnemar_test(correct_a: ArrayLike, correct_b: ArrayLike, exact: bool | None = None) -> McNemar:
    """McNemar's test that methods a and b are right equally often on paired images.

    ``correct_a`` and ``correct_b`` are boolean arrays of the same shape, flat
    (images) or (seeds, images); the pairs ``(seed, image)`` are pooled.  Only
    discordant pairs count: ``a_only`` (a right, b wrong) and ``b_only``.  Under
    the null each discordant pair goes either way with probability 1/2.

    ``exact=None`` chooses: the exact two-sided binomial test when fewer than
    :data:`EXACT_BELOW` (25) pairs are discordant, otherwise the chi-square
    test with continuity correction ``(|a_only - b_only| - 1)^2 / (a_only + b_only)``
    on 1 degree of freedom (``statsmodels.stats.contingency_tables.mcnemar``;
    with ``a_only == b_only`` its statistic is ``1 / (a_only + b_only)``, so p is
    just below 1).  No discordant pair at all gives ``p = 1``.
    """
    x, y = _correctness(correct_a, "correct_a"), _correctness(correct_b, "correct_b")
    if x.shape != y.shape:
        raise ValueError(
            f"correct_a and correct_b must pair the same (seed, image) cells, got shapes {x.shape} and {y.shape}"
        )
    a_only, b_only = int(np.sum(x & ~y)), int(np.sum(~x & y))
    if exact is None:
        exact = a_only + b_only < EXACT_BELOW
    if a_only + b_only == 0:
        return McNemar(0, 0, 0.0, 1.0, exact)
    table = [[int(np.sum(x & y)), a_only], [b_only, int(np.sum(~x & ~y))]]
    result = sm_mcnemar(table, exact=exact, correction=True)
    return McNemar(a_only, b_only, float(result.statistic), float(result.pvalue), exact)


def holm(p_values: ArrayLike) -> np.ndarray:
    """Holm's step-down adjusted p-values (``statsmodels`` ``multipletests(method="holm")``).

    With the m finite p-values sorted, ``p_(1) <= ... <= p_(m)``, the adjusted
    value of ``p_(k)`` is ``max_{j <= k} min(1, (m - j + 1) p_(j))``; it controls the
    family-wise error rate without assumptions on how the tests depend on each
    other.  NaN entries (comparisons that could not be made) are returned as
    NaN and do not count in m.
    """
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"p_values must be 1-D, got shape {p.shape}")
    ok = ~np.isnan(p)
    if np.any((p[ok] < 0) | (p[ok] > 1)):
        raise ValueError(f"p-values must lie in [0, 1] (NaN for a missing test), got {p.tolist()}")
    adjusted = p.copy()
    if ok.any():
        adjusted[ok] = multipletests(p[ok], method="holm")[1]
    return adjusted


def _counts(indices: np.ndarray, size: int) -> np.ndarray:
    """How often each of ``0..size-1`` occurs in each row of ``indices``."""
    rows = len(indices)
    flat = (indices + size * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * size).reshape(rows, size)


def bootstrap_best(
    correct: Mapping[str, ArrayLike],
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    chunk: int = 256,
) -> dict[str, Ranking]:
    """Probability that each method is the best, and its rank interval, by a paired bootstrap.

    ``correct[method]`` is a boolean array (seeds, images); row i must be the
    same seed for every method, and column j the same test image.  Each
    replicate draws seeds with replacement and, independently, test images with
    replacement, the same draw for all methods (paired), and computes each
    method's accuracy on the resampled (seed, image) grid:
    ``acc_m = sum_s sum_i w_s v_i correct[m, s, i] / (seeds · images)`` with the
    draw counts ``w`` and ``v``.  Methods are ranked by accuracy, 1 = best.
    With few seeds the seed draws are coarse (3 seeds give 10 distinct
    resamples) and the bootstrap understates seed-to-seed spread by a factor
    about (n - 1) / n in variance; read P(best) and the rank interval as a
    guide next to the tests, not as a test.

    Ties: tied methods get the average of their ranks (``scipy.stats.rankdata``,
    "average"), and a win shared by k methods counts 1/k for each, so the
    ``p_best`` sum to 1.  The rank interval is the ``(1 - c)/2`` and ``(1 + c)/2``
    quantiles of the replicate ranks, and the median their 0.5 quantile, all
    with numpy's "inverted_cdf" method, so each is a rank some replicate had.

    Replicates are drawn ``chunk`` at a time: memory is the (methods · seeds,
    images) grid in float32, ``chunk · images`` draw counts and two
    (n_boot, methods) arrays.  The draws come from two streams derived from
    ``seed`` (one for seeds, one for images), so the result depends on ``seed``
    but not on ``chunk``.
    """
    _check_confidence(confidence)
    if n_boot < 1 or chunk < 1:
        raise ValueError(f"n_boot and chunk must be positive, got n_boot={n_boot}, chunk={chunk}")
    if not correct:
        raise ValueError("correct is empty; pass one (seeds, images) boolean array per method")
    names = list(correct)
    arrays = [_correctness(correct[name], f"correct[{name!r}]") for name in names]
    shape = arrays[0].shape
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"correct[{names[0]!r}] must have shape (seeds, images) with both at least 1, got {shape}")
    for name, array in zip(names, arrays):
        if array.shape != shape:
            raise ValueError(
                f"correct[{name!r}] has shape {array.shape}, correct[{names[0]!r}] {shape}; "
                "every method needs the same seeds and test images"
            )
    n_methods, (n_seeds, n_images) = len(names), shape
    grid = np.stack(arrays).reshape(n_methods * n_seeds, n_images).astype(np.float32)
    seed_rng, image_rng = np.random.default_rng(seed).spawn(2)
    ranks = np.empty((n_boot, n_methods))
    wins = np.empty((n_boot, n_methods))  # share of each replicate's win
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        w = _counts(seed_rng.integers(0, n_seeds, (size, n_seeds)), n_seeds)
        v = _counts(image_rng.integers(0, n_images, (size, n_images)), n_images).astype(np.float32)
        per_seed = (grid @ v.T).astype(np.float64).reshape(n_methods, n_seeds, size)  # exact integer counts
        hits = np.einsum("msb,bs->bm", per_seed, w)  # correct (seed, image) cells per replicate and method
        ranks[start : start + size] = sps.rankdata(-hits, method="average", axis=1)
        best = hits == hits.max(axis=1, keepdims=True)
        wins[start : start + size] = best / best.sum(axis=1, keepdims=True)
    p_best = wins.mean(axis=0)
    q = np.quantile(ranks, [(1 - confidence) / 2, 0.5, (1 + confidence) / 2], axis=0, method="inverted_cdf")
    return {name: Ranking(float(p_best[m]), float(q[0, m]), float(q[1, m]), float(q[2, m])) for m, name in enumerate(names)}


def _per_seed_correct(
    correct: Mapping[str, Mapping[int, ArrayLike]], seeds: Mapping[str, list[int]]
) -> dict[str, dict[int, np.ndarray]]:
    """Check ``correct`` against the seeds of the accuracy frame: same methods, same seeds, one test set."""
    missing = [m for m in seeds if m not in correct]
    if missing:
        raise ValueError(f"correct has no per-image predictions for {missing}; pass them for every method or correct=None")
    out: dict[str, dict[int, np.ndarray]] = {}
    n_images = None
    for method, method_seeds in seeds.items():
        if sorted(correct[method]) != method_seeds:
            raise ValueError(
                f"correct[{method!r}] has seeds {sorted(correct[method])}, the accuracy frame {method_seeds}; "
                "they must describe the same runs"
            )
        out[method] = {}
        for s in method_seeds:
            row = _correctness(correct[method][s], f"correct[{method!r}][{s}]")
            if row.ndim != 1 or (n_images is not None and len(row) != n_images):
                raise ValueError(
                    f"correct[{method!r}][{s}] has shape {row.shape}; "
                    f"every run needs one flag per image of the same test set ({n_images} images)"
                )
            n_images = len(row)
            out[method][s] = row
    return out


def compare_to_reference(
    accuracy: pd.DataFrame,
    reference: str,
    correct: Mapping[str, Mapping[int, ArrayLike]] | None = None,
    *,
    value: str = "value",
    confidence: float = 0.95,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """One line per method: mean ± CI over seeds, paired tests against ``reference``, P(best), rank interval.

    ``accuracy`` has columns ``method``, ``seed`` and ``value`` (one line per
    run; higher is better).  ``correct[method][seed]`` is the boolean vector of
    that run's per-image correctness on the shared test set, or ``None`` when
    there are no per-image predictions (McNemar and bootstrap columns are NaN).

    Columns: ``n, mean, ci_low, ci_high, half_width, sd`` (:func:`mean_ci`);
    against the reference, over the seeds both have (matched by seed number):
    ``n_paired, diff, diff_low, diff_high, t, p_t`` (:func:`paired_comparison`,
    diff = method - reference), ``only_method, only_reference, p_mcnemar``
    (:func:`mcnemar_test`: (seed, image) pairs only the method, or only the
    reference, gets right, pooled over those seeds);
    ``p_t_holm, p_mcnemar_holm``: Holm-adjusted within each family, the t tests
    one family and the McNemar tests another, since they answer different
    questions (other seeds vs. this test set) and each gets its own marker;
    ``sig_t, sig_mcnemar``: adjusted p < ``alpha``; ``p_best, rank_low,
    rank_median, rank_high`` (:func:`bootstrap_best` over the seeds every
    method has; NaN when there are none).  The reference line has NaN comparison columns and is not
    counted by Holm.  Rows keep the order of first appearance in ``accuracy``;
    ``attrs`` records ``reference``, ``confidence`` and ``alpha``.
    """
    needed = {"method", "seed", value}
    if not needed <= set(accuracy.columns):
        raise ValueError(f"accuracy needs columns {sorted(needed)}, got {list(accuracy.columns)}; name the value column with value=")
    missing = ~np.isfinite(accuracy[value].to_numpy(dtype=float))
    if missing.any():
        runs = accuracy.loc[missing, ["method", "seed"]].to_records(index=False).tolist()
        raise ValueError(f"accuracy has no finite {value} for (method, seed) {runs}; drop the runs without a result first")
    duplicated = accuracy.duplicated(["method", "seed"])
    if duplicated.any():
        runs = accuracy.loc[duplicated, ["method", "seed"]].to_records(index=False).tolist()
        raise ValueError(f"accuracy has more than one line for (method, seed) {runs}; keep one run per method and seed")
    methods = list(pd.unique(accuracy["method"]))
    if reference not in methods:
        raise ValueError(f"reference {reference!r} is not a method of the table; choose one of {methods}")
    by_method = {m: g.set_index("seed")[value].sort_index() for m, g in accuracy.groupby("method", sort=False)}
    seeds = {m: [int(s) for s in by_method[m].index] for m in methods}
    flags = _per_seed_correct(correct, seeds) if correct is not None else None
    ref = by_method[reference]

    rows = []
    for m in methods:
        ci = mean_ci(by_method[m].to_numpy(), confidence)
        row = {"method": m, "n": ci.n, "mean": ci.mean, "ci_low": ci.low, "ci_high": ci.high}
        row.update(half_width=ci.half_width, sd=ci.sd)
        if m != reference:
            shared = [s for s in seeds[m] if s in ref.index]
            test = paired_comparison(by_method[m].loc[shared].to_numpy(), ref.loc[shared].to_numpy(), confidence)
            row.update(n_paired=test.n, diff=test.diff_mean, diff_low=test.low, diff_high=test.high, t=test.t, p_t=test.p_value)
            if flags is not None and shared:
                mc = mcnemar_test(np.stack([flags[m][s] for s in shared]), np.stack([flags[reference][s] for s in shared]))
                row.update(only_method=mc.a_only, only_reference=mc.b_only, p_mcnemar=mc.p_value)
        rows.append(row)
    counts = ["n_paired", "only_method", "only_reference"]
    columns = ["n", "mean", "ci_low", "ci_high", "half_width", "sd", "n_paired", "diff", "diff_low", "diff_high", "t", "p_t"]
    table = pd.DataFrame(rows).set_index("method").reindex(columns=[*columns, "only_method", "only_reference", "p_mcnemar"])
    table[counts] = table[counts].astype("Int64")
    for family in ("t", "mcnemar"):
        table[f"p_{family}_holm"] = holm(table[f"p_{family}"].to_numpy(dtype=float))
        table[f"sig_{family}"] = table[f"p_{family}_holm"] < alpha
    ranking = ["p_best", "rank_low", "rank_median", "rank_high"]
    table[ranking] = _NAN
    common = sorted(set.intersection(*(set(s) for s in seeds.values()))) if flags is not None else []
    if common:
        grids = {m: np.stack([flags[m][s] for s in common]) for m in methods}
        for m, r in bootstrap_best(grids, n_boot=n_boot, seed=seed, confidence=confidence).items():
            table.loc[m, ranking] = [r.p_best, r.rank_low, r.rank_median, r.rank_high]
    table.attrs.update(reference=reference, confidence=confidence, alpha=alpha)
    return table


# ------------------------------------------------------------ table cells


def format_mean_ci(mean: float, half_width: float, n: int, digits: int = 2, show_n: bool = False, latex: bool = False) -> str:
    """``"38.65 ± 1.13"`` (mean ± half-width of its interval), ``"38.65 ± 1.13 (n=3)"`` with ``show_n``.

    Takes the fields of a :class:`MeanCI` or the ``mean, half_width, n`` columns
    of :func:`compare_to_reference`.  n = 1 shows the value alone (no interval),
    n = 0 shows ``n/a``; LaTeX writes ``$\\pm$``.
    """
    if n == 0:
        return "n/a"
    text = f"{mean:.{digits}f}"
    if n > 1:
        plus_minus = r"$\pm$" if latex else "±"
        text += f" {plus_minus} {half_width:.{digits}f}"
    return f"{text} (n={n})" if show_n else text


def format_diff(diff: float, low: float, high: float, digits: int = 2) -> str:
    """Signed difference with its interval, ``"+5.00 [+4.10, +5.90]"``; without an interval just ``"+5.00"``.

    Takes the fields of a :class:`PairedTest` or the ``diff, diff_low, diff_high``
    columns of :func:`compare_to_reference`; NaN gives ``n/a``.
    """
    if math.isnan(diff):
        return "n/a"
    text = f"{diff:+.{digits}f}"
    if math.isnan(low):
        return text
    return f"{text} [{low:+.{digits}f}, {high:+.{digits}f}]"


def format_p(p: float, digits: int = 3, latex: bool = False) -> str:
    """``"<0.001"`` below 10^-digits, else ``"0.023"``; NaN gives ``n/a``; LaTeX writes ``$<$``."""
    if math.isnan(p):
        return "n/a"
    floor = 10.0**-digits
    if p < floor:
        less = "$<$" if latex else "<"
        return f"{less}{floor:.{digits}f}"
    return f"{p:.{digits}f}"


def significance_marker(p_adjusted: float, alpha: float = 0.05, latex: bool = False) -> str:
    """``"*"`` (LaTeX ``"$^{*}$"``) when the adjusted p-value is below ``alpha``, else ``""`` (NaN included)."""
    if not p_adjusted < alpha:
        return ""
    return "$^{*}$" if latex else "*"
