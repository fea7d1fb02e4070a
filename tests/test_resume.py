"""Resume: a run killed mid-epoch (SIGKILL, SIGTERM, Ctrl-C) continues from its last checkpoint and
ends with exactly the metrics and weights of an uninterrupted run (CPU, same seed)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from bnnbench.cli import main as cli_main
from bnnbench.runners.callbacks import EpochCallback
from bnnbench.runners.diagnostics import default_callbacks
from bnnbench.runners.train import TIMING_COLUMNS, resume_training, run_training
from tiny import TinyRun, tiny_recipe, tiny_run

ARGS = ["--net", "resnet20", "--data", "digits", "--recipe", "quick", "--train-subset", "96", "--test-subset", "40", "--batch-size", "16", "--epochs", "2,1"]


def config(out: Path, name: str) -> TinyRun:
    """The library twin of ARGS."""
    return tiny_run(tiny_recipe(train=96, test=40, epochs=(2, 1)), out, name=name)


def outcome(path: Path) -> tuple[list[dict[str, str]], dict, dict[str, torch.Tensor]]:
    """What must not depend on interruptions: metrics without timings, final.json without times, final weights."""
    with (path / "metrics.csv").open(newline="") as f:
        metrics = [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]
    final = json.loads((path / "final.json").read_text())
    final = {k: v for k, v in final.items() if k not in ("run_id", "train_time_s")}
    weights = torch.load(path / "stage2_last.pt", weights_only=True)["model"]
    return metrics, final, weights


def same_outcome(a: Path, b: Path) -> None:
    (metrics_a, final_a, weights_a), (metrics_b, final_b, weights_b) = outcome(a), outcome(b)
    assert metrics_a == metrics_b
    assert final_a == final_b
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run (in process, one thread like the subprocesses)."""
    out = tmp_path_factory.mktemp("reference")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(*config(out, "reference"), quiet=True)
    finally:
        torch.set_num_threads(before)
    return out / "runs" / "reference"


# ---------------------------------------------------------------- real interruptions
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: signal.Signals(s).name)
def test_interrupted_mid_epoch_then_resumed_matches_an_uninterrupted_run(signum, tmp_path, reference, capsys):
    out = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "bnnbench.cli", "run", *ARGS, "--out", str(out), "--name", "victim", "--quiet"]
    # a shell that starts background jobs without job control hands them SIGINT ignored; the victim must see it
    restore = (lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if signum == signal.SIGINT else None
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=restore)
    checkpoint = out / "runs" / "victim" / "stage1_last.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert checkpoint.exists(), proc.communicate()
    proc.send_signal(signum)  # epoch 2 of stage 1 is under way
    _, stderr = proc.communicate(timeout=60)

    path = out / "runs" / "victim"
    assert proc.returncode == (-signal.SIGKILL if signum == signal.SIGKILL else 128 + signum)
    if signum != signal.SIGKILL:
        assert f"interrupted ({signal.Signals(signum).name})" in stderr and f"bnnbench run --resume {path}" in stderr
    assert not (path / "final.json").exists() and not list(path.glob("stage2_*"))
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
    assert not [p for p in path.iterdir() if p.name.endswith(".tmp")]

    assert cli_main(["run", "--resume", str(path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "stage 1 epoch 1/2" not in printed and "stage 1 epoch 2/2" in printed  # epoch 1 was not redone
    same_outcome(path, reference)


# ---------------------------------------------------------------- resume points, in process
class Snapshot(EpochCallback):
    """Copies the run directory at the start of chosen epochs: exactly what a kill during that epoch leaves."""

    def __init__(self, out: Path, at: list[tuple[int, int]]) -> None:
        self.out, self.at = out, at

    def on_epoch_start(self, stage: int, epoch: int, model: nn.Module) -> None:
        if (stage, epoch) in self.at:
            run_dir = next((self.out / "runs").iterdir())
            shutil.copytree(run_dir, self.out / f"killed-in-{stage}-{epoch}")


def test_resume_from_every_epoch_boundary_and_with_a_metrics_row_ahead_of_its_checkpoint(tmp_path, reference):
    out = tmp_path / "results"
    snapshot = Snapshot(out, at=[(1, 1), (1, 2), (2, 1)])
    run_training(*config(out, "full"), quiet=True, callbacks=[*default_callbacks(), snapshot])
    same_outcome(out / "runs" / "full", reference)  # a callback that reports nothing changes nothing

    # killed after metrics.csv got the row of an epoch but before that epoch's checkpoint was written
    ahead = out / "killed-in-1-2"
    shutil.copy(out / "runs" / "full" / "metrics.csv", ahead / "metrics.csv")
    for name in ("killed-in-1-1", "killed-in-1-2", "killed-in-2-1"):
        resume_training(out / name, quiet=True)
        same_outcome(out / name, reference)


def test_resuming_a_finished_run_changes_nothing(tmp_path, reference, capsys):
    path = tmp_path / "done"
    shutil.copytree(reference, path)
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert cli_main(["run", "--resume", str(path)]) == 0
    assert "already finished" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before
