"""scripts/gpu-check: the dry run end to end on the CPU (so the GPU check cannot rot), the data
packing and its md5 checks, and running the checkout's code without installing it."""

from __future__ import annotations

import csv
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnnbench.runners.tables import load_spec

import bnnbench

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check"


def load_script():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


gpu_check = load_script()


def test_dry_run_runs_every_step_and_writes_small_files(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--minutes", "4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# bnnbench GPU check (dry run at toy sizes on the CPU")
    for step in ("environment", "data", "pytest", "methods", "comparison", "render"):
        assert f"| {step} | ok |" in summary, summary
    environment = json.loads((out / "environment.json").read_text())
    assert environment["dry_run"] and environment["versions"]["torch"] and environment["gpus"] == []

    # pytest -m cuda ran: every cuda test collected and skipped here, with the reason
    assert "0 failed, 0 errors" in summary and "needs a CUDA GPU" in summary
    # one short epoch of each stage for every registered method, and the loader alone
    with open(out / "methods.csv", newline="") as f:
        methods = list(csv.DictReader(f))
    assert sorted({row["method"] for row in methods}) == bnnbench.list_methods()
    assert sorted(row["stage"] for row in methods) == sorted(["1", "2"] * len(bnnbench.list_methods()))
    assert all(float(row["train_images_per_s"]) > 0 for row in methods)
    with open(out / "loader.csv", newline="") as f:
        assert [row["loader"] for row in csv.DictReader(f)] == ["gpu", "torch"]
    # the comparison at toy sizes: every run finished, the table has no missing cell
    table = (out / "comparison" / "comparison-resnet20.md").read_text()
    assert "| ResNet-20 | BiPer (w0 = 20) |" in table and "missing" not in table
    rows = len(load_spec("comparison-resnet20").runs)  # FP and every binarizer
    assert f"{rows} of {rows} runs finished" in summary
    assert len(list((out / "comparison" / "runs").iterdir())) == rows
    # only small files come back; the work folder (data, checkpoints) is gone
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    assert max(sizes.values()) < 1_000_000, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    assert not any(name.endswith((".pt", ".npz", ".tar", ".npy")) for name in sizes)
    work = Path(next(line for line in done.stdout.splitlines() if "work folder:" in line).split("work folder: ")[1].split(";")[0])
    assert not work.exists()


def test_pack_splits_into_parts_and_reassembly_checks_every_md5(tmp_path):
    assert gpu_check.PART_BYTES <= 60 * 10**6
    source = tmp_path / gpu_check.CIFAR_TAR
    source.write_bytes(os.urandom(250_000))
    parts = tmp_path / "parts"
    manifest = json.loads(gpu_check.pack(source, parts, part_bytes=100_000).read_text())
    assert [p["bytes"] for p in manifest["parts"]] == [100_000, 100_000, 50_000]
    assert manifest["md5"] == hashlib.md5(source.read_bytes()).hexdigest()
    joined = gpu_check.reassemble(parts, tmp_path / "joined" / gpu_check.CIFAR_TAR, expected_md5=None)
    assert joined.read_bytes() == source.read_bytes()
    with pytest.raises(RuntimeError, match="the CIFAR-10 copy"):
        gpu_check.reassemble(parts, tmp_path / "again.tar", expected_md5=gpu_check.CIFAR_MD5)
    damaged = parts / manifest["parts"][1]["name"]
    damaged.write_bytes(b"x" + damaged.read_bytes()[1:])
    with pytest.raises(RuntimeError, match=r"part .*part001 is damaged"):
        gpu_check.reassemble(parts, tmp_path / "again.tar", expected_md5=None)
    damaged.unlink()
    with pytest.raises(RuntimeError, match=r"part .*part001 .* is missing"):
        gpu_check.reassemble(parts, tmp_path / "again.tar", expected_md5=None)
    with pytest.raises(RuntimeError, match="holds neither"):
        gpu_check.reassemble(tmp_path / "nowhere", tmp_path / "again.tar", expected_md5=None)


def test_the_shared_cifar10_copy_packs_into_parts_of_at_most_60_mb(cifar10_tar, tmp_path):
    manifest = json.loads(gpu_check.pack(cifar10_tar, tmp_path / "parts").read_text())
    assert manifest["md5"] == gpu_check.CIFAR_MD5 and manifest["bytes"] == cifar10_tar.stat().st_size
    assert len(manifest["parts"]) == 2 and all(p["bytes"] <= 60_000_000 for p in manifest["parts"])
    joined = gpu_check.reassemble(tmp_path / "parts", tmp_path / "joined" / gpu_check.CIFAR_TAR, expected_md5=gpu_check.CIFAR_MD5)
    assert joined.stat().st_size == cifar10_tar.stat().st_size


def test_checkout_shim_imports_bnnbench_without_an_install(tmp_path):
    """-S: no site-packages, so no installed bnnbench; the shim alone maps the checkout's folders."""
    shim = gpu_check.write_shim(tmp_path / "pythonpath")
    code = "import bnnbench, bnnbench.runners, bnnbench.tables, bnnbench.data; print(bnnbench.runners.__file__); print(bnnbench.tables.__file__); print(bnnbench.__version__)"
    done = subprocess.run([sys.executable, "-S", "-P", "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(shim)}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    runners, tables, version = done.stdout.split()
    assert Path(runners) == ROOT / "runners" / "__init__.py" and Path(tables) == ROOT / "tables" / "__init__.py" and version


def test_the_check_needs_data_or_a_dry_run(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "needs --data DIR" in done.stderr


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in state  # a zombie waiting for its reaper has stopped running


def test_a_step_at_its_time_limit_is_stopped_with_its_whole_process_group(tmp_path):
    """The comparison is stopped this way: SIGTERM to the step and the workers it started."""
    import argparse

    args = argparse.Namespace(minutes=1, out=str(tmp_path / "out"), work=str(tmp_path / "work"), dry_run=True, data=None, recipe="gpu-short", from_checkout=False)
    check = gpu_check.Check(args)
    pid_file = tmp_path / "worker.pid"
    sleeper = f"import subprocess, sys, time; w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); open({str(pid_file)!r}, 'w').write(str(w.pid)); time.sleep(120)"
    assert check.run("sleepy", [sys.executable, "-c", sleeper], limit=6, stop_at_limit=True) == "stopped at its time limit"
    assert check.steps[-1]["seconds"] < 6 + gpu_check.STOP_GRACE_S
    assert process_gone(int(pid_file.read_text()))
    assert check.run("quick", [sys.executable, "-c", "raise SystemExit(3)"], limit=30) == "failed (exit 3)"
    assert (tmp_path / "out" / "logs" / "quick.log").is_file()
