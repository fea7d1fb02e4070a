"""Data-parallel training on CPU with gloo: ``bnnbench run --nproc 2`` and ``torchrun -m bnnbench run``.

One uninterrupted 2-process run on a CIFAR-10 subset is the reference: it writes one run directory,
and its reduced test accuracy equals a single-process evaluation of its saved checkpoint on the
same test images (51 images: the 2 shards are padded, so a miscount shows).  A run whose rank 1
dies (SIGKILL, from a --plugin that patches the epoch start) stops the launcher with a non-zero
status naming the rank; its last checkpoint resumes in one process, and under torchrun with 2
processes it ends exactly where the reference ends.  In this process, a one-rank group takes the
DDP code path and gives exactly the numbers of a plain run, callbacks included.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import bnnbench
from bnnbench.cli import main as cli_main
from bnnbench.data import make_data
from bnnbench.data.sampling import shard
from bnnbench.runners.distributed import TORCHRUN_ENV, unpadded_share
from bnnbench.runners.results import load_checkpoint
from bnnbench.runners.callbacks import EpochCallback, EpochReport
from bnnbench.runners.rundir import RunDirectory
from bnnbench.runners.train import TIMING_COLUMNS, run_training
from tiny import TinyRun, tiny_recipe, tiny_run

TEST_IMAGES = 51  # odd: each rank's shard holds 26 positions, rank 1's last one a repeat
ARGS = [
    "--device", "cpu", "--net", "resnet20", "--recipe", "quick", "--train-subset", "64", "--test-subset", str(TEST_IMAGES),
    "--batch-size", "16", "--eval-batch-size", "50", "--epochs", "2,1", "--quiet", "--no-amp",
]  # fmt: skip  (fp32: the single-process evaluation below compares losses to 1e-5)
RUN_FILES = {".lock", "config.json", "metrics.csv", "layers.csv", "final.json", "predictions.npz", "stage1_last.pt", "stage1_best.pt", "stage2_last.pt", "stage2_best.pt"}

# Test-side only: a plugin module, imported by every worker (--plugin), that makes rank 1 kill itself
# with SIGKILL when stage 1's second epoch starts (progress (2 - 1) / 2), after epoch 1's checkpoint.
DIE_PLUGIN = """
import os, signal
import bnnbench

_set_progress = bnnbench.set_progress

def set_progress(model, progress):
    if os.environ.get("RANK") == "1" and progress == 0.5:
        os.kill(os.getpid(), signal.SIGKILL)
    _set_progress(model, progress)

bnnbench.set_progress = set_progress
"""


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def launch(*command: str) -> subprocess.CompletedProcess:
    """A command in a fresh process, one torch thread per process, output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=600)


def rows(path: Path) -> list[dict[str, str]]:
    with (path / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]


def outcome(path: Path) -> tuple[list[dict[str, str]], dict, dict[str, torch.Tensor]]:
    final = json.loads((path / "final.json").read_text())
    final = {k: v for k, v in final.items() if k not in ("run_id", "train_time_s")}
    return rows(path), final, load_checkpoint(path / "stage2_last.pt")["model"]


@pytest.fixture(scope="module")
def reference(private_cache, cifar10_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted ``bnnbench run --nproc 2`` on the CIFAR-10 subset (its results root, its process)."""
    out = tmp_path_factory.mktemp("reference") / "results"
    proc = launch("-m", "bnnbench", "run", "--nproc", "2", *ARGS, "--data", "cifar10", "--data-dir", str(cifar10_dir), "--out", str(out))
    return out, proc


def single_process_evaluation(checkpoint: Path) -> tuple[int, float, int]:
    """(hits, summed cross-entropy, images) of the checkpoint's model on its run's test images, one process."""
    state = load_checkpoint(checkpoint)
    run = RunDirectory.open(checkpoint.parent)
    spec, recipe = run.spec, run.spec.recipe
    bundle = make_data(spec.data, data_dir=run.machine.data_dir, batch_size=64, train_subset=recipe.train_subset, test_subset=recipe.test_subset, seed=spec.seed, loader="torch")
    model = spec.model.build(stage=state["stage"])
    model.load_state_dict(state["model"])
    bnnbench.set_progress(model, state["metrics"]["progress"])
    model.eval()
    hits, loss, count = 0, 0.0, 0
    with torch.no_grad():
        for images, labels in bundle.test:
            logits = model(images)
            hits += int((logits.argmax(dim=1) == labels).sum())
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            count += len(labels)
    return hits, loss, count


# ---------------------------------------------------------------- a 2-process run
def test_two_processes_write_one_run_whose_accuracy_counts_every_test_image_once(reference):
    out, proc = reference
    assert proc.returncode == 0, proc.stderr
    (path,) = (out / "runs").iterdir()
    assert {p.name for p in path.iterdir() if not p.name.startswith("events.out.tfevents")} == RUN_FILES
    assert proc.stdout.count("run directory:") == 1  # rank 0 alone prints
    assert proc.stdout.count("stage 1 epoch 1/2") == 1

    config = json.loads((path / "config.json").read_text())
    resolved = config["resolved"]
    assert (resolved["world_size"], resolved["distributed_backend"], resolved["process_batch_size"]) == (2, "gloo", 8)
    assert config["data"]["distributed"] == {"rank": 0, "world_size": 2}
    assert config["data"]["test_size"] == TEST_IMAGES

    for stage in (1, 2):
        state = load_checkpoint(path / f"stage{stage}_last.pt")
        assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
        hits, loss, count = single_process_evaluation(path / f"stage{stage}_last.pt")
        assert count == TEST_IMAGES
        logged = [r for r in rows(path) if int(r["stage"]) == stage][-1]
        assert float(logged["test_top1"]) == pytest.approx(100.0 * hits / count, abs=1e-9)
        assert float(logged["test_loss"]) == pytest.approx(loss / count, rel=1e-5)
    final = json.loads((path / "final.json").read_text())
    assert final["final_test_top1"] == pytest.approx(100.0 * hits / TEST_IMAGES, abs=1e-9)


# ---------------------------------------------------------------- a rank dies
def test_a_dead_rank_fails_the_launcher_and_the_last_checkpoint_resumes(reference, cifar10_dir, tmp_path):
    out, proc = reference
    assert proc.returncode == 0, proc.stderr
    (reference_path,) = (out / "runs").iterdir()
    plugin = tmp_path / "die_at_stage1_epoch2.py"
    plugin.write_text(DIE_PLUGIN)
    results = tmp_path / "results"
    victim = results / "runs" / "victim"
    data = ["--data", "cifar10", "--data-dir", str(cifar10_dir)]

    died = launch("-m", "bnnbench", "--plugin", str(plugin), "run", "--nproc", "2", *ARGS, *data, "--out", str(results), "--name", "victim")
    assert died.returncode == 1, died.stderr
    assert "bnnbench: distributed training failed: rank 1" in died.stderr and "killed by SIGKILL" in died.stderr
    assert f"continue with: bnnbench run --resume {victim} --nproc 2" in died.stderr
    last = load_checkpoint(victim / "stage1_last.pt")
    assert (last["stage"], last["epoch"]) == (1, 1) and not (victim / "final.json").exists()

    # one process continues a copy (another world size: it finishes, with its own numbers)
    alone = Path(shutil.copytree(victim, tmp_path / "alone"))
    assert cli_main(["run", "--resume", str(alone), "--quiet"]) == 0
    assert [(r["stage"], r["epoch"]) for r in rows(alone)] == [("1", "1"), ("1", "2"), ("2", "1")]
    assert rows(alone)[0] == rows(reference_path)[0]
    assert not (alone / "failure.json").exists()

    # torchrun with 2 processes ends exactly where the uninterrupted run ends
    resumed = launch("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "bnnbench", "run", "--resume", str(victim), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    (metrics_a, final_a, weights_a), (metrics_b, final_b, weights_b) = outcome(victim), outcome(reference_path)
    assert metrics_a == metrics_b
    assert final_a == final_b
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


# ---------------------------------------------------------------- inputs refused before any process starts
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch-size", "15"], "--batch-size 15 is the global batch and must split evenly over 2 processes"),
        (["--sync-bn"], "SyncBatchNorm runs on GPUs only"),
        (["--nproc", "0"], "--nproc must be at least 1"),
    ],
)
def test_bad_distributed_options_are_refused_with_the_fix(extra, message, tmp_path, capsys):
    args = ["run", "--nproc", "2", "--device", "cpu", "--data", "digits", "--out", str(tmp_path), *extra]
    assert cli_main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_nproc_under_torchrun_is_refused(monkeypatch, tmp_path, capsys):
    torchrun_env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}
    assert set(torchrun_env) == set(TORCHRUN_ENV)
    for name, value in torchrun_env.items():
        monkeypatch.setenv(name, value)
    assert cli_main(["run", "--nproc", "2", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "under torchrun drop --nproc" in capsys.readouterr().err


# ---------------------------------------------------------------- the DDP code path in this process
class WhatCallbacksGet(EpochCallback):
    """Records the module the callbacks are handed and reports a value computed from its weights."""

    def __init__(self) -> None:
        self.modules: set[type] = set()
        self.steps_with_gradients = 0

    def on_after_backward(self, stage: int, epoch: int, step: int, model: nn.Module) -> None:
        self.modules.add(type(model))
        self.steps_with_gradients += all(p.grad is not None for p in model.parameters() if p.requires_grad)

    def on_epoch_end(self, stage: int, epoch: int, model: nn.Module) -> EpochReport:
        return EpochReport(columns={"weight_norm": float(torch.cat([p.detach().flatten() for p in model.parameters()]).norm())})


def test_a_one_rank_process_group_trains_exactly_like_a_plain_run(monkeypatch, tmp_path):
    """Under a torchrun environment of one rank the run goes through DDP, the reductions and the
    buffer broadcast; the numbers, callbacks included, are those of a plain run."""

    def config(name: str) -> TinyRun:
        return tiny_run(tiny_recipe(train=64), tmp_path, device="cpu", name=name)

    plain_callback, ddp_callback = WhatCallbacksGet(), WhatCallbacksGet()
    run_training(*config("plain"), quiet=True, callbacks=[plain_callback])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    run_training(*config("ddp"), quiet=True, callbacks=[ddp_callback])
    assert not dist.is_initialized()  # the run left the process group it joined

    resolved = json.loads((tmp_path / "runs" / "ddp" / "config.json").read_text())["resolved"]
    assert (resolved["world_size"], resolved["distributed_backend"]) == (1, "gloo")
    assert ddp_callback.modules == plain_callback.modules and not any(issubclass(m, nn.parallel.DistributedDataParallel) for m in ddp_callback.modules)
    assert ddp_callback.steps_with_gradients == plain_callback.steps_with_gradients > 0
    plain, ddp = rows(tmp_path / "runs" / "plain"), rows(tmp_path / "runs" / "ddp")
    assert "weight_norm" in plain[0] and plain == ddp


# ---------------------------------------------------------------- padding of the shards
@pytest.mark.parametrize("num_samples", [1, 5, 8, 51])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_unpadded_share_is_the_real_head_of_each_shard(num_samples, world_size):
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(num_samples))
    real: list[int] = []
    for rank in range(world_size):
        mine = shard(order, rank, world_size)
        n = unpadded_share(num_samples, rank, world_size)
        real += mine[:n].tolist()
        assert len(mine) - n <= 1  # at most one repeat per rank, at the end
    assert sorted(real) == list(range(num_samples))  # every sample exactly once
