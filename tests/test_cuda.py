"""What only a CUDA GPU can check (``pytest -m cuda``; skipped, saying why, without one).

bf16 autocast and channels_last in the training loop, the GPU-resident CIFAR-10 loader against
the CPU one, DistributedDataParallel with NCCL on one process, bit-packed export of a model
trained on the GPU, the ``--jobs auto`` memory probe, and two runs sharing one GPU.
``scripts/gpu-check`` runs these first (with ``BNNBENCH_CIFAR10_TAR`` pointing at its copy).
"""

from __future__ import annotations

import csv
import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import bnnbench
from bnnbench.data import make_data
from bnnbench.packed import export_packed
from bnnbench.runners.callbacks import EpochCallback
from bnnbench.runners.concurrency import auto_jobs, measure_footprint
from bnnbench.runners.experiments import execute, plan
from bnnbench.runners.recipes import get_recipe
from bnnbench.runners.spec import Machine, RunSpec
from bnnbench.runners.train import run_training

pytestmark = pytest.mark.cuda


def small_recipe(train: int = 512, test: int = 200, batch: int = 128):
    recipe = get_recipe("quick")
    recipe.train_subset, recipe.test_subset, recipe.batch_size, recipe.eval_batch_size = train, test, batch, 200
    recipe.stage1.epochs, recipe.stage2.epochs = 1, 1
    return recipe


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


class WhatTheModelSees(EpochCallback):
    """The dtype a conv produces in the training forward and whether the conv weights are channels_last."""

    def __init__(self) -> None:
        self.output_dtypes: set[torch.dtype] = set()
        self.channels_last: bool | None = None

    def on_epoch_start(self, stage: int, epoch: int, model: nn.Module) -> None:
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        self.channels_last = all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
        convs[0].register_forward_hook(lambda module, inputs, output: self.output_dtypes.add(output.dtype))


@pytest.mark.parametrize("amp, channels_last", [(True, True), (False, False)])
def test_bf16_autocast_and_channels_last_train_on_the_gpu(cifar10_tar, tmp_path, amp, channels_last):
    spec = RunSpec.make("cifar10", net="resnet20", method="biper", recipe=small_recipe())
    machine = Machine(device="cuda", amp=amp, channels_last=channels_last, data_dir=str(cifar10_tar), out=str(tmp_path), tensorboard=False)
    seen = WhatTheModelSees()
    final = run_training(spec, machine, quiet=True, callbacks=[seen])
    (run_dir,) = (tmp_path / "runs").iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["resolved"]["device"].startswith("cuda") and config["resolved"]["amp_bf16"] is amp
    assert config["resolved"]["channels_last"] is channels_last and seen.channels_last is channels_last
    assert seen.output_dtypes == {torch.bfloat16 if amp else torch.float32}
    assert config["data"]["loader"].startswith("gpu (uint8 arrays resident on cuda")
    rows = metrics(run_dir)
    assert len(rows) == 2 and all(math.isfinite(float(r["train_loss"])) and math.isfinite(float(r["test_loss"])) for r in rows)
    assert 0 <= final["final_test_top1"] <= 100


def test_cifar10_gpu_loader_gives_the_cpu_loaders_batches(cifar10_tar):
    options = dict(data_dir=cifar10_tar, batch_size=256, seed=3, train_subset=2000, test_subset=500)
    on_gpu = make_data("cifar10", device="cuda", loader="gpu", **options)
    on_cpu = make_data("cifar10", device="cpu", loader="torch", **options)
    for epoch in (0, 1):
        on_gpu.set_epoch(epoch)
        on_cpu.set_epoch(epoch)
        for loader_gpu, loader_cpu in ((on_gpu.train, on_cpu.train), (on_gpu.test, on_cpu.test)):
            for (x, y), (cx, cy) in zip(loader_gpu, loader_cpu, strict=True):
                assert x.is_cuda and y.is_cuda
                torch.testing.assert_close(x.cpu(), cx, rtol=0, atol=1e-5)  # one fused multiply-add apart at most
                assert torch.equal(y.cpu(), cy)


def test_one_rank_nccl_process_group_trains_and_counts_every_test_image(cifar10_tar, tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    spec = RunSpec.make("cifar10", net="resnet20", method="biper", recipe=small_recipe(test=300))
    machine = Machine(device="cuda", data_dir=str(cifar10_tar), out=str(tmp_path), name="ddp", tensorboard=False)
    run_training(spec, machine, quiet=True)
    assert not dist.is_initialized()  # left the group it joined
    resolved = json.loads((tmp_path / "runs" / "ddp" / "config.json").read_text())["resolved"]
    assert (resolved["world_size"], resolved["distributed_backend"]) == (1, "nccl")
    predictions = np.load(tmp_path / "runs" / "ddp" / "predictions.npz")
    assert len(predictions["labels"]) == 300


def test_model_trained_on_the_gpu_exports_packed_with_identical_predictions(cifar10_tar):
    torch.manual_seed(0)
    data = make_data("cifar10", data_dir=cifar10_tar, batch_size=128, train_subset=1024, test_subset=300, augment=True, device="cuda")
    model = bnnbench.build_model("resnet20", "biper", stage=2).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(2):
        for images, labels in data.train:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(images.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits.float(), labels) + bnnbench.regularization_loss(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert torch.isfinite(loss)
    model = model.cpu().eval()
    test_images = torch.cat([images.cpu() for images, _ in data.test])
    with torch.no_grad():
        expected = model(test_images)
        got = export_packed(model)(test_images)
    assert torch.equal(expected.argmax(1), got.argmax(1))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_jobs_auto_measures_a_runs_footprint_on_the_gpu(cifar10_tar, tmp_path):
    machine = Machine(device="cuda", data_dir=str(cifar10_tar), out=str(tmp_path), tensorboard=False)
    specs = [RunSpec.make("cifar10", net="resnet20", method=m, recipe=small_recipe()) for m in ("fp", "biper")]
    found = measure_footprint(specs, machine)
    assert found.probed == 2 and 0 < found.peak_bytes < found.free_bytes <= found.total_bytes
    said: list[str] = []
    assert auto_jobs(specs, machine, log=said.append) >= 1 and "GiB peak per run" in said[0]


def test_two_runs_share_one_gpu_in_worker_processes(cifar10_tar, tmp_path):
    machine = Machine(device="cuda", data_dir=str(cifar10_tar), out=str(tmp_path), tensorboard=False)
    templates = [RunSpec.make("cifar10", net="resnet20", method=m) for m in ("fp", "sign-ste")]
    runs = plan(templates, [0], small_recipe(), machine)
    outcome = execute(runs.jobs, quiet=True, log=lambda _: None, parallel=2)
    assert outcome.stopped is None and {job.status for job in runs.jobs} == {"finished"}
    for job in runs.jobs:
        config = json.loads((job.record.path / "config.json").read_text())
        assert config["resolved"]["device"].startswith("cuda") and config["machine"]["torch_threads"] <= 2
