"""Where table runs train: threads per worker, --jobs auto, the per-run lock shared by commands,
submitit's local executor running a tiny table, and the CLI options' errors."""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock, Timeout

from bnnbench.cli import main as cli_main
from bnnbench.commands import table as table_command
from bnnbench.errors import ConfigError
from bnnbench.runners.concurrency import CUDA_CONTEXT_MIB, auto_jobs, jobs_from_memory
from bnnbench.runners.executors import InProcess, ProcessPool, Submitit, available_cores, worker_threads
from bnnbench.runners.experiments import execute, plan
from bnnbench.runners.locks import lock_path, run_lock
from bnnbench.runners.spec import Machine, RunSpec
from bnnbench.runners.tables import load_spec, make_table
from tiny import tiny_recipe

GIB = 2**30
SPEC = """
number = "exec"
title = "Executors on digits"
data = "digits"
source = "a test"

[[columns]]
key = "top1"
label = "Top-1 (%)"

[[rows]]
net = "resnet20"
label = "FP"
wa = "32/32"
method = "fp"

[[rows]]
net = "resnet20"
label = "sign-STE"
wa = "1/1"
method = "sign-ste"
"""


def run_names(out: Path) -> list[str]:
    runs = out / "runs"
    return sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []


def test_worker_threads_split_the_cores_on_cpu_and_stay_few_on_cuda():
    assert worker_threads("cpu", 2, cores=16) == 8
    assert worker_threads("cpu", 3, cores=2) == 1
    assert worker_threads("cuda", 2, cores=16) == 2  # not 8 OpenMP threads per GPU process
    assert worker_threads("cuda", 13, cores=16) == 1
    assert InProcess().share(5) is None and ProcessPool(3).share(2) == 2 and ProcessPool(3).share(7) == 3


def test_jobs_from_memory_divides_the_free_memory_by_the_measured_footprint():
    # 80 GiB free, 1 GiB peak + 1 GiB context allowance: 0.9 * 80 / 2 = 36 by memory
    assert CUDA_CONTEXT_MIB == 1024
    assert jobs_from_memory(80 * GIB, 1 * GIB, cores=64, runs=100) == (36, 36)
    assert jobs_from_memory(80 * GIB, 1 * GIB, cores=16, runs=13) == (13, 36)  # capped by the runs
    assert jobs_from_memory(80 * GIB, 1 * GIB, cores=8, runs=13) == (8, 36)  # capped by the cores
    assert jobs_from_memory(1 * GIB, 3 * GIB, cores=8, runs=13) == (1, 0)  # one run even when none seems to fit


def test_jobs_auto_on_cpu_is_one_run_per_core():
    specs = [RunSpec.make("digits", method=m) for m in ("fp", "biper", "xnor")]
    said = []
    assert auto_jobs(specs, Machine(device="cpu"), log=said.append) == min(available_cores(), 3)
    assert "one run per CPU core" in said[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_jobs_auto_on_cuda_without_a_gpu_says_what_to_pass():
    with pytest.raises(ConfigError, match=r"--jobs auto on --device cuda .* CUDA is not available .* pass --device cpu .* or --jobs N"):
        auto_jobs([RunSpec.make("digits")], Machine(device="cuda"))


def test_table_options_refused_with_the_fix(tmp_path, capsys):
    spec = tmp_path / "exec.toml"
    spec.write_text(SPEC)
    assert cli_main(["table", str(spec), "--out", str(tmp_path), "--slurm-time", "5"]) == 2
    assert "--slurm-time apply to --executor slurm or submitit-local" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["table", str(spec), "--jobs", "0"])
    assert "--jobs must be at least 1" in capsys.readouterr().err


def parse_table_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    table_command.add_arguments(parser)
    return parser.parse_args(["1", *argv])


def test_slurm_options_become_submitit_parameters(tmp_path):
    pytest.importorskip("submitit")
    args = parse_table_args("--executor", "slurm", "--jobs", "4", "--slurm-partition", "gpu", "--slurm-time", "90", "--slurm-cpus", "8", "--slurm-option", "account=bnn", "--slurm-option", "qos=high")
    executor = table_command.build_executor(args, str(tmp_path))
    assert executor.cluster == "slurm" and executor.max_running == 4 and executor.folder == tmp_path / "submitit"
    assert executor.parameters == {
        "timeout_min": 90,
        "gpus_per_node": 1,
        "name": "bnnbench",
        "cpus_per_task": 8,
        "slurm_partition": "gpu",
        "slurm_additional_parameters": {"account": "bnn", "qos": "high"},
    }
    local = table_command.build_executor(parse_table_args("--executor", "submitit-local", "--device", "cpu", "--jobs", "auto"), str(tmp_path))
    assert (local.cluster, local.max_running, local.parameters["gpus_per_node"]) == ("local", None, 0)
    assert local.parameters["timeout_min"] == table_command.DEFAULT_SLURM_MINUTES


def test_missing_submitit_is_an_error_naming_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit now raises ImportError
    with pytest.raises(ImportError, match=r"--executor slurm .* pip install submitit"):
        Submitit("slurm", tmp_path)


def test_sigterm_to_a_pool_stops_its_workers_and_raises_run_interrupted():
    """SIGTERM to the command alone (not to its process group) reaches its workers too: none is left running."""
    import multiprocessing
    import os
    import signal

    from bnnbench.runners.train import RunInterrupted

    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM))
    began = time.monotonic()
    timer.start()
    with pytest.raises(RunInterrupted):
        for _ in ProcessPool(2).run(time.sleep, [120, 120, 120, 120]):
            pass
    timer.join()
    assert time.monotonic() - began < 30 and multiprocessing.active_children() == []


# ---------------------------------------------------------------- the per-run lock
def test_run_lock_is_exclusive_and_a_waiter_says_why_it_waits(tmp_path):
    key = RunSpec.make("digits").key()
    path = lock_path(tmp_path, key)
    assert path.parent == tmp_path / "locks" and path.suffix == ".lock"
    said: list[str] = []
    entered = threading.Event()
    with run_lock(tmp_path, key):
        with pytest.raises(Timeout):
            FileLock(path).acquire(timeout=0.05)

        def second() -> None:
            with run_lock(tmp_path, key, log=said.append):
                entered.set()

        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.3)
        assert not entered.is_set() and said and "another process is training this run" in said[0]
    waiter.join(timeout=10)
    assert entered.is_set()


def test_a_stale_plan_reuses_the_run_another_command_finished(tmp_path):
    torch.set_num_threads(1)
    machine = Machine(out=str(tmp_path), device="cpu")
    template = RunSpec.make("digits", method="fp")
    stale = plan([template], [0], tiny_recipe(), machine)
    fresh = plan([template], [0], tiny_recipe(), machine)
    execute(fresh.jobs, quiet=True, log=lambda _: None)
    (trained,) = run_names(tmp_path)
    said: list[str] = []
    outcome = execute(stale.jobs, quiet=True, log=said.append)  # planned as missing before the other one trained it
    assert run_names(tmp_path) == [trained] and outcome.trained == []
    assert stale.jobs[0].status == "finished" and stale.jobs[0].record.path.name == trained
    assert any("made meanwhile by another process" in line for line in said)


COMMAND = """
import sys, torch
torch.set_num_threads(1)
from bnnbench.runners.experiments import execute, plan
from bnnbench.runners.recipes import get_recipe
from bnnbench.runners.spec import Machine, RunSpec
recipe = get_recipe("quick")
recipe.train_subset, recipe.test_subset, recipe.batch_size = 48, 30, 16
recipe.stage1.epochs, recipe.stage2.epochs = 1, 1
runs = plan([RunSpec.make("digits", method="fp")], [0], recipe, Machine(out=sys.argv[1], device="cpu"))
print("planned", runs.jobs[0].status, flush=True)
execute(runs.jobs, quiet=True, log=lambda line: print(line, flush=True))
"""


def test_two_commands_sharing_a_results_folder_train_a_run_once(tmp_path):
    """Both commands plan the run as missing while a third process holds its lock; once released, one
    trains it and the other waits, finds it finished and reuses it."""
    out = tmp_path / "results"
    key = plan([RunSpec.make("digits", method="fp")], [0], tiny_recipe(), Machine(out=str(out), device="cpu")).jobs[0].key
    logs = [tmp_path / f"command{i}.log" for i in (0, 1)]
    with run_lock(out, key):
        commands = [
            subprocess.Popen([sys.executable, "-c", COMMAND, str(out)], stdout=log.open("w"), stderr=subprocess.STDOUT) for log in logs
        ]
        deadline = time.monotonic() + 120
        while not all("waiting" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(c.poll() is None for c in commands), [log.read_text() for log in logs]
            time.sleep(0.2)
    assert [c.wait(timeout=120) for c in commands] == [0, 0]
    texts = [log.read_text() for log in logs]
    assert all("planned missing" in text for text in texts)
    assert sum("made meanwhile by another process" in text for text in texts) == 1, texts
    assert len(run_names(out)) == 1


# ---------------------------------------------------------------- submitit's local executor
def job_folders(out: Path) -> list[Path]:
    return [p for p in (out / "submitit").iterdir() if p.is_dir() and p.name.isdigit()]


def test_submitit_local_executor_runs_a_tiny_table(tmp_path, monkeypatch, capsys):
    pytest.importorskip("submitit")
    spec_path = tmp_path / "exec.toml"
    spec_path.write_text(SPEC)
    out = tmp_path / "results"
    executor = Submitit("local", out / "submitit", {"timeout_min": 10, "gpus_per_node": 0}, max_running=2)
    said: list[str] = []
    result = make_table(load_spec(spec_path), tiny_recipe(), Machine(out=str(out), device="cpu"), quiet=True, log=said.append, parallel=executor)
    assert result.stopped is None
    assert {job.status for job in result.runs.jobs} == {"finished"} and len(run_names(out)) == 2
    assert any("submitit local jobs (at most 2 at once" in line for line in said)
    markdown = result.paths[0].read_text()
    assert "| FP |" in markdown and "| sign-STE |" in markdown and "missing" not in markdown
    assert len(job_folders(out)) == 2  # one folder per job, named by its id
    # the same table again: every run is reused, nothing is submitted
    again = make_table(load_spec(spec_path), tiny_recipe(), Machine(out=str(out), device="cpu"), quiet=True, log=said.append, parallel=executor)
    assert len(run_names(out)) == 2 and len(job_folders(out)) == 2
    assert {job.status for job in again.runs.jobs} == {"finished"}
    # and through the command line, with --jobs auto: nothing left to make
    from bnnbench.runners import recipes

    monkeypatch.setattr(recipes, "get_recipe", lambda name, family="cifar": tiny_recipe())
    assert cli_main(["table", str(spec_path), "--recipe", "tiny", "--device", "cpu", "--jobs", "auto", "--out", str(out), "--quiet"]) == 0
    assert "--jobs auto: 1 at once (one run per CPU core" in capsys.readouterr().out and len(run_names(out)) == 2


def test_submitit_job_errors_come_back_as_errors_and_the_other_jobs_finish(tmp_path):
    pytest.importorskip("submitit")
    executor = Submitit("local", tmp_path / "submitit", {"timeout_min": 5, "gpus_per_node": 0})
    started: list[int] = []
    finished = sorted(executor.run(int, ["not a number", "7"], on_start=started.append), key=lambda f: f.index)
    assert started == [0, 1]
    assert finished[0].value is None and "ValueError: invalid literal for int()" in finished[0].error
    assert (finished[1].value, finished[1].error) == (7, None)
