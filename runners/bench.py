"""Throughput benchmarks: the packed XNOR-popcount conv against float32, bf16 and int8 convs (training steps: ``bench_train.py``).

Every speed is a ratio against a baseline timed in the same process, at the
same thread count, in blocks of calls that alternate with the baseline's
(SPEC section 6), so that load from other processes hits both sides alike.
Each figure is the best (minimum) time of a call, with the median next to it.

``conv_benchmark``: every binary 3x3 layer shape of ImageNet ResNet-18
(stride 1 C -> C and the stride-2 C/2 -> C that opens a stage), batch 1 and
16.  The packed side starts from the real-valued float32 input (weights
packed once, as in an exported model) and includes the sign, bit packing,
GEMM (implicit im2col) and border correction.  Against it, on the same +-1
tensors: ``F.conv2d`` in float32 and bf16 (the faster of NCHW and
channels-last memory; eager PyTorch reorders the weights for oneDNN on every
call), the same two with weights reordered once (oneDNN's
``_convolution_pointwise``, as a frozen inference graph does), and oneDNN's
int8 conv (VNNI or AMX-INT8; quantising the +-1 input to uint8 included).
The packed side gets the faster of its two input layouts too.  The GEMM
alone (from the packed input) is reported in binary GOPS (2 M N K, K in bits)
against the machine's popcount peak loop, the two timed in blocks alternating
with each other only (after an AMX contender the core runs at a lower clock for
some milliseconds, which would be charged to whichever came next); the ideal
ratio is that peak over the float32 GFLOP/s of the row.

"""

from __future__ import annotations

import csv
import ctypes
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import numba
import numpy as np
import torch
import torch.nn.functional as F

import bnnbench
from bnnbench import hardware, omp
from bnnbench.io import write_text
from bnnbench.kernels import SELECTED, binary_conv2d_packed, measure_peak, pack_channels, pack_weights, popcount_isa, xnor_gemm
from bnnbench.kernels.buffers import aligned_empty, stream_threshold, streams
from bnnbench.packed import Int8Conv

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


@dataclass
class Timing:
    """Seconds per call: best (minimum) and median over ``runs`` calls; ``blocks``: the median call of each of the
    contender's blocks, one per round of :func:`time_interleaved`, in order."""

    best: float
    median: float
    runs: int
    blocks: tuple[float, ...] = ()


def paired_ratio(timing: Timing, baseline: Timing) -> float:
    """The median over rounds of ``timing``'s block against ``baseline``'s block of the same round: a ratio that a
    slow spell of the machine lasting a round or more leaves alone, where best / best follows the luckiest call."""
    pairs = [a / b for a, b in zip(timing.blocks, baseline.blocks)]
    return statistics.median(pairs) if pairs else float("nan")


def time_interleaved(
    calls: dict[str, Callable[[], Any]],
    budget_s: float = 1.0,
    min_runs: int = 5,
    block_s: float = 0.02,
    settings: dict[str, Callable[[], AbstractContextManager[Any]]] | None = None,
) -> dict[str, Timing]:
    """Time the calls in alternating blocks until ``budget_s`` is spent (at least ``min_runs`` calls each).

    A block is consecutive calls of one contender lasting about ``block_s``
    (at least one call), each call timed on its own; contenders take turns
    block by block, so a slow spell of the machine hits every contender alike,
    while each call runs warm as in a steady stream of calls of one layer.
    One warm-up call each first.  ``settings[name]`` (optional) makes a context
    entered around each of that contender's blocks and its warm-up, e.g. a thread
    count, so that switching it is not timed as part of every call.
    """
    settings = settings or {}

    def setting(name: str) -> AbstractContextManager[Any]:
        return settings[name]() if name in settings else nullcontext()

    for name, call in calls.items():
        with setting(name):
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    blocks: dict[str, list[float]] = {name: [] for name in calls}
    start = time.perf_counter()
    while min(len(s) for s in samples.values()) < min_runs or time.perf_counter() - start < budget_s:
        for name, call in calls.items():
            with setting(name):
                block_start, first = time.perf_counter(), len(samples[name])
                while True:
                    t0 = time.perf_counter()
                    call()
                    t1 = time.perf_counter()
                    samples[name].append(t1 - t0)
                    if t1 - block_start >= block_s:
                        break
                blocks[name].append(statistics.median(samples[name][first:]))
    return {name: Timing(min(s), statistics.median(s), len(s), tuple(blocks[name])) for name, s in samples.items()}


def set_threads(threads: int) -> None:
    """Use ``threads`` threads in torch and in numba's parallel kernels."""
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= threads <= limit:
        raise ValueError(f"--threads must lie in 1..{limit} (numba's thread pool; set NUMBA_NUM_THREADS to raise it), got {threads}")
    numba.set_num_threads(threads)  # first: launching numba's OpenMP pool resets the OpenMP thread count that torch reads
    torch.set_num_threads(threads)
    if torch.get_num_threads() != threads or numba.get_num_threads() != threads:
        raise RuntimeError(f"asked for {threads} threads, torch runs {torch.get_num_threads()} and numba {numba.get_num_threads()}")


def machine_info(threads: int) -> dict[str, Any]:
    """CPU (model name, family/model, ISA flags, the kernels' popcount ISA and micro-kernel), threads, load, versions and date."""
    return {
        "cpu": hardware.cpu_model(),
        "cpu_family_model": hardware.cpu_family_model(),
        "isa": hardware.isa(),
        "popcount_isa": popcount_isa(),
        "micro_kernel": SELECTED.name,
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "load_average_1_5_15min": " ".join(f"{load:.2f}" for load in os.getloadavg()),  # other work on the machine, at the end
        "torch": torch.__version__,
        "numba": numba.__version__,
        "numba_threading_layer": _threading_layer(),
        "elementwise_on_torch_threads": omp.available(),  # the training kernels' threads (bnnbench.omp)
        "python": platform.python_version(),
        "date": datetime.now().isoformat(timespec="seconds"),
    }


def _threading_layer() -> str:
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return "not started"


class OneDNNConv:
    """A float32 or bf16 conv with its weights reordered for oneDNN once (``torch.ops.mkldnn._convolution_pointwise``).

    What a frozen inference graph runs; eager ``F.conv2d`` reorders the
    weights on every call.  Takes channels-last input.
    """

    def __init__(self, weight: torch.Tensor, stride: int, padding: int, dtype: torch.dtype, input_shape: Sequence[int]) -> None:
        self.stride, self.padding = [stride, stride], [padding, padding]
        self.weight = torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to(dtype).to_mkldnn(), self.padding, self.stride, [1, 1], 1, list(input_shape))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, None, self.padding, self.stride, [1, 1], 1, "none", [], "")


def onednn_implementation(call: Callable[[], Any]) -> str:
    """The oneDNN convolution implementation(s) one call of ``call`` runs, from oneDNN's verbose log ("" if none)."""
    libc = ctypes.CDLL(None)
    with tempfile.TemporaryFile() as log:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                call()
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        lines = log.read().decode(errors="replace").splitlines()
    fields = [line.split(",") for line in lines if ",exec," in line and ",convolution," in line]
    return " ".join(sorted({f[f.index("convolution") + 1] for f in fields}))


@contextmanager
def numba_threads(threads: int) -> Iterator[None]:
    """``threads`` numba threads inside the block (the previous count restored after it)."""
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def conv_benchmark(
    batches: Sequence[int] = (1, 16),
    threads: int = 1,
    budget_s: float = 3.0,
    shapes: Sequence[tuple[int, int, int, int]] = RESNET18_BINARY_CONVS,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per (shape, batch): every contender's time, speed-ups, GEMM GOPS and share of the popcount peak.

    Checks that the packed and int8 results equal ``F.conv2d`` before timing
    them (bf16 rounds large sums; ``bf16_exact`` says whether it did here).
    With more than one CPU, the packed conv also runs with twice the threads
    (numba's), interleaved with the rest: ``packed_scaling`` is its speed-up.
    Returns (rows, machine); ``budget_s`` is the timing budget of a row.
    """
    set_threads(threads)
    peak = measure_peak()
    peak_call = peak.fastest.call()
    more_threads = 2 * threads if 2 * threads <= min(numba.config.NUMBA_NUM_THREADS, os.cpu_count() or 1) else None
    generator = torch.Generator().manual_seed(seed)
    rows = []
    implementations: dict[str, str] = {}
    warmed_up = False
    for cin, cout, size, stride in shapes:
        weights = torch.randn(cout, cin, 3, 3, generator=generator).sign()
        packed = pack_weights(weights)
        for batch in batches:
            x = torch.randn(batch, cin, size, size, generator=generator)
            layouts = {"nchw": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
            signs = {name: bnnbench.sign(t) for name, t in layouts.items()}
            halves = {name: t.bfloat16() for name, t in signs.items()}
            reference = F.conv2d(signs["nchw"], weights, stride=stride, padding=1)
            int8 = Int8Conv(weights, stride, 1)
            float_prepacked = OneDNNConv(weights, stride, 1, torch.float32, x.shape)
            bf16_prepacked = OneDNNConv(weights, stride, 1, torch.bfloat16, x.shape)
            for name, t in layouts.items():
                if not torch.equal(binary_conv2d_packed(t, packed, stride, 1), reference):
                    raise RuntimeError(f"packed conv differs from F.conv2d for {cin}->{cout}@{size} stride {stride} ({name}): a kernel bug")
            if not torch.equal(int8(signs["nchw"]), reference):
                raise RuntimeError(f"the int8 conv differs from F.conv2d for {cin}->{cout}@{size} stride {stride}")
            bf16_exact = torch.equal(F.conv2d(halves["nchw"], weights.bfloat16(), stride=stride, padding=1).float(), reference)
            out_size = (size - 1) // stride + 1
            bits = pack_channels(x.numpy(), 1)
            offsets = packed.offsets(size, size, stride, 1)
            out = aligned_empty((batch * out_size * out_size, offsets.shape[1]), np.float32)
            panels = packed.panels()
            calls: dict[str, Callable[[], Any]] = {}
            for name in layouts:
                calls[f"float_{name}"] = lambda t=signs[name]: F.conv2d(t, weights, stride=stride, padding=1)
                calls[f"bf16_{name}"] = lambda t=halves[name]: F.conv2d(t, weights.bfloat16(), stride=stride, padding=1)
                calls[f"packed_{name}"] = lambda t=layouts[name]: binary_conv2d_packed(t, packed, stride, 1)
            calls["float_prepacked"] = lambda: float_prepacked(signs["channels_last"])
            calls["bf16_prepacked"] = lambda: bf16_prepacked(halves["channels_last"])
            calls["int8"] = lambda: int8(signs["channels_last"])
            if not implementations:
                implementations = {name: onednn_implementation(calls[name]) for name in ("float_nchw", "float_prepacked", "bf16_prepacked", "int8")}
            times = time_interleaved(calls, budget_s)
            # The GEMM against the peak loop in blocks of their own: right after an AMX contender the core runs
            # at a lower clock for some milliseconds, which would charge the GEMM, not the loop after it.
            gemm_call = lambda: xnor_gemm(bits, (3, 3), stride, panels, offsets, out)  # noqa: E731
            times.update(time_interleaved({"gemm": gemm_call, "peak": peak_call}, budget_s))
            packed_layout = min(layouts, key=lambda name: times[f"packed_{name}"].best)
            if more_threads:
                more = {"packed_more_threads": lambda: numba_threads(more_threads)}  # switched per block, not timed per call
                if not warmed_up:  # the first second or so of a second thread runs far slower here (the scheduler settling)
                    time_interleaved({"packed_more_threads": calls[f"packed_{packed_layout}"]}, 2.0, settings=more)
                    warmed_up = True
                scaled = {"packed": calls[f"packed_{packed_layout}"], "packed_more_threads": calls[f"packed_{packed_layout}"]}
                times.update(time_interleaved(scaled, budget_s, settings=more))  # best-of over a longer spell: other work may hold a CPU
            best = {kind: _fastest(times, kind, list(layouts)) for kind in ("float", "bf16", "packed")}
            binary_ops = 2 * batch * out_size * out_size * cout * cin * 9
            peak_gops = threads * peak.fastest.ops_per_call / times["peak"].best / 1e9
            float_time = times[best["float"]]
            float_gflops = binary_ops / float_time.best / 1e9
            packed_time = times[best["packed"]]
            contenders = {
                "float32 F.conv2d": float_time.best,
                "float32 prepacked": times["float_prepacked"].best,
                "bf16 F.conv2d": times[best["bf16"]].best,
                "bf16 prepacked": times["bf16_prepacked"].best,
                "int8 oneDNN": times["int8"].best,
                "packed XNOR": packed_time.best,
            }
            row = {
                "layer": f"{cin}->{cout} @{size}x{size} s{stride}",
                "batch": batch,
                "float_ms": 1e3 * float_time.best,
                "float_median_ms": 1e3 * float_time.median,
                "float_memory": best["float"].removeprefix("float_"),
                "float_prepacked_ms": 1e3 * times["float_prepacked"].best,
                "bf16_ms": 1e3 * times[best["bf16"]].best,
                "bf16_median_ms": 1e3 * times[best["bf16"]].median,
                "bf16_prepacked_ms": 1e3 * times["bf16_prepacked"].best,
                "bf16_exact": bf16_exact,
                "int8_ms": 1e3 * times["int8"].best,
                "int8_median_ms": 1e3 * times["int8"].median,
                "packed_ms": 1e3 * packed_time.best,
                "packed_median_ms": 1e3 * packed_time.median,
                "packed_memory": best["packed"].removeprefix("packed_"),
                "speedup": float_time.best / packed_time.best,
                "speedup_median": float_time.median / packed_time.median,
                "ideal_ratio": peak_gops / float_gflops,
                "speedup_vs_float_prepacked": times["float_prepacked"].best / packed_time.best,
                "speedup_vs_bf16_prepacked": times["bf16_prepacked"].best / packed_time.best,
                "speedup_vs_int8": times["int8"].best / packed_time.best,
                "fastest": min(contenders, key=contenders.__getitem__),
                "gemm_ms": 1e3 * times["gemm"].best,
                "gemm_gops": binary_ops / times["gemm"].best / 1e9,
                "float_gflops": float_gflops,
                "popcount_peak_gops": peak_gops,
                "gemm_share_of_peak": binary_ops / times["gemm"].best / 1e9 / peak_gops,
                "gemm_stores": "streaming" if streams(out) else "cached",
                "runs": packed_time.runs,
            }
            if more_threads:
                row[f"packed_{more_threads}threads_ms"] = 1e3 * times["packed_more_threads"].best
                row["packed_scaling"] = times["packed"].best / times["packed_more_threads"].best
                row["packed_scaling_median"] = times["packed"].median / times["packed_more_threads"].median
            rows.append(row)
    if torch.get_num_threads() != threads:
        raise RuntimeError(f"torch's thread count changed during the benchmark ({torch.get_num_threads()}, not {threads})")
    machine = machine_info(threads)
    machine["popcount_peak_gops_1thread"] = peak.rates
    machine.update({f"peak_loop_{kind}_gops_1thread": rate for kind, rate in peak.rates.items()})  # flat, for the CSV
    machine["peak_loop"] = f"{peak.fastest.vector_chains} vector + {peak.fastest.scalar_chains} scalar chains"
    machine["stream_threshold_bytes"] = stream_threshold()
    machine.update({f"onednn_{name}": impl for name, impl in implementations.items()})
    return rows, machine


def _fastest(times: dict[str, Timing], kind: str, layouts: list[str]) -> str:
    """The faster layout's contender name of ``kind`` (e.g. "float_nchw")."""
    return min((f"{kind}_{layout}" for layout in layouts), key=lambda name: times[name].best)


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
