"""The runs that tables and figures need: find finished matching runs, train the missing ones.

A table row or a sweep point asks for a :class:`~.spec.RunSpec` *template*: the model, the data
and the stages; :func:`plan` gives it each table's recipe (the budget) and every seed, and
looks in ``<out>/runs/`` for runs whose spec has the same canonical JSON
(:meth:`RunSpec.key`, read from every ``config.json`` this project has written, see
:meth:`RunSpec.from_saved`).  :func:`execute` trains what is missing (one run after the
other, several at once in worker processes, or as submitit jobs: ``runners/executors.py``),
each in its own run directory so an interruption loses at most one epoch: the next call
resumes it.  Each run is made under its lock (``runners/locks.py``), and looked up again once
the lock is held: when two commands share one results folder, a run the other one finished
meanwhile is reused, one it is training is waited for, never trained twice at once.  A run
directory that another process trains outside this (``bnnbench run``, ``--resume``) holds its
own lock: it is skipped, with a note, and left to that process.

What "matching" compares is exactly the RunSpec: the data set name; the model as resolved
(network, family, classes, both binarizers with every hyper-parameter, act_norm, backbone
options); the recipe (every field but its description and source); seed, stages, stage-2
initialisation and augmentation.  Not compared: the :class:`~.spec.Machine` (device, bf16,
loader, workers, where the data were read from), which the tables' captions list instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import torch

import bnnbench
from bnnbench import registry
from bnnbench.data import DataError

from .catalog import RunRecord, read_run, scan_runs
from .display import Display
from .executors import Executor, InProcess, ProcessPool, worker_threads
from .locks import RunBusy, run_lock
from .recipes import Recipe
from .rundir import RunDirectory
from .results import CONFIG
from .spec import Machine, RunSpec
from .teachers import final_checkpoint
from .train import TrainingDiverged, train
from . import distributed


def record_signature(record: RunRecord) -> str | None:
    """The run signature (:meth:`RunSpec.key`) of a run directory; None when its config.json cannot say."""
    spec = record.spec
    return None if spec is None else spec.key()


# ------------------------------------------------------------------ planning
@dataclass
class Job:
    """One run a table needs (its spec with recipe and seed) and what is known about it."""

    spec: RunSpec
    machine: Machine
    key: str
    record: RunRecord | None = None  # the run used (finished) or to resume (unfinished/failed)
    note: str = ""  # why there is no number (diverged, data not found, ...)
    teacher: bool = False  # the teacher of another job: a finished run counts only with its final checkpoint
    diverged: bool = False  # trained here and diverged (before its first epoch ended, it left no run directory)

    @property
    def status(self) -> str:
        """``finished``, ``diverged``, ``unfinished``/``failed`` (to resume) or ``missing`` (to train)."""
        if self.record is not None:
            return self.record.status
        return "diverged" if self.diverged else "missing"

    @property
    def done(self) -> bool:
        return self.status in ("finished", "diverged")


@dataclass
class Plan:
    """The distinct jobs of a set of templates and seeds; templates that resolve alike share one job."""

    jobs: list[Job]
    index: dict[tuple[RunSpec, int], Job]

    def job(self, template: RunSpec, seed: int) -> Job:
        return self.index[(template, seed)]


def plan(templates: Iterable[RunSpec], seeds: Iterable[int], recipe: Recipe, machine: Machine) -> Plan:
    """One job per distinct (template, seed) with ``recipe``, matched against the runs in ``machine.out/runs/``.

    A finished matching run is used (the newest if several); else a diverged one
    (rerunning would diverge again); else the newest unfinished or failed one, to
    be resumed; else the job is missing and :func:`execute` trains it.  A run with a teacher
    (``RunSpec.teacher_spec``) adds its teacher's job first (``Job.teacher``: a finished teacher
    counts only with its final checkpoint, so a committed run without one is trained again); a
    finished student needs no teacher job.
    """
    by_key: dict[str, list[RunRecord]] = {}
    for record in scan_runs(machine.run_root()):
        key = record_signature(record)
        if key is not None:
            by_key.setdefault(key, []).append(record)
    jobs: dict[tuple[str, bool], Job] = {}
    index: dict[tuple[RunSpec, int], Job] = {}
    seeds = list(seeds)
    for template in dict.fromkeys(templates):
        for seed in seeds:
            spec = template.replace(recipe=recipe, seed=seed)
            key = spec.key()
            job = jobs.get((key, False)) or Job(spec, machine, key, _choose(by_key.get(key, [])))
            teacher = spec.teacher_spec
            if not job.done and teacher is not None and machine.teacher_dir is None and (tkey := (teacher.key(), True)) not in jobs:
                jobs[tkey] = Job(teacher, machine, tkey[0], _choose(by_key.get(tkey[0], []), teacher=True), teacher=True)
            jobs[(key, False)] = index[(template, seed)] = job
    return Plan(list(jobs.values()), index)


def _choose(records: list[RunRecord], teacher: bool = False) -> RunRecord | None:
    """The record to use or resume (see :func:`plan`); for a ``teacher``, a finished run only with its final checkpoint."""
    for status in ("finished", "diverged", "unfinished", "failed"):
        matching = [r for r in records if r.status == status and not (teacher and status == "finished" and final_checkpoint(r) is None)]
        if matching:
            return matching[-1]  # newest (records are sorted by creation time)
    return None


# ------------------------------------------------------------------ running
@dataclass
class Outcome:
    """What :func:`execute` did: runs trained or resumed, and why it stopped early if it did."""

    trained: list[Job] = field(default_factory=list)
    stopped: str | None = None


@dataclass(frozen=True)
class _Result:
    """What making one run ended with (picklable: it comes back from worker processes and jobs)."""

    path: str | None  # the run directory, once one was chosen
    diverged: str | None = None
    data_error: str | None = None
    data_missing: bool = False
    failed: str | None = None  # any other error (in a worker process or job)
    reused: bool = False  # another process had finished it by the time its lock was held
    busy: str | None = None  # another process holds its run directory (locks.RunBusy)


@dataclass(frozen=True)
class Task:
    """One run to make, as every executor hands it to :func:`run_task` (picklable).

    ``share``: how many runs share this machine's cores (their torch threads follow from it,
    see :func:`~.executors.worker_threads`); None leaves the threads alone.  ``plugins``: the
    method plugin files to load first, as the parent process did.
    """

    spec: RunSpec
    machine: Machine
    quiet: bool = True
    share: int | None = None
    plugins: tuple[str, ...] = ()
    teacher: bool = False  # made as another run's teacher: reused only with its final checkpoint


def _train(spec: RunSpec, machine: Machine, resume: str | None, quiet: bool) -> _Result:
    """Train (or resume) one run (with the diagnostics every run records)."""
    with distributed.process_group(machine.resolve_device()):
        directory = RunDirectory.open(resume) if resume else RunDirectory.new(spec, machine)
        try:
            train(directory, display=Display(quiet))
        except TrainingDiverged as exc:
            return _Result(str(directory.path), diverged=str(exc))
        except DataError as exc:
            return _Result(str(directory.path), data_error=str(exc), data_missing=isinstance(exc, FileNotFoundError))
        except RunBusy as exc:
            return _Result(str(directory.path), busy=str(exc))
    return _Result(str(directory.path))


def _prepare_process(task: Task) -> None:
    """Threads and plugins of the process that makes ``task`` (a worker or a job may be fresh)."""
    if task.share is not None:
        torch.set_num_threads(worker_threads(task.machine.resolve_device().type, task.share))
    loaded = set(registry.loaded_plugins())
    for path in task.plugins:
        if path not in loaded:
            bnnbench.load_plugin(path)


def run_task(task: Task) -> _Result:
    """Make one run in this process: under its lock, look its signature up in ``out/runs`` again
    (the plan may be stale); reuse it when it is finished or diverged, else resume the newest
    unfinished one, else train it.  A run with a teacher to train makes its teacher first the same
    way (unless ``--teacher`` names one), reused only with its final checkpoint; a teacher that
    diverged, lacks its data or is busy stops the student with that result.  Exceptions other
    than divergence and data errors propagate."""
    _prepare_process(task)
    key = task.spec.key()
    with run_lock(task.machine.out, key, log=print):
        current = _choose([r for r in scan_runs(task.machine.run_root()) if record_signature(r) == key], teacher=task.teacher)
        if current is not None and current.status in ("finished", "diverged"):
            return _Result(str(current.path), reused=True)
        teacher = task.spec.teacher_spec
        if teacher is not None and task.machine.teacher_dir is None:  # its lock is taken inside this one; a teacher has no teacher
            made = run_task(Task(teacher, task.machine, task.quiet, teacher=True))
            if made.diverged:
                return _Result(None, failed=f"its teacher {made.path} diverged: {made.diverged}")
            if made.data_error or made.busy:
                return dataclasses.replace(made, reused=False, path=None)
        return _train(task.spec, task.machine, str(current.path) if current else None, task.quiet)


def run_task_reporting(task: Task) -> _Result:
    """:func:`run_task` for worker processes and jobs: any error becomes a failed result, so the other runs go on."""
    try:
        return run_task(task)
    except Exception as exc:
        return _Result(None, failed=f"{type(exc).__name__}: {exc}")


def as_executor(parallel: int | Executor) -> Executor:
    """An :class:`~.executors.Executor` as given, or for a number of runs at once: this process (1) or a pool."""
    if isinstance(parallel, Executor):
        return parallel
    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, got {parallel}")
    return InProcess() if parallel == 1 else ProcessPool(parallel)


def execute(jobs: list[Job], *, quiet: bool = False, log: Callable[[str], None] = print, parallel: int | Executor = 1) -> Outcome:
    """Train (or resume) every job that is not done.

    ``parallel``: 1 trains in this process, one run after the other (live progress unless
    ``quiet``); N > 1 trains N runs at once in worker processes with plain log lines, each with
    its share of the cores as torch threads (on a CPU, independent single-threaded runs use the
    cores better than one run with several threads; on CUDA the N processes share the GPU, with
    at most ``CUDA_WORKER_THREADS`` threads each); an :class:`~.executors.Executor` sends the
    runs where it says (e.g. Slurm jobs through submitit).  A diverged or failed run is recorded
    and the others go on.  A data error (no data set where the configuration points) stops the
    loop and cancels the runs not started: every later run would fail the same way;
    :attr:`Outcome.stopped` says why.  Ctrl-C / SIGTERM propagate: finished epochs are saved and
    the next call resumes the interrupted run.
    """
    executor = as_executor(parallel)
    outcome = Outcome()
    todo = [job for job in jobs if not job.done]
    if not todo:
        return outcome
    in_process = isinstance(executor, InProcess)
    share = None if in_process else executor.share(len(todo))
    plugins = tuple(registry.loaded_plugins())
    tasks = [Task(job.spec, job.machine, quiet=quiet or not in_process, share=share, plugins=plugins, teacher=job.teacher) for job in todo]
    if not in_process:
        log(f"{len(todo)} runs to make: {executor.description}")

    def announce(index: int) -> None:
        job = todo[index]
        verb = "resuming" if job.record is not None else "training"
        log(f"[{index + 1}/{len(todo)}] {verb} {job.spec.describe()}")

    def settle(job: Job, result: _Result) -> bool:
        """Record a finished job; False when a data error means the rest cannot run."""
        if result.path and (Path(result.path) / CONFIG).is_file():
            job.record = read_run(Path(result.path))
        if result.reused:
            log(f"    made meanwhile by another process: {result.path}")
        elif result.busy:
            job.note = "in use by another process"
            log(f"    skipped: {result.busy}")
        else:
            outcome.trained.append(job)
        if result.diverged:
            job.diverged = True
            log(f"    diverged ({job.spec.describe()}): {result.diverged}")
        if result.failed:
            job.note = "failed"
            log(f"    failed ({job.spec.describe()}): {result.failed}")
        if result.data_error:
            outcome.stopped = result.data_error
            log(f"    stopped: {result.data_error}")
            return False
        return True

    function = run_task if in_process else run_task_reporting
    with closing(executor.run(function, tasks, on_start=announce)) as finished:
        for item in finished:
            job = todo[item.index]
            result = item.value if item.error is None else _Result(None, failed=item.error)
            if not in_process:
                log(f"    done: {job.spec.describe()}")
            if not settle(job, result):
                for other in todo:
                    if not other.done:
                        other.note = "data not found" if result.data_missing else "data error"
                break
    return outcome


__all__ = ["Job", "Outcome", "Plan", "Task", "as_executor", "execute", "plan", "record_signature", "run_task", "run_task_reporting"]
