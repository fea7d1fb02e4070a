"""``--jobs auto``: how many runs to train at once on this machine.

CPU: one run per core (capped by the runs to make); each then trains on one thread.

CUDA: as many runs as the GPU's free memory holds, capped by the CPU cores (each process needs
one to launch its kernels) and by the runs to make.  One run's footprint is measured, not
guessed: a probe process (spawned, so that the command itself never holds a CUDA context)
opens each distinct run's data on the GPU as the run would (the resident CIFAR arrays
included), builds its model, takes ``PROBE_STEPS`` training steps (bf16 autocast and
channels_last as the run would, SGD with momentum, the method's regulariser) and one test
batch, and reads ``torch.cuda.max_memory_reserved``.  The largest of these, plus
``CUDA_CONTEXT_MIB`` for what the caching allocator does not see (the CUDA context, loaded
kernels, library handles), is one run's share; ``MEMORY_SHARE`` of the free memory is divided
by it.
"""

from __future__ import annotations

import gc
import multiprocessing
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import bnnbench
from bnnbench import registry
from bnnbench.data import open_data
from bnnbench.errors import ConfigError

from .executors import available_cores
from .spec import Machine, RunSpec, data_request

PROBE_STEPS = 3
CUDA_CONTEXT_MIB = 1024  # per process, beyond the allocator's peak: context, kernels, cuDNN/cuBLAS handles
MEMORY_SHARE = 0.9  # of the free GPU memory the runs may fill together
GIB = 2**30


@dataclass(frozen=True)
class Footprint:
    """What the probe measured on one GPU."""

    peak_bytes: int  # largest max_memory_reserved over the probed runs
    free_bytes: int  # free GPU memory when the probe started
    total_bytes: int
    device_name: str
    probed: int  # distinct runs probed


def jobs_from_memory(free_bytes: int, peak_bytes: int, cores: int, runs: int) -> tuple[int, int]:
    """(runs at once, runs the memory alone would hold) for the numbers of the module docstring."""
    per_run = peak_bytes + CUDA_CONTEXT_MIB * 2**20
    by_memory = int(MEMORY_SHARE * free_bytes // per_run)
    return max(1, min(by_memory, cores, runs)), by_memory


def _probe_key(spec: RunSpec) -> str:
    """Runs that differ only in seed or schedule take the same memory."""
    recipe = spec.recipe
    return repr((spec.model.to_dict(), spec.data, spec.stages[0], recipe.batch_size, recipe.eval_batch_size, recipe.train_subset, recipe.test_subset, spec.augment))


def _probe_one(spec: RunSpec, machine: Machine, device: torch.device, amp: bool, channels_last: bool) -> int:
    """max_memory_reserved of ``PROBE_STEPS`` training steps and one test batch of ``spec`` (its first stage)."""
    torch.cuda.reset_peak_memory_stats(device)
    stage = spec.recipe.stage(spec.stages[0])
    bundle = open_data(data_request(spec, machine, device, 1, False))
    model = spec.model.build(stage=spec.stages[0]).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=stage.lr, momentum=spec.recipe.momentum)
    model.train()
    for _, (images, labels) in zip(range(PROBE_STEPS), bundle.train):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(images.contiguous(memory_format=memory_format))
        loss = F.cross_entropy(logits.float(), labels)
        extra = bnnbench.regularization_loss(model) if stage.regularizer else None
        optimizer.zero_grad(set_to_none=True)
        (loss if extra is None else loss + extra).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        images, _ = next(iter(bundle.test))
        model(images.contiguous(memory_format=memory_format))
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_reserved(device)


def measure_footprint(specs: Sequence[RunSpec], machine: Machine, plugins: Sequence[str] = ()) -> Footprint:
    """Probe each distinct run of ``specs`` on ``machine``'s GPU, in this process (see the module docstring)."""
    from .train import resolve_amp

    loaded = set(registry.loaded_plugins())
    for path in plugins:
        if path not in loaded:
            bnnbench.load_plugin(path)
    device = machine.resolve_device()
    if device.type != "cuda":
        raise ConfigError(f"the memory probe measures a CUDA GPU, not {device}")
    if device.index is not None:
        torch.cuda.set_device(device)
    free, total = torch.cuda.mem_get_info(device)
    amp = resolve_amp(machine, device)
    channels_last = True if machine.channels_last is None else machine.channels_last
    distinct = list({_probe_key(spec): spec for spec in specs}.values())
    peak = 0
    for spec in distinct:
        peak = max(peak, _probe_one(spec, machine, device, amp, channels_last))
        gc.collect()
        torch.cuda.empty_cache()  # the next probe starts from the data and model it allocates itself
    return Footprint(peak, free, total, torch.cuda.get_device_name(device), len(distinct))


def probe_footprint(specs: Sequence[RunSpec], machine: Machine) -> Footprint:
    """:func:`measure_footprint` in a spawned process."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure_footprint, (list(specs), machine, registry.loaded_plugins()))


def _wants_cuda(machine: Machine) -> bool:
    if machine.device == "auto":
        return torch.cuda.is_available()
    return torch.device(machine.device).type == "cuda"


def auto_jobs(specs: Sequence[RunSpec], machine: Machine, log: Callable[[str], None] = print) -> int:
    """How many of the runs ``specs`` (those still to make) to train at once; says why through ``log``."""
    cores, runs = available_cores(), max(len(specs), 1)
    if not _wants_cuda(machine):
        jobs = max(1, min(cores, runs))
        log(f"--jobs auto: {jobs} at once (one run per CPU core: {cores} cores, {len(specs)} runs to make)")
        return jobs
    if not torch.cuda.is_available():
        raise ConfigError(
            f"--jobs auto on --device {machine.device} divides the GPU's free memory among the runs, but CUDA is not "
            "available here (torch.cuda.is_available() is False); pass --device cpu (auto: one run per core) or --jobs N"
        )
    if not specs:
        return 1
    found = probe_footprint(specs, machine)
    jobs, by_memory = jobs_from_memory(found.free_bytes, found.peak_bytes, cores, runs)
    log(
        f"--jobs auto: {jobs} at once on {found.device_name}: {found.free_bytes / GIB:.1f} of {found.total_bytes / GIB:.1f} GiB free, "
        f"{found.peak_bytes / GIB:.2f} GiB peak per run (largest of {found.probed} probed) + {CUDA_CONTEXT_MIB / 1024:.0f} GiB "
        f"CUDA context allowance -> {by_memory} by memory; {cores} CPU cores; {len(specs)} runs to make"
    )
    return jobs


__all__ = ["CUDA_CONTEXT_MIB", "Footprint", "MEMORY_SHARE", "PROBE_STEPS", "auto_jobs", "jobs_from_memory", "measure_footprint", "probe_footprint"]
