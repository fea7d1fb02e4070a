"""Nothing a user does blocks the suite or loses a finished result (issue 16): broken run folders are
skipped by name, resume repairs a cut metrics.csv from the checkpoints, an interrupt never deletes a
finished epoch, a run directory is trained by one process at a time, and files respect the umask."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import stat
import warnings
from pathlib import Path

import pytest
import torch
from bnnbench.runners import rundir
from bnnbench.runners.callbacks import EpochCallback
from bnnbench.runners.catalog import BrokenRunWarning
from bnnbench.runners.diagnostics import default_callbacks
from bnnbench.runners.experiments import execute, plan
from bnnbench.runners.locks import RUN_DIRECTORY_LOCK
from bnnbench.runners.tables import describe_plan, load_spec
from bnnbench.runners.report import runs_frame
from bnnbench.runners.significance import load_correct
from bnnbench.runners.spec import RunSpec
from bnnbench.runners.train import TIMING_COLUMNS, RunInterrupted, resume_training, run_training
from filelock import FileLock
from tiny import TinyRun, tiny_recipe, tiny_run
from torch import nn

from bnnbench.cli import format_warning
from bnnbench.cli import main as cli_main
from bnnbench.data.cache import atomic_directory
from bnnbench.io import atomic_write, write_text

SPEC_TOML = """
number = "robust"
title = "Robustness demo"
data = "digits"

[[columns]]
key = "top1"
label = "Top-1 (%)"

[[rows]]
net = "resnet20"
label = "fp"
wa = "32/32"
method = "fp"
"""


def recipe():
    """2 + 1 epochs of two 16-image batches: about two seconds per run."""
    return tiny_recipe(train=32, test=20, epochs=(2, 1))


def config(out: Path, name: str) -> TinyRun:
    return tiny_run(recipe(), out, method="fp", name=name, tensorboard=False)


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def untimed(table: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in table]


class Snapshot(EpochCallback):
    """Copies the run directory at the start of chosen epochs: what a kill during that epoch leaves."""

    def __init__(self, out: Path, at: list[tuple[int, int]]) -> None:
        self.out, self.at = out, at

    def on_epoch_start(self, stage: int, epoch: int, model: nn.Module) -> None:
        if (stage, epoch) in self.at:
            shutil.copytree(self.out / "runs" / "reference", self.out / f"killed-in-{stage}-{epoch}")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """One uninterrupted run (``runs/reference``) and copies of it killed in epoch (1, 2) and (2, 1)."""
    out = tmp_path_factory.mktemp("made")
    torch.set_num_threads(1)
    run_training(*config(out, "reference"), quiet=True, callbacks=[*default_callbacks(), Snapshot(out, [(1, 2), (2, 1)])])
    return out


def copy(made: Path, name: str, to: Path) -> Path:
    return Path(shutil.copytree(made / name, to))


# ---------------------------------------------------------------- 1. one broken run folder blocks nothing
def break_runs(made: Path, runs: Path) -> dict[str, Path]:
    """A good finished run beside one broken copy per way of breaking it; the file each one breaks."""
    copy(made, "runs/reference", runs / "good")
    broken = {
        "bad-final": ("final.json", '{"run_id":\n'),
        "cut-metrics": ("metrics.csv", None),
        "empty-metrics": ("metrics.csv", ""),
        "config-list": ("config.json", "[1, 2]\n"),
    }
    files = {}
    for name, (file, text) in broken.items():
        path = copy(made, "runs/reference", runs / name) / file
        path.write_text(path.read_text()[:-30] if text is None else text)
        files[name] = path
    return files


def test_report_and_table_skip_broken_run_folders_naming_the_file(made, tmp_path, capsys):
    runs = tmp_path / "results" / "runs"
    files = break_runs(made, runs)
    with pytest.warns(BrokenRunWarning) as caught:
        frame = runs_frame(runs)
    assert list(frame["run_id"]) == ["good"]
    said = [str(w.message) for w in caught]
    for file in files.values():
        assert any(str(file) in text for text in said), (file, said)

    spec = tmp_path / "robust.toml"
    spec.write_text(SPEC_TOML)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert cli_main(["table", str(spec), "--out", str(tmp_path / "results"), "--dry-run"]) == 0
        assert cli_main(["table", str(spec), "--out", str(tmp_path / "results"), "--no-run"]) == 0
        assert cli_main(["report", "--out", str(tmp_path / "results")]) == 0
    assert "good" in capsys.readouterr().out


def test_the_command_line_shows_a_damaged_folder_as_one_line():
    assert format_warning(BrokenRunWarning("skipping run directory x"), BrokenRunWarning, "catalog.py", 1) == "bnnbench: warning: skipping run directory x\n"
    assert "UserWarning" in format_warning(UserWarning("other"), UserWarning, "elsewhere.py", 1)


@pytest.mark.parametrize("text", ['{"spec":', "[]", '{"spec": {}}'], ids=["cut", "list", "no-keys"])
def test_resume_of_a_folder_with_a_broken_config_names_the_file(made, tmp_path, capsys, text):
    run = copy(made, "killed-in-1-2", tmp_path / "run")
    (run / "config.json").write_text(text)
    assert cli_main(["run", "--resume", str(run), "--quiet"]) == 2
    assert str(run / "config.json") in capsys.readouterr().err


def test_resume_from_a_checkpoint_of_another_model_names_the_weights_and_the_file(made, tmp_path, capsys):
    """A checkpoint whose model state does not fit (here: a weight renamed, as an older bnnbench might
    have written it) stops the resume in one line naming the file and the weights, and changes nothing."""
    run = copy(made, "killed-in-2-1", tmp_path / "run")
    checkpoint = run / "stage2_last.pt"
    if not checkpoint.is_file():
        checkpoint = run / "stage1_last.pt"
    state = torch.load(checkpoint, weights_only=True)
    first = next(iter(state["model"]))
    state["model"]["renamed." + first] = state["model"].pop(first)
    torch.save(state, checkpoint)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert cli_main(["run", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(checkpoint) in err and f"missing {first}" in err and "Traceback" not in err
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert str(checkpoint).encode() in after.pop("failure.json")  # the run says why it stopped; nothing else changed
    assert after == before


def test_unreadable_predictions_are_left_out_with_a_warning(made, tmp_path):
    run = copy(made, "runs/reference", tmp_path / "run")
    (run / "predictions.npz").write_bytes(b"not a zip file")
    with pytest.warns(BrokenRunWarning, match=str(run / "predictions.npz")):
        assert load_correct(run) is None


# ---------------------------------------------------------------- 4. resume after a cut metrics.csv
@pytest.mark.parametrize("cut", [30, 1], ids=["mid-row", "last-character"])
def test_resume_repairs_a_metrics_csv_cut_in_its_last_row(made, tmp_path, cut):
    run = copy(made, "killed-in-2-1", tmp_path / "run")
    metrics = run / "metrics.csv"
    metrics.write_text(metrics.read_text()[:-cut])  # inside the row of stage 1 epoch 2, the latest checkpoint's
    with pytest.warns(BrokenRunWarning, match=rf"{metrics}: restored the row of stage 1 epoch 2"):
        resume_training(run, quiet=True)
    reference = rows(made / "runs" / "reference" / "metrics.csv")
    got = rows(metrics)
    assert untimed(got) == untimed(reference)
    assert got[:2] == reference[:2]  # the repaired row is the checkpoint's own, timings included


def test_resume_refuses_a_metrics_csv_missing_rows_no_checkpoint_holds(made, tmp_path):
    run = copy(made, "killed-in-2-1", tmp_path / "run")
    metrics = run / "metrics.csv"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text(lines[0] + lines[2])  # the row of stage 1 epoch 1 is gone
    (run / "stage1_best.pt").unlink(missing_ok=True)
    before = metrics.read_bytes()
    with pytest.raises(ValueError, match=rf"{metrics}.*stage 1 epoch 1"):
        resume_training(run, quiet=True)
    assert metrics.read_bytes() == before
    assert cli_main(["run", "--resume", str(run), "--quiet"]) == 2  # a clear error, again and again


# ---------------------------------------------------------------- 5. an interrupt keeps finished work
@pytest.mark.parametrize(("interrupt", "status"), [(KeyboardInterrupt(), 130), (RunInterrupted(signal.SIGTERM), 143)], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_while_the_first_last_checkpoint_is_written_keeps_the_finished_epoch(made, tmp_path, monkeypatch, capsys, interrupt, status):
    save = rundir.save_checkpoint

    def interrupted_at_first_last(path, state):
        """Epoch 1's stage1_best.pt is written whole, its stage1_last.pt only half."""
        if path.name != "stage1_last.pt":
            return save(path, state)

        def half(f):
            f.write(b"\0" * 1000)
            raise interrupt

        atomic_write(path, half)

    monkeypatch.setattr(rundir, "save_checkpoint", interrupted_at_first_last)
    out = tmp_path / "results"
    args = ["run", "--data", "digits", "--net", "resnet20", "--method", "fp", "--recipe", "quick", "--train-subset", "32"]
    args += ["--test-subset", "20", "--batch-size", "16", "--epochs", "2,1", "--no-tensorboard", "--out", str(out), "--name", "cut", "--quiet"]
    assert cli_main(args) == status
    assert "finished epochs are saved" in capsys.readouterr().err
    run = out / "runs" / "cut"
    assert (run / "stage1_best.pt").is_file() and not list(run.glob("*.tmp"))
    monkeypatch.setattr(rundir, "save_checkpoint", save)
    assert cli_main(["run", "--resume", str(run), "--quiet"]) == 0
    assert "stage 1 epoch 1/2" not in capsys.readouterr().out  # resumed from the best checkpoint of epoch 1
    assert untimed(rows(run / "metrics.csv")) == untimed(rows(made / "runs" / "reference" / "metrics.csv"))


def test_resume_removes_the_temporary_files_a_kill_left(made, tmp_path):
    run = copy(made, "killed-in-1-2", tmp_path / "run")
    stale = run / ".stage1_last.pt.k2x9wq1a.tmp"
    stale.write_bytes(b"\0" * 1000)
    mine = run / "notes.tmp"
    mine.write_text("not bnnbench's")
    resume_training(run, quiet=True)
    assert not stale.exists() and mine.exists()


# ---------------------------------------------------------------- 6. one process per run directory
def test_a_run_whose_name_another_process_just_took_gets_the_next_name(tmp_path, monkeypatch):
    cfg = tiny_run(recipe(), tmp_path / "results", method="fp", tensorboard=False)
    taken = Path(cfg.out) / "runs" / "taken"
    monkeypatch.setattr(rundir, "choose_path", lambda spec, machine: taken)
    taken.mkdir(parents=True)  # made by another process between choosing the name and creating it
    run_training(*cfg, quiet=True)
    assert (taken.with_name("taken-2") / "final.json").is_file() and not any(taken.iterdir())


def test_resume_of_a_run_another_process_holds_is_refused(made, tmp_path, capsys):
    run = copy(made, "killed-in-1-2", tmp_path / "run")
    with FileLock(run / RUN_DIRECTORY_LOCK):
        assert cli_main(["run", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "another process is training it" in err and f"bnnbench run --resume {run}" in err
    assert not (run / "stage2_last.pt").exists()


def test_table_skips_a_run_another_process_holds(made, tmp_path):
    cfg = config(tmp_path / "results", "unused")
    run = copy(made, "killed-in-2-1", Path(cfg.out) / "runs" / "held")
    template = RunSpec.make("digits", net="resnet20", method="fp")
    runs = plan([template], [0], recipe(), cfg.machine)
    assert runs.jobs[0].status == "unfinished"
    said: list[str] = []
    with FileLock(run / RUN_DIRECTORY_LOCK):
        execute(runs.jobs, quiet=True, log=said.append)
    assert not (run / "stage2_last.pt").exists() and runs.jobs[0].status == "unfinished"
    assert any("another process" in line and str(run) in line for line in said), said
    assert sorted(p.name for p in (Path(cfg.out) / "runs").iterdir()) == ["held"]
    (tmp_path / "robust.toml").write_text(SPEC_TOML)
    spec = load_spec(str(tmp_path / "robust.toml"))
    with FileLock(run / RUN_DIRECTORY_LOCK):  # the dry run says so before anything is tried
        lines = describe_plan(spec, plan(spec.runs, [0], recipe(), cfg.machine), 1)
    assert any(f"resume {run}: another process is training it now (this command would leave it to that process)" in line for line in lines), lines


# ---------------------------------------------------------------- 10. the umask decides who reads
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_and_cache_folders_respect_the_umask(tmp_path, umask):
    before = os.umask(umask)
    try:
        written = write_text(tmp_path / "file.txt", "x")
        with atomic_directory(tmp_path / "entry") as folder:
            (folder / "a.npy").write_bytes(b"")
    finally:
        os.umask(before)
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "entry").stat().st_mode) == 0o777 & ~umask


def test_a_process_records_the_commit_of_the_code_it_imported_not_the_trees_later_head(monkeypatch):
    """A pool worker trains several runs with the code it started with: its config.json files name the commit it read
    at its first run, even after the tree moved on (a campaign commits its finished runs as they finish)."""
    from bnnbench.runners import results

    heads = iter([{"commit": "a" * 40, "dirty": False}, {"commit": "b" * 40, "dirty": False}])
    monkeypatch.setattr(results, "git_commit", lambda path=None: next(heads))
    results.source_commit.cache_clear()
    try:
        assert results.source_commit()["commit"] == "a" * 40
        assert results.source_commit()["commit"] == "a" * 40  # HEAD is now b...: not read again
    finally:
        results.source_commit.cache_clear()
