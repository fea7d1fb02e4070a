"""Data-parallel training over several processes with ``torch.distributed`` (DDP).

Launch
------
The processes are started by torch's elastic agent, the engine behind ``torchrun``:

- ``torchrun --nproc_per_node N -m bnnbench run ...`` (one or several nodes), or
- ``bnnbench run --nproc N ...``, which calls the same agent (:func:`launch_local`, a standalone
  c10d rendezvous on a free local port) with the parsed command as the workers' entry point.

Either way each worker finds ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` in its environment, and :func:`join_from_env` joins the process group:
NCCL with one GPU per process (``cuda:LOCAL_RANK``) on CUDA, gloo on CPU.

What the ranks share
--------------------
- The model: :func:`data_parallel` wraps it in ``DistributedDataParallel`` (gradients averaged
  over the ranks each step; parameters and buffers broadcast from rank 0 when it is wrapped),
  optionally with ``SyncBatchNorm`` (:func:`sync_batch_norm`, CUDA only).  The regulariser,
  the diagnostics callbacks and the checkpoints use the unwrapped module.
- The batch: ``--batch-size`` is the global batch, split evenly over the processes
  (:func:`process_batch_size`), as in the upstream scripts (one process, ``DataParallel``).
- The data: every rank reads its DistributedSampler-style shard (``make_data(distributed=True)``).
- Metrics: sums are all-reduced (:func:`all_reduce_sum`).  The shards pad the order with
  repeated samples so that every rank gets the same count; :func:`unpadded_share` tells the
  evaluation how many of a rank's samples are real, so the test accuracy counts every test image
  exactly once.
- Files: only rank 0 writes (results, logs, checkpoints, progress); values rank 0 decides, such as
  the run directory's name, reach the others through :func:`main_process_value`.

Rank 0 is the *main process*; without a process group the single process is.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .display import Display, EpochBar

T = TypeVar("T")

# What torchrun (and the elastic agent behind --nproc) sets in each worker's environment.
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ======================================================================== where am I
def launched_by_torchrun() -> bool:
    """True in a process started by torchrun or ``bnnbench run --nproc`` (the rendezvous variables are set)."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def is_distributed() -> bool:
    """A process group is up (this process is one rank of several, or of one)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the process that writes the run directory."""
    return rank() == 0


# ======================================================================== the process group
def join_from_env(device: torch.device) -> bool:
    """Join the torchrun job this process belongs to; True if this call started the process group.

    Does nothing outside torchrun or when a group is already up (a caller that set up its own).
    The backend follows the device: NCCL for CUDA, gloo for CPU.
    """
    if is_distributed() or not launched_by_torchrun():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(rank_device(device))
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"distributed training runs on CUDA (NCCL) or on the CPU (gloo), not on {device.type!r}; pass --device cuda or cpu")
    dist.init_process_group(backend)
    return True


def leave() -> None:
    """Tear the process group down (the counterpart of :func:`join_from_env`)."""
    if is_distributed():
        dist.destroy_process_group()


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Within the block this process is a rank of its torchrun job (if it belongs to one); the
    group is left at the end when this block joined it."""
    joined = join_from_env(device)
    try:
        yield
    finally:
        if joined:
            leave()


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` on CUDA under torchrun, ``device`` otherwise."""
    if device.type != "cuda" or not launched_by_torchrun():
        return device
    local = int(os.environ["LOCAL_RANK"])
    if device.index is not None and device.index != local:
        raise ValueError(
            f"--device {device} names one GPU, but under torchrun each process uses the GPU of its LOCAL_RANK "
            f"(this one: cuda:{local}); pass --device cuda (choose the GPUs with CUDA_VISIBLE_DEVICES)"
        )
    if local >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {local} has no GPU: this node has {torch.cuda.device_count()}; start at most that many processes per node")
    return torch.device("cuda", local)


def backend_name() -> str | None:
    return dist.get_backend() if is_distributed() else None


# ======================================================================== what the ranks exchange
def main_process_value(compute: Callable[[], T]) -> T:
    """``compute()`` run on rank 0 only; every rank gets its result, or raises its error."""
    if not is_distributed():
        return compute()
    box: list[Any] = [None]
    if is_main_process():
        try:
            box = [(True, compute())]
        except Exception as exc:  # every rank raises it, instead of the others waiting forever
            box = [(False, exc)]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def all_gather(value: T) -> list[T]:
    """Every rank's ``value`` (picklable), in rank order."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks, in place (unchanged in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP keeps the parameters equal, but each rank updates its running statistics from its own
    batches; after this call every rank evaluates exactly the model rank 0 saves.
    """
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ======================================================================== model, batch and shards
def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel when a process group is up, else ``module``.

    Wrapping broadcasts rank 0's parameters and buffers, so all ranks start from the same state.
    Every parameter must take part in each step's loss (true of every built-in method and backbone).
    """
    if not is_distributed():
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def check_sync_batch_norm(device: torch.device) -> None:
    """SyncBatchNorm needs CUDA tensors (torch raises on CPU inputs)."""
    if device.type != "cuda":
        raise ValueError("--sync-bn: torch's SyncBatchNorm runs on GPUs only; drop --sync-bn for CPU (gloo) runs")


def sync_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every BatchNorm replaced by SyncBatchNorm (statistics over the global batch)."""
    check_sync_batch_norm(device)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def check_processes(global_batch: int, sync_bn: bool, device: torch.device, processes: int) -> None:
    """What a run on ``processes`` processes needs, checked before anything is loaded or started."""
    if processes < 1:
        raise ValueError(f"--nproc must be at least 1, got {processes}")
    process_batch_size(global_batch, processes)
    if sync_bn and processes > 1:
        check_sync_batch_norm(device)


def process_batch_size(global_batch: int, processes: int) -> int:
    """One process's share of the global training batch; it must split evenly."""
    if global_batch % processes:
        raise ValueError(
            f"--batch-size {global_batch} is the global batch and must split evenly over {processes} processes; "
            f"pass a multiple of {processes}"
        )
    return global_batch // processes


def unpadded_share(num_samples: int, rank: int, world_size: int) -> int:
    """How many of the first samples of ``rank``'s shard are real, not padding.

    ``bnnbench.data.sampling.shard`` pads the order by repeating its head up to a multiple of
    ``world_size`` and gives rank ``r`` positions ``r, r + world_size, ...``; the real positions
    (``< num_samples``) come first, so the padding (at most one sample per rank) is at the end.
    """
    return len(range(rank, num_samples, world_size))


# ======================================================================== output
class SilentDisplay(Display):
    """The display of ranks other than 0: no bars, no log lines (rank 0 reports for everyone)."""

    def log(self, message: str) -> None:
        pass

    @contextmanager
    def epoch(self, stage: int, epoch: int, epochs: int, steps: int) -> Iterator[EpochBar]:
        yield EpochBar(None, None)

    def epoch_summary(self, row: dict[str, Any]) -> None:
        pass


# ======================================================================== launcher
class WorkersFailed(RuntimeError):
    """A worker process of :func:`launch_local` died or raised; the message names the rank and why."""


class LaunchInterrupted(Exception):
    """The launcher got SIGINT/SIGTERM; the agent passed it on to the workers and stopped them."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _describe_failure(global_rank: int, failure: Any) -> str:
    """One line about a failed worker from torch elastic's ``ProcessFailure``."""
    who = f"rank {global_rank} (pid {failure.pid})"
    if failure.exitcode < 0:
        return f"{who} was killed by {signal.Signals(-failure.exitcode).name}"
    # the error file's message: "Type: text" (a dict with the traceback when the worker raised)
    message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
    lines = str(message).strip().splitlines()
    reason = f": {lines[0]}" if lines and not lines[0].startswith("To enable traceback") else ""
    return f"{who} failed with exit code {failure.exitcode}{reason}"


def launch_local(entrypoint: Callable[..., T], args: tuple[Any, ...], nproc: int) -> list[T]:
    """Run ``entrypoint(*args)`` in ``nproc`` local worker processes through torch's elastic agent.

    The agent is torchrun's (``torch.distributed.launcher.api.elastic_launch``): a standalone c10d
    rendezvous on a free port, the torchrun environment in every worker, no restarts.  When a
    worker dies or raises, the agent stops the others and this raises :class:`WorkersFailed`
    naming the first failure.  Returns the workers' return values in rank order.

    ``OMP_NUM_THREADS`` defaults to 1 per worker, as with torchrun.  Check ``nproc`` and the run's
    options with :func:`check_processes` first.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        start_method="spawn",
    )
    try:
        results = elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as exc:
        first, failure = exc.get_first_failure()
        others = [_describe_failure(r, f) for r, f in sorted(exc.failures.items()) if r != first]
        also = f" (then {'; '.join(others)})" if others else ""
        raise WorkersFailed(f"{_describe_failure(first, failure)}{also}; the agent stopped the other ranks") from None
    except SignalException as exc:
        raise LaunchInterrupted(int(exc.sigval)) from None
    return [results[r] for r in sorted(results)]


__all__ = [
    "LaunchInterrupted",
    "SilentDisplay",
    "WorkersFailed",
    "all_gather",
    "all_reduce_sum",
    "backend_name",
    "barrier",
    "broadcast_buffers",
    "check_processes",
    "check_sync_batch_norm",
    "data_parallel",
    "is_distributed",
    "is_main_process",
    "join_from_env",
    "launch_local",
    "launched_by_torchrun",
    "leave",
    "main_process_value",
    "process_batch_size",
    "rank",
    "rank_device",
    "sync_batch_norm",
    "unpadded_share",
    "world_size",
]
