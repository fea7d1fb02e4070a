"""`bnnbench report`: one DataFrame line per run (finished, unfinished, diverged), CSV and Parquet export."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bnnbench.cli import main as cli_main
from bnnbench.runners.diagnostics import default_callbacks
from bnnbench.runners.report import export, runs_frame
from bnnbench.runners.train import run_training
from tiny import tiny_recipe, tiny_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two finished tiny runs (biper, sign-ste) plus an unfinished and a diverged copy of the first."""
    out = tmp_path_factory.mktemp("report") / "results"
    recipe = tiny_recipe(epochs=(2, 1))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method, name in (("biper", "a-biper"), ("sign-ste", "b-sign")):
            cfg = tiny_run(recipe, out, method=method, name=name, hparams={"w0": 10.0} if method == "biper" else {})
            run_training(*cfg, quiet=True, callbacks=default_callbacks())
    finally:
        torch.set_num_threads(before)
    root = out / "runs"
    for name, failure in (("c-unfinished", None), ("d-diverged", {"error": "the training loss is nan", "type": "TrainingDiverged"})):
        shutil.copytree(root / "a-biper", root / name)
        (root / name / "final.json").unlink()
        if failure:
            (root / name / "failure.json").write_text(json.dumps(failure))
    (root / "not-a-run").mkdir()  # no config.json: skipped
    return root


def test_one_line_per_run_with_config_final_and_stage_metrics(runs):
    frame = runs_frame(runs).set_index("run_id")
    assert sorted(frame.index) == ["a-biper", "b-sign", "c-unfinished", "d-diverged"]
    assert frame["status"].to_dict() == {"a-biper": "finished", "b-sign": "finished", "c-unfinished": "unfinished", "d-diverged": "diverged"}
    assert frame.loc["a-biper", "spec.model.method"] == "biper" and frame.loc["a-biper", "spec.model.hparams.w0"] == 10.0
    assert frame.loc["a-biper", "spec.model.act_hparams.w0"] == 10.0 and frame.loc["b-sign", "spec.recipe.stage1.epochs"] == 2
    assert frame.loc["d-diverged", "failure"] == "the training loss is nan"
    for run_id in ("a-biper", "b-sign"):
        final = json.loads((runs / run_id / "final.json").read_text())
        metrics = pd.read_csv(runs / run_id / "metrics.csv")
        assert frame.loc[run_id, "final_test_top1"] == final["final_test_top1"]
        stage1 = metrics[metrics["stage"] == 1]
        assert frame.loc[run_id, "stage1_epochs"] == 2
        assert frame.loc[run_id, "stage1_best_top1"] == stage1["test_top1"].max()
        assert frame.loc[run_id, "stage1_best_epoch"] == stage1.loc[stage1["test_top1"].idxmax(), "epoch"]
        for column in ("test_top1", "qe", "qe_l1_upstream", "laplace_b", "flip_rate"):
            assert frame.loc[run_id, f"stage1_last_{column}"] == stage1[stage1["epoch"] == 2][column].item()
            assert frame.loc[run_id, f"stage2_last_{column}"] == metrics[metrics["stage"] == 2][column].item()
    assert pd.isna(frame.loc["c-unfinished", "final_test_top1"])
    assert frame.loc["c-unfinished", "stage2_last_test_top1"] == frame.loc["a-biper", "stage2_last_test_top1"]  # its log is there


def test_csv_export_round_trips(runs, tmp_path):
    frame = runs_frame(runs)
    (path,) = export(frame, csv=tmp_path / "out" / "runs.csv")
    back = pd.read_csv(path)
    assert back.shape == frame.shape and list(back["run_id"]) == list(frame["run_id"])
    assert back["final_test_top1"].equals(frame["final_test_top1"])


def test_parquet_export(runs, tmp_path):
    pytest.importorskip("pyarrow")
    frame = runs_frame(runs)
    (path,) = export(frame, parquet=tmp_path / "runs.parquet")
    back = pd.read_parquet(path)
    assert list(back["run_id"]) == list(frame["run_id"])
    assert back["stage1_last_qe"].equals(frame["stage1_last_qe"])


def test_parquet_without_pyarrow_is_a_clear_error(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "fastparquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        export(runs_frame(runs), parquet=tmp_path / "runs.parquet")
    assert not (tmp_path / "runs.parquet").exists()


def test_cli_report(runs, tmp_path, capsys):
    assert cli_main(["report", "--runs", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "a-biper" in out and "diverged" in out and "4 runs" in out
    assert cli_main(["report", "--runs", str(runs), "--csv", str(tmp_path / "r.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "r.csv")) == 4
    assert cli_main(["report", "--runs", str(tmp_path / "none")]) == 0
    assert "no runs in" in capsys.readouterr().out


def test_report_statistics_compare_experiments_with_scipy_and_statsmodels(runs, capsys):
    """`bnnbench report --stats`: runs grouped by spec minus seed, each against a reference, McNemar on the predictions."""
    from statsmodels.stats.contingency_tables import mcnemar

    from bnnbench.runners.catalog import scan_runs
    from bnnbench.runners.report import statistics_frame

    records = [r for r in scan_runs(runs) if r.run_id in ("a-biper", "b-sign")]
    table = statistics_frame(records, reference="sign-ste")
    assert table.attrs["reference"].startswith("resnet20 sign-ste") and len(table) == 2
    finals = {r.run_id: r.final["final_test_top1"] for r in records}
    biper = next(label for label in table.index if "biper" in label)
    assert table.loc[biper, "diff"] == pytest.approx(finals["a-biper"] - finals["b-sign"])
    flags = {}
    for name in ("a-biper", "b-sign"):
        saved = np.load(runs / name / "predictions.npz")
        flags[name] = saved["predictions"] == saved["labels"]
    a, b = flags["a-biper"], flags["b-sign"]
    counts = [[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]]
    assert table.loc[biper, "p_mcnemar"] == pytest.approx(mcnemar(counts, exact=True).pvalue)
    assert table["p_best"].sum() == pytest.approx(1.0)
    assert cli_main(["report", "--runs", str(runs), "--stats", "--reference", "sign-ste", "--match", "quick"]) == 0
    assert "reference: resnet20 sign-ste" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no experiment matches"):
        statistics_frame(records, reference="nothing-like-this")
