"""`bnnbench bench train --breakdown`: each method's profiled operators against fp's, on a batch of 2."""

from __future__ import annotations

import csv

import pytest

from bnnbench.cli import main as cli_main
from bnnbench.runners.bench_breakdown import operator_breakdown, step_totals
from bnnbench.runners.bench_train import StepSettings


@pytest.fixture(scope="module")
def rows():
    return operator_breakdown(StepSettings(batch=2), ["sign-ste"], rounds=1, steps=1)


def test_the_breakdown_finds_the_binarizer_and_the_convolutions_in_their_numbers(rows):
    """sign-STE's 18 binary layers each binarize a weight and an input (36 surrogate signs per step) and convolve
    through the conv of signs; fp has neither, and both run the 19 convolutions' backward."""
    ops = {(r["method"], r["operator"]): r for r in rows}
    surrogate = ops["sign-ste", "_SurrogateSign"]
    assert surrogate["calls_per_step"] == 36 and surrogate["fp_calls_per_step"] == 0
    assert surrogate["extra_ms_per_step"] == surrogate["ms_per_step"] > 0
    assert ops["sign-ste", "_ConvOfSigns"]["calls_per_step"] == 18
    assert ("fp", "_SurrogateSign") not in ops
    backward = ops["sign-ste", "aten::convolution_backward"]
    assert backward["calls_per_step"] == backward["fp_calls_per_step"] == 19
    assert backward["fp_ms_per_step"] == ops["fp", "aten::convolution_backward"]["ms_per_step"]
    relu = ops["sign-ste", "aten::threshold_backward"]  # fp's ReLU, which sign-STE's hardtanh replaces
    assert relu["calls_per_step"] == 0 and relu["extra_ms_per_step"] == -relu["fp_ms_per_step"] < 0


def test_a_methods_rows_come_most_costly_beyond_fp_first_and_sum_to_its_step(rows):
    mine = [r for r in rows if r["method"] == "sign-ste"]
    extras = [r["extra_ms_per_step"] for r in mine]
    assert extras == sorted(extras, reverse=True)
    totals = step_totals(rows)
    assert totals["sign-ste"] == pytest.approx(sum(r["ms_per_step"] for r in mine)) and totals["fp"] > 0


def test_no_rounds_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        operator_breakdown(StepSettings(batch=2), ["sign-ste"], rounds=0)


def test_bench_train_writes_the_breakdown_after_the_timings(tmp_path, capsys):
    timings, breakdown = tmp_path / "train.csv", tmp_path / "ops.csv"
    args = ["bench", "train", "--methods", "sign-ste", "--batch", "2", "--budget", "0.05", "--no-memory", "--no-amp"]
    assert cli_main([*args, "--csv", str(timings), "--breakdown", str(breakdown)]) == 0
    with breakdown.open() as f:
        written = list(csv.DictReader(f))
    assert {r["method"] for r in written} == {"fp", "sign-ste"} and {r["cpu"] for r in written} and timings.exists()
    assert "_SurrogateSign" in capsys.readouterr().out
