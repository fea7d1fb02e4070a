"""Experiments that tables and figures need: find finished matching runs, train the missing ones.

An :class:`Experiment` is what a table row or a sweep point asks for (data,
network, method and hyper-parameters, binary or real activations, stages); with a
recipe (the budget) and a seed it becomes a
:class:`~bnnbench.runners.train.TrainConfig`.  :func:`plan` looks for runs in
``<out>/runs/`` whose *resolved* configuration matches (see :func:`signature`);
:func:`execute` trains what is missing (one run after the other, or several at
once in worker processes), each in its own run directory so an interruption loses at most one epoch: the next call resumes it.

What "matching" compares
------------------------
The data set name; the model as built (``config.json["model"]``: network, family,
method name and every hyper-parameter with defaults filled in, activation
normalisation, binary activations, nonlinearity, backbone options such as the
skip type); the recipe (every field but its description); seed, stages, stage-2
initialisation and augmentation.  Not compared: the device, the loader, worker
count and where the data were read from (the tables' captions list each run's
data and machine instead).
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import bnnbench
from bnnbench import registry
from bnnbench.data import DATASETS, DataError

from .catalog import RunRecord, read_run, scan_runs
from .display import Display
from .recipes import Recipe
from .results import CONFIG
from .train import Run, TrainConfig, TrainingDiverged

RECIPE_COSMETIC = ("description", "source")
MODEL_FIELDS = ("net", "family", "act_norm", "binary_activations", "nonlinearity", "options")


@dataclass(frozen=True)
class Experiment:
    """One trained model a table row or a figure point needs (without budget and seed)."""

    data: str
    net: str
    method: str
    hparams: tuple[tuple[str, Any], ...] = ()
    binary_activations: bool = True
    stages: tuple[int, ...] = (1, 2)
    net_options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(
        cls,
        data: str,
        net: str,
        method: str,
        hparams: dict[str, Any] | None = None,
        *,
        binary_activations: bool = True,
        stages: Iterable[int] = (1, 2),
        net_options: dict[str, Any] | None = None,
    ) -> Experiment:
        """An experiment from plain dicts; unknown data sets, networks and methods are rejected here."""
        if data not in DATASETS:
            raise ValueError(f"unknown data set {data!r}; valid: {', '.join(DATASETS)}")
        hp, options = tuple(sorted((hparams or {}).items())), tuple(sorted((net_options or {}).items()))
        exp = cls(data, net, method, hp, binary_activations, tuple(stages), options)
        exp.model_config()  # validates the network, the method and its hyper-parameters
        return exp

    @property
    def family(self) -> str:
        return DATASETS[self.data].family

    def describe(self) -> str:
        """E.g. ``resnet20 biper (w0=10) real activations on cifar10``."""
        hp = f" ({', '.join(f'{k}={v}' for k, v in self.hparams)})" if self.hparams else ""
        acts = "" if self.binary_activations else " real activations"
        return f"{self.net} {self.method}{hp}{acts} on {self.data}"

    def model_config(self) -> dict[str, Any]:
        """``model.bnn_config`` of the network this experiment trains (built once, on the meta device)."""
        return _model_config(self)

    def train_config(self, recipe: Recipe, seed: int, out: str | Path, **machine: Any) -> TrainConfig:
        """The run's configuration; ``machine`` sets fields that do not enter matching (data_dir, device, workers)."""
        return TrainConfig(
            method=self.method,
            net=self.net,
            data=self.data,
            recipe=Recipe.from_dict(recipe.to_dict()),
            hparams=dict(self.hparams),
            stages=list(self.stages),
            seed=seed,
            real_activations=not self.binary_activations,
            net_options=dict(self.net_options),
            out=str(out),
            **machine,
        )


@functools.cache
def _model_config(exp: Experiment) -> dict[str, Any]:
    with torch.device("meta"):  # no memory, no random numbers drawn
        model = bnnbench.build_model(
            exp.net,
            bnnbench.get_method(exp.method, **dict(exp.hparams)),
            num_classes=DATASETS[exp.data].num_classes,
            stage=exp.stages[0],
            family=exp.family,
            binary_activations=exp.binary_activations,
            **dict(exp.net_options),
        )
    return model.bnn_config


def signature(config: dict[str, Any], model: dict[str, Any]) -> str:
    """The part of a run's resolved configuration that decides its numbers, as canonical JSON."""
    key = {
        "data": config["data"],
        "model": {name: model.get(name) for name in MODEL_FIELDS},
        "method": model["method"]["name"],
        "hparams": model["method"]["hparams"],
        "recipe": {k: v for k, v in config["recipe"].items() if k not in RECIPE_COSMETIC},
        "seed": config["seed"],
        "stages": list(config["stages"]),
        "init": config.get("init"),
        "augment": config.get("augment", True),
    }
    return json.dumps(key, sort_keys=True, default=str)


def record_signature(record: RunRecord) -> str | None:
    """:func:`signature` of a run directory (None when its config.json lacks the fields)."""
    try:
        return signature(record.config, record.saved["model"])
    except (KeyError, TypeError):
        return None


# ------------------------------------------------------------------ planning
@dataclass
class Job:
    """One (experiment, seed) and what is known about its run."""

    experiment: Experiment
    seed: int
    config: TrainConfig
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
    """The distinct jobs of a set of experiments and seeds; experiments that resolve alike share one job."""

    jobs: list[Job]
    index: dict[tuple[Experiment, int], Job]

    def job(self, experiment: Experiment, seed: int) -> Job:
        return self.index[(experiment, seed)]


def plan(experiments: Iterable[Experiment], seeds: Iterable[int], recipe: Recipe, out: str | Path, **machine: Any) -> Plan:
    """One job per distinct (experiment, seed), matched against the runs in ``<out>/runs/``.

    A finished matching run is used (the newest if several); else a diverged one
    (rerunning would diverge again); else the newest unfinished or failed one, to
    be resumed; else the job is missing and :func:`execute` trains it.
    """
    by_key: dict[str, list[RunRecord]] = {}
    for record in scan_runs(Path(out) / "runs"):
        key = record_signature(record)
        if key is not None:
            by_key.setdefault(key, []).append(record)
    jobs: dict[str, Job] = {}
    index: dict[tuple[Experiment, int], Job] = {}
    seeds = list(seeds)
    for exp in dict.fromkeys(experiments):
        model = exp.model_config()
        for seed in seeds:
            config = exp.train_config(recipe, seed, out, **machine)
            key = signature(config.to_dict(), model)
            if key not in jobs:
                jobs[key] = Job(exp, seed, config, key, _choose(by_key.get(key, [])))
            index[(exp, seed)] = jobs[key]
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


def _train(config: TrainConfig, resume: str | None, quiet: bool) -> _Result:
    """Train (or resume) one run (with the diagnostics every run records)."""
    display = Display(quiet)
    run = Run.resume(resume, display=display) if resume else Run(config, display=display)
    try:
        run.execute()
    except TrainingDiverged as exc:
        return _Result(str(run.path), diverged=str(exc))
    except DataError as exc:
        return _Result(str(run.path), data_error=str(exc), data_missing=isinstance(exc, FileNotFoundError))
    return _Result(str(run.path))


def _init_worker(threads: int, plugins: list[str]) -> None:
    torch.set_num_threads(threads)
    for path in plugins:  # methods registered from plugin files exist in this process too
        bnnbench.load_plugin(path)


def _train_in_worker(config: TrainConfig, resume: str | None) -> _Result:
    try:
        return _train(config, resume, quiet=True)
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
        log(f"[{i}/{len(todo)}] {verb} {job.experiment.describe()}, seed {job.seed}, budget {job.config.recipe.name}")

    def settle(job: Job, result: _Result) -> bool:
        """Record a finished job; False when a data error means the rest cannot run."""
        if result.path and (Path(result.path) / CONFIG).is_file():
            job.record = read_run(Path(result.path))
        outcome.trained.append(job)
        if result.diverged:
            log(f"    diverged ({job.experiment.describe()}): {result.diverged}")
        if result.failed:
            job.note = "failed"
            log(f"    failed ({job.experiment.describe()}): {result.failed}")
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
            result = _train(job.config, str(job.record.path) if job.record else None, quiet)
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
            futures[pool.submit(_train_in_worker, job.config, resume)] = job
        for future in as_completed(futures):
            job = futures[future]
            result = future.result()
            log(f"    done: {job.experiment.describe()}, seed {job.seed}")
            if not settle(job, result):
                mark_data_problem(result.data_missing)
                break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # queued runs are dropped; running ones finish or save
    return outcome


__all__ = ["Experiment", "Job", "Outcome", "Plan", "execute", "plan", "record_signature", "signature"]
