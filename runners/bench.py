"""Throughput benchmarks: the packed XNOR-popcount conv against ``F.conv2d``, and binarizer training steps.

Every speed is a ratio against a baseline timed in the same process, at the
same thread count, in blocks of calls that alternate with the baseline's
(SPEC section 6), so that load from other processes hits both sides alike.
Each figure is the best (minimum) time of a call, with the median next to it.

``conv_benchmark``: every binary 3x3 layer shape of ImageNet ResNet-18
(stride 1 C -> C and the stride-2 C/2 -> C that opens a stage), batch 1 and
16.  The packed side starts from the real-valued float32 NCHW input and
includes the sign, bit packing, GEMM (implicit im2col) and border correction; the
float side is ``F.conv2d`` of the +-1 tensors, the faster of NCHW and
channels-last memory.  The GEMM alone (from the packed input) is reported in
binary GOPS (2 M N K, K in bits) against the machine's measured popcount peak.

``train_benchmark``: images/s of one SGD step (forward, backward, update,
the method's regulariser included) for each method against the
full-precision model on the same backbone.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import statistics
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import numba
import numpy as np
import torch
import torch.nn.functional as F

import bnnbench
from bnnbench.kernels import binary_conv2d_packed, pack_channels, pack_weights, popcount_peak_gops, xnor_gemm
from bnnbench.io import write_text

# (in channels, out channels, input size, stride) of the binary 3x3 convs of ImageNet ResNet-18
RESNET18_BINARY_CONVS: tuple[tuple[int, int, int, int], ...] = (
    (64, 64, 56, 1),
    (64, 128, 56, 2),
    (128, 128, 28, 1),
    (128, 256, 28, 2),
    (256, 256, 14, 1),
    (256, 512, 14, 2),
    (512, 512, 7, 1),
)
ISA_FLAGS = ("popcnt", "avx2", "avx512f", "avx512bw", "avx512_vpopcntdq")


@dataclass
class Timing:
    """Seconds per call: best (minimum) and median over ``runs`` calls."""

    best: float
    median: float
    runs: int


def time_interleaved(
    calls: dict[str, Callable[[], Any]], budget_s: float = 1.0, min_runs: int = 5, block_s: float = 0.02
) -> dict[str, Timing]:
    """Time the calls in alternating blocks until ``budget_s`` is spent (at least ``min_runs`` calls each).

    A block is consecutive calls of one contender lasting about ``block_s``
    (at least one call), each call timed on its own; contenders take turns
    block by block, so a slow spell of the machine hits every contender alike,
    while each call runs warm as in a steady stream of calls of one layer.
    One warm-up call each first.
    """
    for call in calls.values():
        call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    start = time.perf_counter()
    while min(len(s) for s in samples.values()) < min_runs or time.perf_counter() - start < budget_s:
        for name, call in calls.items():
            block_start = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                call()
                t1 = time.perf_counter()
                samples[name].append(t1 - t0)
                if t1 - block_start >= block_s:
                    break
    return {name: Timing(min(s), statistics.median(s), len(s)) for name, s in samples.items()}


def set_threads(threads: int) -> None:
    """Use ``threads`` threads in torch and in numba's parallel kernels."""
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= threads <= limit:
        raise ValueError(f"--threads must lie in 1..{limit} (numba's thread pool; set NUMBA_NUM_THREADS to raise it), got {threads}")
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)


def machine_info(threads: int) -> dict[str, Any]:
    """CPU (model name, family/model, popcount-relevant ISA flags), thread count, versions and date."""
    cpu: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "flags") and key not in cpu:
                cpu[key] = value.strip()
    except OSError:
        pass
    flags = set(cpu.get("flags", "").split())
    return {
        "cpu": cpu.get("model name") or platform.processor() or platform.machine(),
        "cpu_family_model": f"{cpu['cpu family']}/{cpu['model']}" if "cpu family" in cpu and "model" in cpu else "",
        "isa": " ".join(f for f in ISA_FLAGS if f in flags),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "numba": numba.__version__,
        "numba_threading_layer": _threading_layer(),
        "python": platform.python_version(),
        "date": datetime.now().isoformat(timespec="seconds"),
    }


def _threading_layer() -> str:
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return "not started"


def conv_benchmark(
    batches: Sequence[int] = (1, 16),
    threads: int = 1,
    budget_s: float = 1.0,
    shapes: Sequence[tuple[int, int, int, int]] = RESNET18_BINARY_CONVS,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per (shape, batch): float and packed times, speed-up, GEMM GOPS and share of the popcount peak.

    Checks that the packed result equals ``F.conv2d`` before timing it.
    Returns (rows, machine).
    """
    set_threads(threads)
    peak = popcount_peak_gops()
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for cin, cout, size, stride in shapes:
        weights = torch.randn(cout, cin, 3, 3, generator=generator).sign()
        packed = pack_weights(weights)
        for batch in batches:
            x = torch.randn(batch, cin, size, size, generator=generator)
            x_pm1 = bnnbench.sign(x)
            x_channels_last = x_pm1.contiguous(memory_format=torch.channels_last)
            result = binary_conv2d_packed(x, packed, stride, 1)
            if not torch.equal(result, F.conv2d(x_pm1, weights, stride=stride, padding=1)):
                raise RuntimeError(f"packed conv differs from F.conv2d for {cin}->{cout}@{size} stride {stride}: a kernel bug")
            times = time_interleaved(
                {
                    "float_nchw": lambda: F.conv2d(x_pm1, weights, stride=stride, padding=1),
                    "float_channels_last": lambda: F.conv2d(x_channels_last, weights, stride=stride, padding=1),
                    "packed": lambda: binary_conv2d_packed(x, packed, stride, 1),
                },
                budget_s,
            )
            out_size = (size - 1) // stride + 1
            bits = pack_channels(x.numpy(), 1)
            offsets = packed.offsets(size, size, stride, 1)
            out = np.empty((batch * out_size * out_size, offsets.shape[1]), dtype=np.float32)
            gemm = time_interleaved({"gemm": lambda: xnor_gemm(bits, (3, 3), stride, packed.panels(), offsets, out)}, budget_s / 3)["gemm"]
            float_format = min(("float_nchw", "float_channels_last"), key=lambda name: times[name].best)
            binary_ops = 2 * batch * out_size * out_size * cout * cin * 9
            rows.append(
                {
                    "layer": f"{cin}->{cout} @{size}x{size} s{stride}",
                    "batch": batch,
                    "float_ms": 1e3 * times[float_format].best,
                    "float_median_ms": 1e3 * times[float_format].median,
                    "float_memory": float_format.removeprefix("float_"),
                    "packed_ms": 1e3 * times["packed"].best,
                    "packed_median_ms": 1e3 * times["packed"].median,
                    "speedup": times[float_format].best / times["packed"].best,
                    "speedup_median": times[float_format].median / times["packed"].median,
                    "gemm_ms": 1e3 * gemm.best,
                    "gemm_gops": binary_ops / gemm.best / 1e9,
                    "float_gflops": binary_ops / times[float_format].best / 1e9,
                    "popcount_peak_gops": peak["peak"] * threads,
                    "gemm_share_of_peak": binary_ops / gemm.best / 1e9 / (peak["peak"] * threads),
                    "runs": times["packed"].runs,
                }
            )
    machine = machine_info(threads)
    machine["popcount_peak_gops_1thread"] = peak
    return rows, machine


def train_benchmark(
    net: str = "resnet20",
    family: str = "cifar",
    batch: int = 64,
    methods: Sequence[str] | None = None,
    stage: int = 2,
    threads: int = 1,
    budget_s: float = 3.0,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Images/s of one training step per method and its ratio to the full-precision model ("fp")."""
    set_threads(threads)
    names = ["fp"] + [name for name in (methods or bnnbench.list_methods()) if name != "fp"]
    torch.manual_seed(seed)
    steps = {name: training_step(net, family, name, stage, batch, seed) for name in names}
    times = time_interleaved(steps, budget_s * len(names), min_runs=3)
    reference = times["fp"]
    rows = [
        {
            "method": name,
            "net": f"{family}/{net}",
            "stage": stage,
            "batch": batch,
            "images_per_s": batch / times[name].best,
            "images_per_s_median": batch / times[name].median,
            "step_ms": 1e3 * times[name].best,
            "relative_to_fp": reference.best / times[name].best,
            "relative_to_fp_median": reference.median / times[name].median,
            "runs": times[name].runs,
        }
        for name in names
    ]
    return rows, machine_info(threads)


def training_step(net: str, family: str, method: str, stage: int, batch: int, seed: int) -> Callable[[], None]:
    """A closure running one SGD step (forward, loss + regulariser, backward, update) on a fixed random batch."""
    generator = torch.Generator().manual_seed(seed)
    model = bnnbench.build_model(net, method, family=family, stage=stage if method != "fp" else 2)
    model.train()
    size = 224 if model.bnn_config["family"] == "imagenet" else 32
    images = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.randint(0, model.bnn_config["num_classes"], (batch,), generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        extra = bnnbench.regularization_loss(model)
        if extra is not None:
            loss = loss + extra
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def write_csv(path: str | Path, rows: list[dict[str, Any]], machine: dict[str, Any]) -> Path:
    """Rows plus the machine columns (CPU, threads, versions, date) on every row; written atomically."""
    flat_machine = {k: v for k, v in machine.items() if not isinstance(v, dict)}
    records = [{**row, **flat_machine} for row in rows]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, buffer.getvalue())
    return path
