"""The runs that tables and figures need: find finished matching runs, train the missing ones.

A table row or a sweep point asks for a :class:`~.spec.RunSpec` *template*: the model, the data
and the stages; :func:`plan` gives it each table's recipe (the budget) and every seed, and
looks in ``<out>/runs/`` for runs whose spec has the same canonical JSON
(:meth:`RunSpec.key`, read from every ``config.json`` this project has written, see
:meth:`RunSpec.from_saved`).  :func:`execute` trains what is missing (one run after the
other, or several at once in worker processes), each in its own run directory so an
interruption loses at most one epoch: the next call resumes it.

What "matching" compares is exactly the RunSpec: the data set name; the model as resolved
(network, family, classes, both binarizers with every hyper-parameter, act_norm, backbone
options); the recipe (every field but its description and source); seed, stages, stage-2
initialisation and augmentation.  Not compared: the :class:`~.spec.Machine` (device, bf16,
loader, workers, where the data were read from), which the tables' captions list instead.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch

import bnnbench
from bnnbench import registry
from bnnbench.data import DataError

from .catalog import RunRecord, read_run, scan_runs
from .display import Display
from .recipes import Recipe
from .rundir import RunDirectory
from .results import CONFIG
from .spec import Machine, RunSpec
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

    @property
    def status(self) -> str:
        """``finished``, ``diverged``, ``unfinished``/``failed`` (to resume) or ``missing`` (to train)."""
        return self.record.status if self.record is not None else "missing"

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
    be resumed; else the job is missing and :func:`execute` trains it.
    """
    by_key: dict[str, list[RunRecord]] = {}
    for record in scan_runs(machine.run_root()):
        key = record_signature(record)
        if key is not None:
            by_key.setdefault(key, []).append(record)
    jobs: dict[str, Job] = {}
    index: dict[tuple[RunSpec, int], Job] = {}
    seeds = list(seeds)
    for template in dict.fromkeys(templates):
        for seed in seeds:
            spec = template.replace(recipe=recipe, seed=seed)
            key = spec.key()
            if key not in jobs:
                jobs[key] = Job(spec, machine, key, _choose(by_key.get(key, [])))
            index[(template, seed)] = jobs[key]
    return Plan(list(jobs.values()), index)


def _choose(records: list[RunRecord]) -> RunRecord | None:
    for status in ("finished", "diverged", "unfinished", "failed"):
        matching = [r for r in records if r.status == status]
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
    """What training one job ended with (picklable: it comes back from worker processes)."""

    path: str | None  # the run directory, once one was chosen
    diverged: str | None = None
    data_error: str | None = None
    data_missing: bool = False
    failed: str | None = None  # any other error (in a worker process)


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
    return _Result(str(directory.path))


def _init_worker(threads: int, plugins: list[str]) -> None:
    torch.set_num_threads(threads)
    for path in plugins:  # methods registered from plugin files exist in this process too
        bnnbench.load_plugin(path)


def _train_in_worker(spec: RunSpec, machine: Machine, resume: str | None) -> _Result:
    try:
        return _train(spec, machine, resume, quiet=True)
    except Exception as exc:  # reported by the parent; the other workers go on
        return _Result(None, failed=f"{type(exc).__name__}: {exc}")


def execute(jobs: list[Job], *, quiet: bool = False, log: Callable[[str], None] = print, parallel: int = 1) -> Outcome:
    """Train (or resume) every job that is not done.

    ``parallel`` > 1 trains that many runs at once in worker processes, each
    with ``cores // parallel`` torch threads and plain log lines: on a CPU,
    independent single-threaded runs use the cores better than one run with
    several threads.  A diverged run is recorded and the others go on.  A data
    error (no data set where the configuration points) stops the loop: every
    later run would fail the same way; :attr:`Outcome.stopped` says why.
    Ctrl-C / SIGTERM propagate: finished epochs are saved and the next call
    resumes the interrupted run.
    """
    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, got {parallel}")
    outcome = Outcome()
    todo = [job for job in jobs if not job.done]

    def announce(i: int, job: Job) -> None:
        verb = "resuming" if job.record is not None else "training"
        log(f"[{i}/{len(todo)}] {verb} {job.spec.describe()}")

    def settle(job: Job, result: _Result) -> bool:
        """Record a finished job; False when a data error means the rest cannot run."""
        if result.path and (Path(result.path) / CONFIG).is_file():
            job.record = read_run(Path(result.path))
        outcome.trained.append(job)
        if result.diverged:
            log(f"    diverged ({job.spec.describe()}): {result.diverged}")
        if result.failed:
            job.note = "failed"
            log(f"    failed ({job.spec.describe()}): {result.failed}")
        if result.data_error:
            outcome.stopped = result.data_error
            log(f"    stopped: {result.data_error}")
            return False
        return True

    def mark_data_problem(missing: bool) -> None:
        for job in todo:
            if not job.done:
                job.note = "data not found" if missing else "data error"

    if parallel == 1:
        for i, job in enumerate(todo, start=1):
            announce(i, job)
            result = _train(job.spec, job.machine, str(job.record.path) if job.record else None, quiet)
            if not settle(job, result):
                mark_data_problem(result.data_missing)
                break
        return outcome

    threads = max(1, (os.cpu_count() or 1) // parallel)
    context = multiprocessing.get_context("spawn")  # no forked OpenMP/numba state
    pool = ProcessPoolExecutor(max_workers=parallel, mp_context=context, initializer=_init_worker, initargs=(threads, registry.loaded_plugins()))
    try:
        futures = {}
        for i, job in enumerate(todo, start=1):
            announce(i, job)
            resume = str(job.record.path) if job.record else None
            futures[pool.submit(_train_in_worker, job.spec, job.machine, resume)] = job
        for future in as_completed(futures):
            job = futures[future]
            result = future.result()
            log(f"    done: {job.spec.describe()}")
            if not settle(job, result):
                mark_data_problem(result.data_missing)
                break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # queued runs are dropped; running ones finish or save
    return outcome


__all__ = ["Job", "Outcome", "Plan", "execute", "plan", "record_signature"]
