"""``bnnbench bench train``: what one training step of each binarizer costs against the full-precision model.

Per method, on the same backbone, batch and random data: images/s of one SGD step (forward,
loss + the method's regulariser, backward, update) and its ratio to the full-precision
("fp") step, timed in alternating blocks in one process (:func:`~.bench.time_interleaved`),
and the peak training memory: how far the process's resident set peaks (``VmHWM``) above
its size between steps, over 3 steps after a warm-up step, in a fresh process per method
whose allocator hands freed blocks back (:func:`peak_memory`), so that the figure is the
memory a step needs and no other model's allocations count (CUDA:
``torch.cuda.max_memory_allocated`` over ``memory_allocated``).  Every row says whether bf16 autocast,
channels_last and torch.compile were on, and the machine (CPU model and ISA, threads).
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

import bnnbench
from bnnbench.functional import formulas

from .bench import machine_info, paired_ratio, set_threads, time_interleaved
from .spec import check_formulas
from .train import bf16_hardware, resolve_channels_last

MEMORY_STEPS = 3
MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"


@dataclass(frozen=True)
class StepSettings:
    """How the benchmarked steps run: the same for every method of one benchmark."""

    net: str = "resnet20"
    family: str = "cifar"
    batch: int = 128
    stage: int = 2
    amp: bool = False
    bf16_formulas: str = "fused"  # bnnbench.functional.FORMULAS, under amp
    fp32_formulas: str = "torch"  # the same without it
    channels_last: bool | None = False  # None: as a run decides for each model (runners.train.resolve_channels_last)
    compile: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_formulas(bf16=self.bf16_formulas, fp32=self.fp32_formulas)

    @classmethod
    def auto(cls, amp: bool | None, channels_last: bool | None, device: str = "cpu", **fields: Any) -> StepSettings:
        """``amp``/``channels_last`` None: what a run on ``device`` uses by default (see ``runners/train.py``)."""
        is_cuda = device.startswith("cuda")
        return cls(
            amp=(is_cuda or bf16_hardware()) if amp is None else amp,
            channels_last=channels_last,
            device=device,
            **fields,
        )


@dataclass(frozen=True)
class Step:
    """One SGD step of a method's model, called to run it; ``channels_last``: the model's memory format."""

    run: Callable[[], None]
    channels_last: bool

    def __call__(self) -> None:
        self.run()


def training_step(method: str, settings: StepSettings, seed: int = 0) -> Step:
    """One SGD step of ``method`` (fp: the real model in stage 2) on a fixed random batch."""
    torch.manual_seed(seed)
    device = torch.device(settings.device)
    model = bnnbench.build_model(settings.net, method, family=settings.family, stage=settings.stage if method != "fp" else 2).to(device)
    model.train()
    size = 224 if settings.family == "imagenet" else 32
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(settings.batch, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, model.spec.num_classes, (settings.batch,), generator=generator).to(device)
    channels_last = resolve_channels_last(settings.channels_last, device, settings.amp, model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if settings.compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.amp), formulas(bf16=settings.bf16_formulas, fp32=settings.fp32_formulas):
            logits = forward(images)
        loss = F.cross_entropy(logits.float(), labels)
        extra = bnnbench.regularization_loss(model)
        if extra is not None:
            loss = loss + extra
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return Step(step, channels_last)


def _peak_rss_kib() -> int:
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM")).split()[1])


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter of this process (Linux ``clear_refs`` 5); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _memory_of(method: str, settings: StepSettings, threads: int) -> float:
    """Peak training memory of ``method`` in MiB: growth of the peak over ``MEMORY_STEPS`` steps after a warm-up step."""
    set_threads(threads)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    step = training_step(method, settings)
    step()  # allocations of the first step (and compilation) are not the step's working memory
    if settings.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(MEMORY_STEPS):
            step()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    import gc

    gc.collect()
    current = int(next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS")).split()[1])
    if not _reset_peak_rss():
        return float("nan")
    for _ in range(MEMORY_STEPS):
        step()
    return (_peak_rss_kib() - current) / 1024


def peak_memory(methods: Sequence[str], settings: StepSettings, threads: int) -> dict[str, float]:
    """Per method, :func:`_memory_of` measured in a fresh (spawned) process whose allocator returns every
    large block to the system when it is freed (``MALLOC_MMAP_THRESHOLD_``), so that the resident set
    follows the tensors alive and its peak is the step's working memory."""
    context = multiprocessing.get_context("spawn")
    previous = os.environ.get(MMAP_THRESHOLD)
    os.environ[MMAP_THRESHOLD] = "65536"  # read by glibc when the child starts; fixed, so not raised after frees
    try:
        with context.Pool(1, maxtasksperchild=1) as pool:
            return {m: pool.apply(_memory_of, (m, settings, threads)) for m in methods}
    finally:
        if previous is None:
            os.environ.pop(MMAP_THRESHOLD, None)
        else:
            os.environ[MMAP_THRESHOLD] = previous


def prepared_steps(settings: StepSettings, methods: Sequence[str] | None = None) -> dict[str, Step]:
    """:func:`training_step` of fp and each of ``methods`` (default: all registered), fp first, each run once so that
    compilation (when asked) and first-use costs fall before any measurement."""
    names = ["fp"] + [name for name in (methods or bnnbench.list_methods()) if name != "fp"]
    steps = {name: training_step(name, settings) for name in names}
    for step in steps.values():
        step()
    return steps


def train_benchmark(
    settings: StepSettings, methods: Sequence[str] | None = None, threads: int = 1, budget_s: float = 3.0, memory: bool = True
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per method (fp first): images/s, step time, ratio to fp (best, median, and the median of each round's
    ratio: :func:`~.bench.paired_ratio`), peak memory and its ratio."""
    set_threads(threads)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64  # one compiled model per method in this process
    steps = prepared_steps(settings, methods)
    names = list(steps)
    times = time_interleaved(steps, budget_s * len(names), min_runs=3)
    peaks = peak_memory(names, settings, threads) if memory else {}
    reference = times["fp"]
    rows = []
    for name in names:
        rows.append(
            {
                "method": name,
                "net": f"{settings.family}/{settings.net}",
                "stage": settings.stage,
                "batch": settings.batch,
                "device": settings.device,
                "amp_bf16": settings.amp,
                "bf16_formulas": settings.bf16_formulas if settings.amp else "",
                "fp32_formulas": "" if settings.amp else settings.fp32_formulas,
                "channels_last": steps[name].channels_last,
                "compile": settings.compile,
                "images_per_s": settings.batch / times[name].best,
                "images_per_s_median": settings.batch / times[name].median,
                "step_ms": 1e3 * times[name].best,
                "step_vs_fp": times[name].best / reference.best,
                "step_vs_fp_median": times[name].median / reference.median,
                "step_vs_fp_paired": paired_ratio(times[name], reference),
                "peak_mib": peaks.get(name, float("nan")),
                "peak_vs_fp": peaks.get(name, float("nan")) / peaks["fp"] if peaks.get("fp") else float("nan"),
                "runs": times[name].runs,
            }
        )
    return rows, machine_info(threads)


__all__ = ["Step", "StepSettings", "peak_memory", "prepared_steps", "train_benchmark", "training_step"]
