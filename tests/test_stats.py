"""Statistics of the controlled comparison, checked against scipy/statsmodels on constructed data."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests

from bnnbench.stats import (
    EXACT_BELOW,
    bootstrap_best,
    compare_to_reference,
    format_diff,
    format_mean_ci,
    format_p,
    holm,
    mcnemar_test,
    mean_ci,
    paired_comparison,
    significance_marker,
)


def textbook_t_interval(x, confidence=0.95):
    x = np.asarray(x, dtype=float)
    half = sps.t.ppf((1 + confidence) / 2, len(x) - 1) * np.std(x, ddof=1) / math.sqrt(len(x))
    return x.mean() - half, x.mean() + half, half


def frames(correct: dict[str, np.ndarray]):
    """Accuracy frame (percent) and per-seed flags from (seeds, images) correctness arrays."""
    acc = pd.DataFrame(
        [(m, s, 100 * c[s].mean()) for m, c in correct.items() for s in range(len(c))], columns=["method", "seed", "value"]
    )
    return acc, {m: {s: c[s] for s in range(len(c))} for m, c in correct.items()}


# ------------------------------------------------------------ against scipy / statsmodels


@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_mean_ci_is_the_textbook_student_t_interval(confidence):
    x = [38.1, 39.4, 38.45, 40.0]
    low, high, half = textbook_t_interval(x, confidence)
    ci = mean_ci(x, confidence)
    assert (ci.n, ci.mean, ci.sd) == (4, pytest.approx(np.mean(x)), pytest.approx(np.std(x, ddof=1)))
    assert (ci.low, ci.high, ci.half_width) == (pytest.approx(low), pytest.approx(high), pytest.approx(half))
    assert ci.half_width > 1.0  # t_{3,0.975} = 3.18: much wider than the normal 1.96


def test_paired_comparison_is_the_t_test_of_the_differences():
    rng = np.random.default_rng(3)
    b = rng.normal(40, 1, 6)
    a = b + rng.normal(0.5, 0.8, 6)
    test = paired_comparison(a, b)
    reference = sps.ttest_rel(a, b)
    low, high, _ = textbook_t_interval(a - b)
    assert (test.n, test.diff_mean) == (6, pytest.approx(np.mean(a - b)))
    assert (test.t, test.p_value) == (pytest.approx(reference.statistic), pytest.approx(reference.pvalue))
    assert (test.low, test.high) == (pytest.approx(low), pytest.approx(high))
    assert paired_comparison(b, a).t == pytest.approx(-test.t)  # direction: a - b


def significant_case():
    """A correct on a superset of B's images, 5 points more on each seed (with a seed-dependent extra)."""
    rng = np.random.default_rng(0)
    seeds, images = 5, 2000
    b = rng.random((seeds, images)) < 0.6
    a = b.copy()
    for s in range(seeds):
        wrong = np.flatnonzero(~b[s])
        a[s, rng.choice(wrong, 100 + 4 * s, replace=False)] = True  # +5.0 .. +5.8 points
    return {"B": b, "A": a}


def test_known_significant_difference():
    correct = significant_case()
    acc, flags = frames(correct)
    table = compare_to_reference(acc, "B", flags, n_boot=300, seed=1)
    a, b = (acc[acc.method == m].sort_values("seed")["value"].to_numpy() for m in ("A", "B"))
    line = table.loc["A"]
    assert line["diff"] == pytest.approx(np.mean(a - b)) and 5.0 <= line["diff"] <= 5.8
    assert line["p_t"] == pytest.approx(sps.ttest_rel(a, b).pvalue) and line["p_t"] < 1e-4
    assert 0 < line["diff_low"] < line["diff_high"]  # the interval excludes 0
    assert line["p_t_holm"] == line["p_t"] and line["sig_t"]  # one comparison: Holm changes nothing
    assert (line["only_method"], line["only_reference"]) == (sum(100 + 4 * s for s in range(5)), 0)
    table_sm = [[int((correct["A"] & correct["B"]).sum()), 540], [0, int((~correct["A"] & ~correct["B"]).sum())]]
    assert line["p_mcnemar"] == pytest.approx(sm_mcnemar(table_sm, exact=False, correction=True).pvalue)
    assert line["p_mcnemar"] < 1e-10 and line["sig_mcnemar"]
    assert line["p_best"] == 1.0 and (line["rank_low"], line["rank_high"]) == (1.0, 1.0)
    assert table.loc["B", "p_best"] == 0.0 and table.loc["B", "rank_low"] == 2.0
    assert math.isnan(table.loc["B", "p_t"]) and not table.loc["B", "sig_t"]  # the reference is not compared


def null_case():
    """B is A with, per seed, some right and some wrong images swapped; the swaps balance over seeds."""
    rng = np.random.default_rng(1)
    a = rng.random((5, 2000)) < 0.7
    b = a.copy()
    for s, (lost, gained) in enumerate([(12, 9), (8, 11), (10, 10), (9, 12), (11, 8)]):  # per-seed diff +3 -3 0 -3 +3 images
        b[s, rng.choice(np.flatnonzero(a[s]), lost, replace=False)] = False
        b[s, rng.choice(np.flatnonzero(~a[s]), gained, replace=False)] = True
    return {"A": a, "B": b}


def test_known_null_difference():
    correct = null_case()
    acc, flags = frames(correct)
    table = compare_to_reference(acc, "A", flags, n_boot=300, seed=2)
    line = table.loc["B"]
    a, b = (acc[acc.method == m].sort_values("seed")["value"].to_numpy() for m in ("A", "B"))
    assert line["diff"] == pytest.approx(0.0, abs=1e-12) and line["p_t"] == pytest.approx(sps.ttest_rel(b, a).pvalue)
    assert line["p_t"] > 0.99 and line["diff_low"] < 0 < line["diff_high"] and not line["sig_t"]
    assert (line["only_method"], line["only_reference"]) == (50, 50)
    # 100 discordant pairs: chi-square with continuity correction, (|50 - 50| - 1)^2 / 100 on 1 df
    assert line["p_mcnemar"] == pytest.approx(sps.chi2.sf(0.01, 1)) and line["p_mcnemar"] > 0.9 and not line["sig_mcnemar"]
    assert 0.1 < line["p_best"] < 0.9 and table["p_best"].sum() == pytest.approx(1.0)
    assert (line["rank_low"], line["rank_high"]) == (1.0, 2.0)


def test_holm_by_hand_and_nan_passed_through():
    p = [0.01, 0.04, 0.03, float("nan"), 0.005]
    # m = 4 finite: sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, max(0.06, 1*0.04)
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, np.nan, 0.02], equal_nan=True)
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), multipletests([0.01, 0.04, 0.03, 0.005], method="holm")[1])
    assert np.isnan(holm([float("nan")] * 2)).all() and holm([]).shape == (0,)
    assert holm([0.6, 0.5]).tolist() == [1.0, 1.0]  # capped at 1
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.2, 1.5])


def counts_to_flags(a_only, b_only, both=5, neither=5):
    a = np.array([True] * (a_only + both) + [False] * (b_only + neither))
    b = np.array([False] * a_only + [True] * (both + b_only) + [False] * neither)
    return a, b


def test_mcnemar_exact_below_threshold_and_chi_square_above():
    small = mcnemar_test(*counts_to_flags(3, 10))
    assert (small.a_only, small.b_only, small.exact) == (3, 10, True)
    assert small.p_value == pytest.approx(sps.binomtest(3, 13, 0.5).pvalue)
    large = mcnemar_test(*counts_to_flags(30, 10))
    assert (large.a_only, large.b_only, large.exact) == (30, 10, False)
    assert large.statistic == pytest.approx((abs(30 - 10) - 1) ** 2 / 40)
    assert large.p_value == pytest.approx(sps.chi2.sf(9.025, 1))
    assert mcnemar_test(*counts_to_flags(12, EXACT_BELOW - 13)).exact  # 24 discordant
    assert not mcnemar_test(*counts_to_flags(12, EXACT_BELOW - 12)).exact  # 25 discordant
    forced = mcnemar_test(*counts_to_flags(3, 10), exact=False)
    assert not forced.exact and forced.p_value == pytest.approx(sps.chi2.sf((7 - 1) ** 2 / 13, 1))


def test_mcnemar_pools_seeds_and_handles_no_discordant_pair():
    rng = np.random.default_rng(4)
    a, b = rng.random((3, 50)) < 0.5, rng.random((3, 50)) < 0.5
    assert mcnemar_test(a, b) == mcnemar_test(a.ravel(), b.ravel())
    for exact in (None, True, False):
        same = mcnemar_test(a, a, exact=exact)
        assert (same.a_only, same.b_only, same.p_value) == (0, 0, 1.0)


def naive_bootstrap(correct, n_boot, seed):
    """One replicate at a time by indexing, from the same two documented streams."""
    grid = np.stack(list(correct.values()))
    _, seeds, images = grid.shape
    seed_rng, image_rng = np.random.default_rng(seed).spawn(2)
    ranks, wins = [], np.zeros(len(grid))
    for _ in range(n_boot):
        s, i = seed_rng.integers(0, seeds, seeds), image_rng.integers(0, images, images)
        acc = grid[:, s][:, :, i].mean(axis=(1, 2))
        ranks.append(sps.rankdata(-acc, method="average"))
        best = acc == acc.max()
        wins += best / best.sum()
    return np.array(ranks), wins / n_boot


def test_bootstrap_matches_one_replicate_at_a_time_and_is_deterministic():
    rng = np.random.default_rng(5)
    correct = {m: rng.random((3, 40)) < p for m, p in [("x", 0.6), ("y", 0.65), ("z", 0.7), ("w", 0.62)]}
    correct["x2"] = correct["x"].copy()  # bit-identical to x: always tied
    result = bootstrap_best(correct, n_boot=150, seed=7, chunk=64)
    ranks, p_best = naive_bootstrap(correct, 150, 7)
    for m, name in enumerate(correct):
        q = np.quantile(ranks[:, m], [0.025, 0.5, 0.975], method="inverted_cdf")
        assert result[name].p_best == pytest.approx(p_best[m])
        assert (result[name].rank_low, result[name].rank_median, result[name].rank_high) == tuple(q)
        assert 1 <= result[name].rank_low <= result[name].rank_median <= result[name].rank_high <= len(correct)
    assert result["x"] == result["x2"]  # ties: the same average rank, the win split
    assert sum(r.p_best for r in result.values()) == pytest.approx(1.0)
    assert bootstrap_best(correct, n_boot=150, seed=7, chunk=1) == result  # chunking does not change the draws
    assert bootstrap_best(correct, n_boot=150, seed=8) != result


def test_bootstrap_identical_methods_split_every_win():
    a = np.random.default_rng(6).random((2, 30)) < 0.5
    result = bootstrap_best({"a": a, "b": a.copy()}, n_boot=20)
    assert {(r.p_best, r.rank_low, r.rank_high) for r in result.values()} == {(0.5, 1.5, 1.5)}


# ------------------------------------------------------------ edge cases and bad input


def test_mean_ci_one_seed_no_seed_and_zero_variance():
    one = mean_ci([38.2])
    assert one.mean == 38.2 and one.n == 1 and all(math.isnan(v) for v in (one.low, one.high, one.half_width, one.sd))
    none = mean_ci([])
    assert none.n == 0 and all(math.isnan(v) for v in (none.mean, none.low, none.high, none.sd))
    flat = mean_ci([38.2, 38.2, 38.2])
    assert (flat.low, flat.high, flat.half_width, flat.sd) == (38.2, 38.2, 0.0, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        mean_ci([38.2, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=95)


def test_paired_comparison_degenerate_cases():
    a = np.array([38.65, 39.10, 38.20])
    same = paired_comparison(a, a.copy())
    assert (same.diff_mean, same.low, same.high, same.t, same.p_value) == (0.0, 0.0, 0.0, 0.0, 1.0)
    assert paired_comparison([0.3, 0.6], [0.1 + 0.2, 0.3 + 0.3]).p_value == 1.0  # zero up to rounding
    shifted = paired_comparison(a + 0.05, a)  # constant nonzero difference (up to rounding)
    assert shifted.diff_mean == pytest.approx(0.05) and shifted.low == shifted.high == shifted.diff_mean
    assert shifted.t == math.inf and math.isnan(shifted.p_value)
    assert paired_comparison(a - 0.05, a).t == -math.inf
    one = paired_comparison([40.0], [38.5])
    assert one.diff_mean == 1.5 and one.n == 1 and math.isnan(one.p_value) and math.isnan(one.low)
    assert paired_comparison([], []).n == 0 and math.isnan(paired_comparison([], []).diff_mean)
    with pytest.raises(ValueError, match="match them by seed"):
        paired_comparison([1.0, 2.0], [1.0])


def test_bad_correctness_arrays_are_rejected():
    a = np.ones((2, 5), dtype=bool)
    with pytest.raises(ValueError, match="boolean"):
        mcnemar_test(a.astype(int), a)
    with pytest.raises(ValueError, match="shapes"):
        mcnemar_test(a, a[:, :4])
    with pytest.raises(ValueError, match="same seeds and test images"):
        bootstrap_best({"a": a, "b": a[:, :4]})
    with pytest.raises(ValueError, match=r"\(seeds, images\)"):
        bootstrap_best({"a": a.ravel()})
    with pytest.raises(ValueError, match="empty"):
        bootstrap_best({})


def test_compare_matches_seeds_by_number():
    acc = pd.DataFrame(
        {"method": ["ref", "ref", "ref", "m", "m", "m"], "seed": [2, 0, 1, 3, 2, 1], "value": [40.0, 41.0, 39.0, 45.0, 42.5, 40.0]}
    )
    table = compare_to_reference(acc, "ref")
    line = table.loc["m"]
    assert (line["n"], line["n_paired"]) == (3, 2)  # seeds 1 and 2 are shared
    assert line["diff"] == pytest.approx(np.mean([40.0 - 39.0, 42.5 - 40.0]))
    assert line["p_t"] == pytest.approx(sps.ttest_rel([40.0, 42.5], [39.0, 40.0]).pvalue)
    assert list(table.index) == ["ref", "m"] and table.attrs["reference"] == "ref"
    assert table[["p_mcnemar", "p_best"]].isna().all().all()  # no per-image predictions


def test_compare_holm_families_are_separate():
    rng = np.random.default_rng(8)
    base = rng.random((4, 500)) < 0.6
    correct = {"ref": base}
    for name, extra in [("plus", 40), ("small", 8), ("same", 0)]:
        c = base.copy()
        for s in range(4):
            c[s, rng.choice(np.flatnonzero(~base[s]), extra + s, replace=False)] = True
        correct[name] = c
    acc, flags = frames(correct)
    table = compare_to_reference(acc, "ref", flags, n_boot=100)
    others = table.drop(index="ref")
    np.testing.assert_allclose(others["p_t_holm"], multipletests(others["p_t"], method="holm")[1])
    np.testing.assert_allclose(others["p_mcnemar_holm"], multipletests(others["p_mcnemar"], method="holm")[1])
    assert (others["sig_t"] == (others["p_t_holm"] < 0.05)).all()


def test_compare_rejects_bad_input():
    acc = pd.DataFrame({"method": ["a", "a", "b", "b"], "seed": [0, 1, 0, 1], "value": [1.0, 2.0, 1.5, 2.5]})
    flags = {m: {s: np.ones(4, dtype=bool) for s in (0, 1)} for m in "ab"}
    with pytest.raises(ValueError, match="choose one of"):
        compare_to_reference(acc, "c")
    with pytest.raises(ValueError, match="columns"):
        compare_to_reference(acc.rename(columns={"value": "top1"}), "a")
    assert compare_to_reference(acc.rename(columns={"value": "top1"}), "a", value="top1").loc["b", "diff"] == 0.5
    with pytest.raises(ValueError, match=r"no finite value for \(method, seed\) \[\('b', 1\)\]"):
        compare_to_reference(acc.assign(value=[1.0, 2.0, 1.5, float("nan")]), "a")
    with pytest.raises(ValueError, match="more than one line"):
        compare_to_reference(pd.concat([acc, acc.iloc[:1]]), "a")
    with pytest.raises(ValueError, match="no per-image predictions for \\['b'\\]"):
        compare_to_reference(acc, "a", {"a": flags["a"]})
    with pytest.raises(ValueError, match="same runs"):
        compare_to_reference(acc, "a", {"a": flags["a"], "b": {0: flags["b"][0]}})
    with pytest.raises(ValueError, match="same test set"):
        compare_to_reference(acc, "a", {"a": flags["a"], "b": {0: np.ones(4, bool), 1: np.ones(5, bool)}})
    with pytest.raises(ValueError, match="boolean"):
        compare_to_reference(acc, "a", {"a": flags["a"], "b": {0: np.ones(4), 1: np.ones(4)}})


# ------------------------------------------------------------ table cells


def test_formatters():
    ci = mean_ci([37.5, 38.9, 39.55])
    assert format_mean_ci(38.654, 1.1349, 3) == "38.65 ± 1.13"
    assert format_mean_ci(38.654, 1.1349, 3, show_n=True, latex=True) == r"38.65 $\pm$ 1.13 (n=3)"
    assert format_mean_ci(ci.mean, ci.half_width, ci.n, digits=1) == f"38.6 ± {ci.half_width:.1f}"
    assert format_mean_ci(38.2, float("nan"), 1, show_n=True) == "38.20 (n=1)"
    assert format_mean_ci(float("nan"), float("nan"), 0) == "n/a"
    assert format_diff(5.0, 4.1, 5.9) == "+5.00 [+4.10, +5.90]"
    assert format_diff(-0.25, float("nan"), float("nan"), digits=1) == "-0.2"
    assert format_diff(float("nan"), float("nan"), float("nan")) == "n/a"
    assert (format_p(0.0004), format_p(0.0004, latex=True)) == ("<0.001", "$<$0.001")
    assert (format_p(0.0234), format_p(1.0)) == ("0.023", "1.000")
    assert format_p(float("nan")) == "n/a" and format_p(0.0004, digits=4) == "0.0004"
    assert (significance_marker(0.01), significance_marker(0.01, latex=True)) == ("*", "$^{*}$")
    assert significance_marker(0.05) == significance_marker(float("nan")) == ""
    assert significance_marker(0.07, alpha=0.1) == "*"
