"""Where the runs of a table train: this process, local worker processes, or jobs submitted
through submitit (Slurm, or submitit's local executor).

One interface: :meth:`Executor.run` calls a picklable module-level function on each task and
yields a :class:`Finished` per task as it ends, in whatever order (``on_start(index)`` is called
as each task is started or submitted); when the caller stops iterating
(``contextlib.closing``), the calls not yet finished are cancelled.  :meth:`Executor.share`
says how many of the runs share one machine's cores at a time.  The function
itself decides what an exception inside a run means (see ``experiments.run_task``); what comes
back as :attr:`Finished.error` is a call that could not complete (a dead worker, a Slurm job
that failed or was cancelled).

Every executor writes into the same results folder: a run's lock (``runners/locks.py``)
keeps two processes from training it at once, whichever executors they use.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUBMITIT_CLUSTERS = {"slurm": "slurm", "submitit-local": "local"}
EXECUTORS = ("local", *SUBMITIT_CLUSTERS)
CUDA_WORKER_THREADS = 2  # a GPU run's CPU side (launching kernels, the epoch plan) needs little more


@dataclass(frozen=True)
class Finished:
    """Task ``index`` ended: with ``value`` (what the function returned), or with ``error`` when the call itself failed."""

    index: int
    value: Any = None
    error: str | None = None


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, as Slurm and taskset set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_threads(device_type: str, workers: int, cores: int | None = None) -> int:
    """torch threads of each of ``workers`` processes sharing the machine.

    CPU: the cores split evenly (independent one-thread runs use a CPU better than one run with
    several threads).  CUDA: the GPU does the arithmetic; each process gets at most
    ``CUDA_WORKER_THREADS``, so that N processes do not spin N x cores OpenMP threads.
    """
    share = max(1, (cores or available_cores()) // max(workers, 1))
    return min(share, CUDA_WORKER_THREADS) if device_type == "cuda" else share


Started = Callable[[int], None]


def _ignore(index: int) -> None:
    pass


class Executor(ABC):
    """Runs ``fn(task)`` for each task somewhere; see the module docstring."""

    description: str

    @abstractmethod
    def run(self, fn: Callable[[Any], Any], tasks: Sequence[Any], on_start: Started = _ignore) -> Iterator[Finished]:
        """Yield one :class:`Finished` per task as it ends; closing the iterator cancels the rest."""

    @abstractmethod
    def share(self, tasks: int) -> int | None:
        """How many of ``tasks`` runs share one machine's cores at a time (None: this process's threads are left alone)."""


class InProcess(Executor):
    """One task after the other in this process; exceptions (Ctrl-C included) propagate."""

    description = "this process, one run after the other"

    def run(self, fn: Callable[[Any], Any], tasks: Sequence[Any], on_start: Started = _ignore) -> Iterator[Finished]:
        for index, task in enumerate(tasks):
            on_start(index)
            yield Finished(index, fn(task))

    def share(self, tasks: int) -> int | None:
        return None


_STOP: Any = None  # in a pool worker: the pool's stop event


def _init_pool_worker(stop: Any) -> None:
    global _STOP
    _STOP = stop


def _unless_stopped(fn: Callable[[Any], Any], task: Any) -> Any:
    """In a pool worker: ``fn(task)``, unless the pool stopped before this task started (tasks the
    pool had already handed to its workers' queue cannot be cancelled from the parent)."""
    if _STOP is not None and _STOP.is_set():
        raise RuntimeError("not started: the command stopped before this run's turn")
    return fn(task)


def sigterm_to_workers(stop: Any) -> Any:
    """While a pool runs (main thread): SIGTERM to this process stops the pool (``stop``) and goes on
    to its worker processes, which save their finished epochs, and raises ``RunInterrupted`` here,
    so that the pool shuts down with them instead of leaving them orphaned."""
    from .train import sigterm_as_interrupt

    def stop_workers() -> None:
        stop.set()
        for worker in multiprocessing.active_children():
            worker.terminate()  # SIGTERM: the worker's training loop saves and stops

    return sigterm_as_interrupt(before=stop_workers)


@dataclass
class ProcessPool(Executor):
    """``workers`` spawned worker processes on this machine (spawn: no forked CUDA, OpenMP or numba state)."""

    workers: int

    @property
    def description(self) -> str:  # type: ignore[override]
        return f"{self.workers} local worker processes"

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"a process pool needs at least 1 worker, got {self.workers}")

    def share(self, tasks: int) -> int | None:
        return min(self.workers, tasks)

    def run(self, fn: Callable[[Any], Any], tasks: Sequence[Any], on_start: Started = _ignore) -> Iterator[Finished]:
        context = multiprocessing.get_context("spawn")
        stop = context.Event()
        pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context, initializer=_init_pool_worker, initargs=(stop,))
        try:
            with sigterm_to_workers(stop):
                futures = {}
                for index, task in enumerate(tasks):
                    on_start(index)
                    futures[pool.submit(_unless_stopped, fn, task)] = index
                for future in as_completed(futures):
                    try:
                        result = Finished(futures[future], future.result())
                    except Exception as exc:  # the worker died (BrokenProcessPool) or the result did not unpickle
                        result = Finished(futures[future], error=f"{type(exc).__name__}: {exc}")
                    yield result
        finally:
            stop.set()  # finished, or closed early: runs not started yet are dropped
            pool.shutdown(wait=True, cancel_futures=True)  # running ones finish (or, interrupted, save) first


class Requeueable:
    """``fn`` as a callable that submitit requeues when its Slurm time runs out (it has a ``checkpoint``
    method): the requeued job calls ``fn`` with the same task, which resumes the run from its last
    finished epoch."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __call__(self, task: Any) -> Any:
        return self.fn(task)

    def checkpoint(self, task: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, task)


def import_submitit(executor: str) -> Any:
    """The submitit module, or an error saying how to install it."""
    try:
        import submitit
    except ImportError:
        raise ImportError(
            f"--executor {executor} submits runs through submitit, which is not installed: pip install submitit "
            "(or pip install 'bnnbench[cluster]')"
        ) from None
    return submitit


@dataclass
class Submitit(Executor):
    """One submitit job per run: on Slurm (``cluster="slurm"``) or as local subprocesses (``"local"``).

    At most ``max_running`` jobs are queued or running at once (None: all); job files and logs go
    to ``folder/<job id>_*``.  ``parameters`` are submitit's (``timeout_min``, ``gpus_per_node``,
    ``cpus_per_task``, ``slurm_partition``, ...).  Closing the iterator early (a data error, Ctrl-C)
    cancels the jobs still queued or running; Slurm sends them SIGTERM and each keeps its finished
    epochs.
    """

    cluster: str
    folder: Path
    parameters: dict[str, Any] = field(default_factory=dict)
    max_running: int | None = None
    poll_s: float = 1.0

    def __post_init__(self) -> None:
        if self.cluster not in SUBMITIT_CLUSTERS.values():
            raise ValueError(f"submitit cluster must be one of {', '.join(SUBMITIT_CLUSTERS.values())}, got {self.cluster!r}")
        name = next(k for k, v in SUBMITIT_CLUSTERS.items() if v == self.cluster)
        self._submitit = import_submitit(name)

    @property
    def description(self) -> str:  # type: ignore[override]
        limit = "all at once" if self.max_running is None else f"at most {self.max_running} at once"
        return f"submitit {self.cluster} jobs ({limit}; job files in {self.folder})"

    def share(self, tasks: int) -> int | None:
        if self.cluster == "slurm":
            return 1  # each job has its own allocation (its cores: --slurm-cpus)
        return min(self.max_running or tasks, tasks)

    def run(self, fn: Callable[[Any], Any], tasks: Sequence[Any], on_start: Started = _ignore) -> Iterator[Finished]:
        executor = self._submitit.AutoExecutor(folder=str(Path(self.folder) / "%j"), cluster=self.cluster)
        executor.update_parameters(**self.parameters)
        call = Requeueable(fn)
        waiting = list(enumerate(tasks))
        running: dict[int, Any] = {}
        limit = self.max_running or len(waiting)
        try:
            while waiting or running:
                while waiting and len(running) < limit:
                    index, task = waiting.pop(0)
                    on_start(index)
                    running[index] = executor.submit(call, task)
                ended = [index for index, job in running.items() if job.done()]
                for index in ended:
                    job = running.pop(index)
                    try:
                        yield Finished(index, job.result())
                    except Exception as exc:  # the job failed, timed out without requeue, or was cancelled
                        yield Finished(index, error=f"submitit job {job.job_id}: {type(exc).__name__}: {str(exc)[-2000:]}")
                if not ended:
                    time.sleep(self.poll_s)
        finally:
            for job in running.values():
                job.cancel(check=False)


__all__ = [
    "CUDA_WORKER_THREADS",
    "EXECUTORS",
    "Executor",
    "Finished",
    "InProcess",
    "ProcessPool",
    "Requeueable",
    "Submitit",
    "available_cores",
    "import_submitit",
    "worker_threads",
]
