"""The per-epoch diagnostics callback: columns in metrics.csv and layers.csv, values equal to
bnnbench.metrics on the saved weights, known flips and gradient norms, no effect on training."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

import bnnbench
from bnnbench.metrics import model_diagnostics
from bnnbench.runners.diagnostics import LAYER_COLUMNS, MODEL_COLUMNS, DiagnosticsCallback, GradNormAccumulator, default_callbacks
from bnnbench.runners.results import load_checkpoint
from bnnbench.runners.train import TIMING_COLUMNS, run_training
from tiny import TinyRun, tiny_recipe, tiny_run


def tiny_config(out: Path, method: str = "recu") -> TinyRun:
    """resnet20 on 48 digits, 1 + 1 epochs of 3 steps."""
    return tiny_run(tiny_recipe(), out, method=method)


def only_run(out: Path) -> Path:
    (path,) = (out / "runs").iterdir()
    return path


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("diag") / "results"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(*tiny_config(out), quiet=True, callbacks=default_callbacks())
    finally:
        torch.set_num_threads(before)
    return only_run(out)


def test_metrics_and_layers_columns_are_present_and_finite(logged_run):
    metrics = pd.read_csv(logged_run / "metrics.csv")
    layers = pd.read_csv(logged_run / "layers.csv")
    assert list(metrics["stage"]) == [1, 2]
    for column in MODEL_COLUMNS:
        assert column in metrics.columns, column
        assert metrics[column].map(math.isfinite).all(), column
    assert set(LAYER_COLUMNS) | {"stage", "epoch"} == set(layers.columns)
    numeric = layers.drop(columns=["layer"])
    assert numeric.map(math.isfinite).all().all()
    model = bnnbench.build_model("resnet20", "recu", num_classes=10)
    names = [name for name, _ in bnnbench.binary_layers(model)]
    for stage in (1, 2):
        assert list(layers[layers["stage"] == stage]["layer"]) == names
    assert (layers["grad_norm_last"] > 0).all() and (layers["grad_norm_mean"] > 0).all()
    assert layers["flip_rate"].between(0, 1).all() and layers["dead_share"].between(0, 1).all()


def test_model_columns_aggregate_the_layer_rows(logged_run):
    metrics = pd.read_csv(logged_run / "metrics.csv").set_index("stage")
    layers = pd.read_csv(logged_run / "layers.csv")
    for stage, rows in layers.groupby("stage"):
        row = metrics.loc[stage]
        assert row["qe"] == pytest.approx(rows["qe"].mean())
        assert row["qe_l1_upstream"] == pytest.approx(rows["qe_l1_upstream"].sum())  # upstream sums over layers
        assert row["laplace_b"] == pytest.approx(rows["laplace_b"].mean())
        assert row["laplace_b_sum_upstream"] == pytest.approx(rows["laplace_b"].sum())
        assert row["grad_norm_last"] == pytest.approx(math.sqrt((rows["grad_norm_last"] ** 2).sum()))
        assert row["flip_rate"] == pytest.approx((rows["flip_rate"] * rows["numel"]).sum() / rows["numel"].sum())


def test_logged_values_equal_metrics_on_the_saved_weights(logged_run):
    """The end-of-stage values are bnnbench.metrics on the checkpoint of that epoch."""
    layers = pd.read_csv(logged_run / "layers.csv")
    for stage in (1, 2):
        state = load_checkpoint(logged_run / f"stage{stage}_last.pt")
        model = bnnbench.build_model("resnet20", "recu", num_classes=10, stage=stage)
        model.load_state_dict(state["model"])
        bnnbench.set_progress(model, 0.0)  # 1-epoch stages: progress 0 throughout
        expected = model_diagnostics(model, seed=1000 * stage + 1)
        logged = layers[layers["stage"] == stage].set_index("layer")
        for d in expected.layers:
            for metric in ("qe", "qe_relative", "gamma", "qe_l1_upstream", "laplace_b", "dead_share"):
                assert logged.loc[d.layer, metric] == pytest.approx(getattr(d, metric), rel=1e-6), (stage, d.layer, metric)


def test_callback_does_not_change_training(logged_run, tmp_path):
    """Same seed without the callback: every training and test number is identical."""
    run_training(*tiny_config(tmp_path / "results"), quiet=True, callbacks=())
    plain = pd.read_csv(only_run(tmp_path / "results") / "metrics.csv")
    logged = pd.read_csv(logged_run / "metrics.csv")
    assert not (only_run(tmp_path / "results") / "layers.csv").exists()
    shared = [c for c in plain.columns if c not in TIMING_COLUMNS]
    assert set(logged.columns) == set(plain.columns) | set(MODEL_COLUMNS)
    pd.testing.assert_frame_equal(plain[shared], logged[shared])


def test_flip_rate_of_known_sign_changes():
    model = bnnbench.build_model("resnet20", "sign-ste", num_classes=10)
    callback = DiagnosticsCallback()
    callback.on_epoch_start(2, 1, model)
    (first, layer), *others = list(bnnbench.binary_layers(model))
    with torch.no_grad():
        flat = layer.weight.view(-1)
        flat[:100] = torch.where(flat[:100] >= 0, -1.0, 1.0)  # every one of the first 100 signs changes
    report = callback.on_epoch_end(2, 1, model)
    rates = {row["layer"]: row["flip_rate"] for row in report.layers}
    assert rates[first] == pytest.approx(100 / layer.weight.numel())
    assert all(rates[name] == 0 for name, _ in others)
    total = sum(l.weight.numel() for _, l in bnnbench.binary_layers(model))
    assert report.columns["flip_rate"] == pytest.approx(100 / total)


def test_grad_norms_are_averaged_over_the_steps():
    model = bnnbench.build_model("resnet20", "sign-ste", num_classes=10)
    layers = [l for _, l in bnnbench.binary_layers(model)]
    accumulator = GradNormAccumulator()
    for value in (1.0, 3.0):  # step 1: every gradient entry 1, step 2: every entry 3
        for l in layers:
            l.weight.grad = torch.full_like(l.weight, value)
        accumulator.add(model)
    per_layer, global_mean = accumulator.means()
    sizes = [l.weight.numel() for l in layers]
    assert per_layer == pytest.approx([2.0 * math.sqrt(n) for n in sizes])  # mean of 1 sqrt(n) and 3 sqrt(n)
    assert global_mean == pytest.approx(2.0 * math.sqrt(sum(sizes)))
    assert GradNormAccumulator().means() == ([], pytest.approx(math.nan, nan_ok=True))
