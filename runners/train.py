"""Two-stage training of a binary network (SPEC section 3, paper Sec. 5.1.3).

Read top to bottom: configuration -> data -> model -> optimiser/schedule ->
training loop -> results.

Protocol
--------
Stage 1 trains with binary activations and the method's stage-1 weights
(``sin(w0 w)`` for BiPer, Eq. 10; the latent weights for most methods).
Stage 2 starts from a stage-1 checkpoint (the recipe's ``stage2_init``: ``best``
test top-1 as upstream, or ``last``) and binarizes the weights too.  Each stage
has its own SGD optimiser and warm-up + cosine schedule (``runners/optim.py``).
The method's extra loss term (``bnnbench.regularization_loss``) is added to the
cross-entropy when the stage's recipe switches it on.

Schedules
---------
Training progress ``p = (finished epochs) / (epochs of the stage)`` is set
with ``bnnbench.set_progress`` at the start of every epoch, so it runs from 0
to (E-1)/E and is constant within an epoch, as in the upstream ReCU/BiPer code
(SPEC: p = epoch/E).  The learning rate is stepped per epoch too.

Results
-------
Everything goes to ``<out>/runs/<run-id>/`` (see ``runners/results.py``).
Each finished epoch appends a metrics row and then writes
``stage{s}_last.pt`` (and ``stage{s}_best.pt`` on a new best test top-1), so an
interrupted run loses at most the epoch in progress; ``resume`` continues from
the latest checkpoint with model, optimiser, scheduler and RNG state restored
and the data order re-derived from (seed, epoch), giving the same numbers as
an uninterrupted run on CPU.

Diagnostics hook
----------------
``callbacks`` are :class:`EpochCallback` objects: ``on_epoch_start``,
``on_after_backward`` (every step, after the backward pass) and
``on_epoch_end`` returning an :class:`EpochReport` whose ``columns`` become
extra metrics.csv columns and whose ``layers`` rows go to layers.csv
(:mod:`bnnbench.runners.callbacks`).  ``callbacks=None`` (the default) records
the per-layer diagnostics of :mod:`bnnbench.runners.diagnostics`; pass ``()``
for none.

torch.compile
-------------
``compile=True`` wraps the model in ``torch.compile``.  It is off by default
because it did not pay on CPU (torch 2.14, one thread, BiPer ResNet-20, batch
32): a compiled training step took 176 ms against 318 ms eager, but compiling
took 62 s, and each new epoch recompiled (37 s) because the binary layers keep
the training progress ``p`` as a Python float attribute (past torch's recompile
limit, 8 by default, dynamo falls back to eager); with ReCU, whose weights
depend on ``p``, the second epoch fails inside dynamo (InternalTorchDynamoError).

Several processes (DDP)
-----------------------
Under ``torchrun`` (or ``bnnbench run --nproc N``) every process runs this same
loop on its shard of the data; ``runners/distributed.py`` has the mechanics.
Per rank: the model is wrapped in DistributedDataParallel for each stage, the
global ``batch_size`` is split evenly over the processes, the per-step loss,
regulariser and hit counts are all-reduced before the non-finite check (so all
ranks stop together, and the bar shows global numbers), rank 0's BatchNorm
statistics are copied to every rank before the evaluation (so the reduced test
accuracy is exactly that of the checkpoint rank 0 saves, over every test image
once), and only rank 0 writes files or prints.  The regulariser, the callbacks
and the checkpoints always get the unwrapped module (``StepContext.model``).

RNG on resume: a checkpoint stores rank 0's global RNG states (``rng``) and,
with several processes, every rank's (``rng_ranks``, with ``world_size``).
Resuming with the same number of processes restores each rank its own state;
with a different number every rank gets rank 0's, and since the shards depend
on the world size the numbers then differ from an uninterrupted run.  (Data
order and augmentation never use these states: they are functions of (seed,
epoch, rank).)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnnbench
from bnnbench.data import make_data
from bnnbench.io import read_json, write_json

from . import distributed
from .callbacks import EpochCallback, EpochReport
from .diagnostics import default_callbacks
from .display import Display
from .optim import make_optimizer, make_scheduler
from .recipes import Recipe, get_recipe
from .results import (
    CONFIG,
    FAILURE,
    FINAL,
    LAYERS,
    METRICS,
    CsvLog,
    checkpoint_name,
    device_info,
    git_commit,
    load_checkpoint,
    package_versions,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

TIMING_COLUMNS = ("epoch_time_s", "train_time_s", "eval_time_s", "train_images_per_s")


# ======================================================================== configuration
@dataclass
class TrainConfig:
    """Everything that defines a run; saved resolved in ``config.json``."""

    method: str = "biper"
    net: str = "resnet18"
    data: str = "digits"
    data_dir: str | None = None
    recipe: Recipe = field(default_factory=lambda: get_recipe("quick"))
    hparams: dict[str, Any] = field(default_factory=dict)
    stages: list[int] = field(default_factory=lambda: [1, 2])
    init: str | None = None  # stage 2 alone: stage-1 checkpoint, or "scratch"
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None  # bf16 autocast; None: on for CUDA
    channels_last: bool | None = None  # None: on for CUDA
    compile: bool = False
    loader: str = "auto"
    ffcv_dir: str | None = None
    workers: int = 0
    augment: bool = True
    skip_bad_images: bool = False
    download: bool = False  # fetch torchvision's CIFAR-10 into the cache when no local copy exists
    net_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"skip": "single"}
    act_norm: bool | None = None
    real_activations: bool = False
    sync_bn: bool = False  # SyncBatchNorm across the processes of a distributed run (CUDA)
    out: str = "results"
    name: str | None = None

    def validate(self) -> None:
        self.recipe.validate()
        if not self.stages or sorted(set(self.stages)) != self.stages or not set(self.stages) <= {1, 2}:
            raise ValueError(f"stages must be [1], [2] or [1, 2], got {self.stages}")
        if self.stages == [2] and self.init is None:
            raise ValueError(
                "stage 2 alone needs --init CKPT, a stage-1 checkpoint such as results/runs/<run-id>/stage1_best.pt "
                "(or --init scratch to train stage 2 from random weights)"
            )
        if self.init is not None and self.stages != [2]:
            raise ValueError("--init applies to --stage 2 only; with --stage both, stage 2 starts from this run's stage 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["recipe"] = Recipe.from_dict(values["recipe"])
        return cls(**values)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class RunInterrupted(Exception):
    """SIGTERM (or SIGINT) arrived; finished epochs are saved."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ======================================================================== helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; pass --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def new_run_id(cfg: TrainConfig) -> str:
    """net-method-data-seed-timestamp-hash; the short hash of the whole configuration keeps runs that
    differ only in hyper-parameters or recipe apart when they start in the same second (parallel jobs)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    digest = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{cfg.net.replace('/', '_')}-{cfg.method}-{cfg.data}-s{cfg.seed}-{stamp}-{digest}"


def choose_run_dir(cfg: TrainConfig) -> Path:
    """``<out>/runs/<--name or net-method-data-seed-timestamp-hash>``; the directory is made when training starts."""
    runs = Path(cfg.out) / "runs"
    if cfg.name:
        path = runs / cfg.name
        if path.exists():
            raise ValueError(f"run directory {str(path)!r} already exists; continue it with --resume {path} or choose another --name")
        return path
    base = runs / new_run_id(cfg)
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`RunInterrupted` while training (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise RunInterrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int]) -> list[Tensor]:
    """Number of samples whose label is among the top-k logits, for each k."""
    top = logits.topk(max(ks), dim=1).indices
    hits = top == labels[:, None]
    return [hits[:, :k].any(dim=1).sum() for k in ks]


# ======================================================================== one epoch
@dataclass
class StepContext:
    """What the epoch loops need besides the model and the data."""

    model: nn.Module  # the module (state dicts, regulariser, callbacks)
    forward: nn.Module  # what runs the training batches: ``inference``, wrapped in DDP with several processes
    inference: nn.Module  # what runs the test batches: the module or its torch.compile wrapper
    device: torch.device
    amp: bool
    channels_last: bool
    label_smoothing: float
    callbacks: Sequence[EpochCallback]
    display: Display

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else nullcontext()

    def prepare(self, images: Tensor) -> Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def train_one_epoch(ctx: StepContext, loader: Any, optimizer: torch.optim.Optimizer, stage: int, epoch: int, epochs: int, regularizer: bool) -> dict[str, float]:
    """One pass over the training set; raises :class:`TrainingDiverged` on a non-finite loss.

    The loss is checked every step (one device sync per step, which the progress bar needs anyway),
    before the backward pass, so a diverging step never reaches the weights.  With several
    processes the step's sums (loss x images, regulariser x images, hits, images) are all-reduced
    first: every rank sees the global batch's values and all of them stop on the same step.
    Shards are padded to equal length, so ``train_images`` counts up to world_size - 1 repeats.
    """
    ctx.model.train()
    loss_sum = reg_sum = correct_sum = 0.0
    count = 0
    with ctx.display.epoch(stage, epoch, epochs, len(loader)) as bar:
        for step, (images, labels) in enumerate(loader, start=1):
            with ctx.autocast():
                logits = ctx.forward(ctx.prepare(images))
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=ctx.label_smoothing)
            reg = bnnbench.regularization_loss(ctx.model) if regularizer else None
            total = loss if reg is None else loss + reg
            correct = (logits.detach().argmax(dim=1) == labels).sum()
            reg_detached = reg.detach() if reg is not None else torch.zeros((), device=loss.device)
            n = labels.numel()
            sums = torch.stack([loss.detach().double() * n, reg_detached.double() * n, correct.double(), loss.new_tensor(n, dtype=torch.float64)])
            loss_sum_step, reg_sum_step, correct_value, n_value = distributed.all_reduce_sum(sums).tolist()
            loss_value, reg_value, n = loss_sum_step / n_value, reg_sum_step / n_value, int(n_value)
            if not (math.isfinite(loss_value) and math.isfinite(reg_value)):
                where = f"stage {stage}, epoch {epoch}, step {step}/{len(loader)}"
                raise TrainingDiverged(f"{where}: the training loss is {loss_value + reg_value} (cross-entropy {loss_value}, regulariser {reg_value})")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            for cb in ctx.callbacks:
                cb.on_after_backward(stage, epoch, step, ctx.model)
            optimizer.step()
            loss_sum, reg_sum, correct_sum, count = loss_sum + loss_value * n, reg_sum + reg_value * n, correct_sum + correct_value, count + n
            bar.advance(n, loss_value, int(correct_value))
    return {"train_loss": loss_sum / count, "train_reg": reg_sum / count, "train_top1": 100.0 * correct_sum / count, "train_images": count}


@torch.no_grad()
def evaluate(ctx: StepContext, loader: Any) -> dict[str, float]:
    """Test loss (cross-entropy, no regulariser), top-1 and top-5 in percent, over the whole test set.

    With several processes each rank evaluates its shard, leaves out the shard's padding (repeats
    at its end, see :func:`distributed.unpadded_share`) and the sums are all-reduced, so every
    test image counts exactly once.  (With ``skip_bad_images`` on image folders, a rank that
    skipped an unreadable image may count its padding repeat in its place.)
    """
    ctx.model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # loss, top-1, top-5, images
    real = distributed.unpadded_share(loader.num_samples, loader.rank, loader.world_size)
    seen = 0
    for images, labels in loader:
        with ctx.autocast():
            logits = ctx.inference(ctx.prepare(images)).float()
        keep = min(len(labels), max(real - seen, 0))
        seen += len(labels)
        logits, labels = logits[:keep], labels[:keep]
        k5 = min(5, logits.shape[1])
        top1, top5 = topk_correct(logits, labels, (1, k5))
        loss = F.cross_entropy(logits, labels, reduction="sum")
        sums += torch.stack([loss.double(), top1.double(), top5.double(), sums.new_tensor(float(labels.numel()))])
    loss_sum, top1, top5, count = distributed.all_reduce_sum(sums).tolist()
    return {"test_loss": loss_sum / count, "test_top1": 100.0 * top1 / count, "test_top5": 100.0 * top5 / count}


# ======================================================================== the run
class Run:
    """A run directory and its state: fresh (``path=None``: a new directory is made) or resumed."""

    def __init__(
        self,
        cfg: TrainConfig,
        path: Path | None = None,
        *,
        display: Display | None = None,
        callbacks: Sequence[EpochCallback] | None = None,
    ) -> None:
        cfg.validate()
        self.cfg, self.fresh = cfg, path is None
        device = resolve_device(cfg.device)
        self.joined = distributed.join_from_env(device)  # under torchrun: this process is one rank
        try:
            distributed.check_processes(cfg.recipe.batch_size, cfg.sync_bn, device, distributed.world_size())
            # rank 0 names the directory (the timestamp) and tells the others
            self.path = distributed.main_process_value(lambda: choose_run_dir(cfg)) if path is None else path
        except BaseException:
            self._leave()
            raise
        self.writes = distributed.is_main_process()
        self.display = (display or Display()) if self.writes else distributed.SilentDisplay()
        # None: the diagnostics every run records (per-layer QE, b, grad norms, flips, dead weights)
        self.callbacks = default_callbacks() if callbacks is None else list(callbacks)

    @classmethod
    def resume(cls, path: str | Path, *, display: Display | None = None, callbacks: Sequence[EpochCallback] | None = None) -> Run:
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a run directory (no {CONFIG}); pass the directory printed when the run started")
        saved = read_json(path / CONFIG)
        return cls(TrainConfig.from_dict(saved["config"]), path, display=display, callbacks=callbacks)

    # ------------------------------------------------------------------ main
    def execute(self) -> dict[str, Any]:
        """Train every remaining epoch of every stage and return final.json's content (on every rank)."""
        try:
            return self._execute()
        finally:
            self._leave()

    def _execute(self) -> dict[str, Any]:
        cfg = self.cfg
        if not self.fresh and (self.path / FINAL).is_file():
            self.display.log(f"run {self.path} already finished; nothing to resume")
            return read_json(self.path / FINAL)
        seed_everything(cfg.seed)
        device = distributed.rank_device(resolve_device(cfg.device))
        world = distributed.world_size()
        amp = device.type == "cuda" if cfg.amp is None else cfg.amp
        channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
        method = bnnbench.get_method(cfg.method, **cfg.hparams)
        init_record = self._init_record() if self.fresh else None

        # ---- data
        bundle = make_data(
            cfg.data,
            data_dir=cfg.data_dir,
            batch_size=distributed.process_batch_size(cfg.recipe.batch_size, world),
            eval_batch_size=None if cfg.recipe.eval_batch_size is None else -(-cfg.recipe.eval_batch_size // world),
            train_subset=cfg.recipe.train_subset,
            test_subset=cfg.recipe.test_subset,
            seed=cfg.seed,
            loader=cfg.loader,
            ffcv_dir=cfg.ffcv_dir,
            workers=cfg.workers,
            device=str(device),
            augment=cfg.augment,
            distributed=distributed.is_distributed(),
            skip_bad_images=cfg.skip_bad_images,
            download=cfg.download,
        )

        # ---- model
        model = bnnbench.build_model(
            cfg.net,
            method,
            num_classes=bundle.num_classes,
            stage=cfg.stages[0],
            family=bundle.family,
            act_norm=cfg.act_norm,
            binary_activations=not cfg.real_activations,
            **cfg.net_options,
        ).to(device)
        sync_bn = cfg.sync_bn and world > 1
        if sync_bn:
            model = distributed.sync_batch_norm(model, device)
        elif cfg.sync_bn:
            self.display.log("--sync-bn has no effect with a single process")
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        inference = torch.compile(model) if cfg.compile else model
        ctx = StepContext(model, inference, inference, device, amp, channels_last, cfg.recipe.label_smoothing, self.callbacks, self.display)

        # ---- run directory and resume point
        if self.fresh and self.writes:
            self.path.mkdir(parents=True)
            parallel = {
                "world_size": world,
                "distributed_backend": distributed.backend_name(),
                "process_batch_size": bundle.train.batch_size,
                "process_eval_batch_size": bundle.test.batch_size,
                "sync_bn": sync_bn,
            }
            self._write_json(CONFIG, self._provenance(device, amp, channels_last, model, bundle, init_record, parallel))
        latest = self._latest_checkpoint()
        position = (latest["stage"], latest["epoch"]) if latest else (0, 0)
        self.metrics = CsvLog.resume(self.path / METRICS, position)
        self.layers = CsvLog.resume(self.path / LAYERS, position)
        if latest is not None:
            set_rng_state(self._rank_rng_state(latest, world))  # after everything above that draws random numbers
        self.display.log(f"run directory: {self.path}" + (f" ({world} processes, {distributed.backend_name()})" if world > 1 else ""))

        # ---- stages
        try:
            with sigterm_as_interrupt():
                for stage in cfg.stages:
                    self._train_stage(stage, ctx, bundle, method, latest)
        except (KeyboardInterrupt, RunInterrupted):
            self._remove_if_nothing_saved()
            raise
        except Exception as exc:
            kept = not self._remove_if_nothing_saved()
            where = self._last_checkpoint_note() if kept else "no epoch had finished, so the run directory was removed"
            if kept:
                self._write_json(FAILURE, {"error": str(exc), "type": type(exc).__name__, "time": datetime.now().isoformat(timespec="seconds")})
            if isinstance(exc, TrainingDiverged):
                raise TrainingDiverged(f"{exc}; {where}. Lower the learning rate (--lr) or check the method's hyper-parameters.") from None
            raise

        # ---- results (rank 0 holds the metrics; every rank returns the same summary)
        final = distributed.main_process_value(self._final_summary)
        skipped = distributed.all_gather(bundle.train.skipped_images | bundle.test.skipped_images)
        final["skipped_bad_images"] = sorted(set().union(*skipped))
        self._write_json(FINAL, final)
        if self.writes:
            (self.path / FAILURE).unlink(missing_ok=True)  # a resumed run that finished is no longer failed
        self.display.log(f"finished: top-1 {final['final_test_top1']:.2f}% (best {final['best_test_top1']:.2f}%), results in {self.path}")
        return final

    # ------------------------------------------------------------------ one stage
    def _train_stage(self, stage: int, ctx: StepContext, bundle: Any, method: bnnbench.Method, latest: dict[str, Any] | None) -> None:
        cfg, model = self.cfg, ctx.model
        recipe = cfg.recipe.stage(stage)
        if latest is not None and latest["stage"] > stage:
            return  # finished before the interruption
        bnnbench.set_stage(model, stage)

        # ---- optimiser and schedule
        optimizer = make_optimizer(model, recipe, cfg.recipe)
        scheduler = make_scheduler(optimizer, recipe)
        if latest is not None and latest["stage"] == stage:
            model.load_state_dict(latest["model"])
            optimizer.load_state_dict(latest["optimizer"])
            scheduler.load_state_dict(latest["scheduler"])
            start, best = latest["epoch"], latest["best"]
        else:
            self._initialise_stage(stage, model)
            start, best = 0, {"test_top1": -1.0, "epoch": 0}
        # DDP per stage: wrapping broadcasts rank 0's weights after they were loaded
        ctx = dataclasses.replace(ctx, forward=distributed.data_parallel(ctx.inference, ctx.device))

        # ---- loop
        for epoch in range(start + 1, recipe.epochs + 1):
            progress = (epoch - 1) / recipe.epochs
            bnnbench.set_progress(model, progress)
            bundle.set_epoch(epoch - 1)
            for cb in self.callbacks:
                cb.on_epoch_start(stage, epoch, model)
            lr = optimizer.param_groups[0]["lr"]

            began = time.perf_counter()
            train = train_one_epoch(ctx, bundle.train, optimizer, stage, epoch, recipe.epochs, recipe.regularizer)
            self._synchronize(ctx.device)
            trained = time.perf_counter()
            distributed.broadcast_buffers(model)  # every rank evaluates the model rank 0 saves
            test = evaluate(ctx, bundle.test)
            self._synchronize(ctx.device)
            ended = time.perf_counter()
            if not math.isfinite(test["test_loss"]):
                raise TrainingDiverged(f"stage {stage}, epoch {epoch}, evaluation: the test loss is {test['test_loss']}")
            # sign(NaN) is a valid -1: NaN latent weights can hide behind a finite loss
            broken = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
            if broken:
                raise TrainingDiverged(f"stage {stage}, epoch {epoch}: non-finite parameters ({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''})")
            scheduler.step()

            reports = [cb.on_epoch_end(stage, epoch, model) for cb in self.callbacks]
            row: dict[str, Any] = {"stage": stage, "epoch": epoch, "epochs": recipe.epochs, "progress": progress, "lr": lr}
            row.update(train)
            row.update(test)
            row.update({f"schedule_{k}": v for k, v in method.schedule(progress).items()})
            row.update(
                epoch_time_s=ended - began,
                train_time_s=trained - began,
                eval_time_s=ended - trained,
                train_images_per_s=train["train_images"] / (trained - began),
            )
            for report in reports:
                row.update(report.columns)
            if test["test_top1"] > best["test_top1"]:
                best = {"test_top1": test["test_top1"], "epoch": epoch}

            # ---- results: logs first, then the checkpoint that marks the epoch as done
            self.display.epoch_summary(row)
            if self.writes:
                self.metrics.append([row])
                layer_rows = [{"stage": stage, "epoch": epoch, **r} for report in reports for r in report.layers]
                if layer_rows:
                    self.layers.append(layer_rows)
            rng_ranks = distributed.all_gather(rng_state())
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_ranks[0],
                **({"rng_ranks": rng_ranks} if len(rng_ranks) > 1 else {}),
                "world_size": len(rng_ranks),
                "stage": stage,
                "epoch": epoch,
                "best": best,
                "metrics": {k: v for k, v in row.items() if isinstance(v, (int, float))},
                "bnn_config": model.bnn_config,
                "config": cfg.to_dict(),
            }
            if best["epoch"] == epoch:
                self._save(checkpoint_name(stage, "best"), state)
            self._save(checkpoint_name(stage, "last"), state)
            distributed.barrier()  # the other ranks may read these files next (stage 2's start)

    def _initialise_stage(self, stage: int, model: nn.Module) -> None:
        """Stage 2 starts from this run's stage-1 checkpoint, or from ``--init``."""
        if stage == 1:
            return
        if 1 in self.cfg.stages:
            source = self.path / checkpoint_name(1, self.cfg.recipe.stage2_init)
        elif self.cfg.init == "scratch":
            return
        else:
            source = Path(self.cfg.init)  # type: ignore[arg-type]
        state = load_checkpoint(source)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise ValueError(f"checkpoint {str(source)!r} does not fit {self.cfg.net} with method {self.cfg.method}: {exc}") from None
        self.display.log(f"stage 2 starts from {source} (stage {state.get('stage')}, epoch {state.get('epoch')})")

    # ------------------------------------------------------------------ records
    def _init_record(self) -> dict[str, Any] | None:
        """Where stage 2 starts from (an ``--init`` checkpoint is read before anything is written)."""
        cfg = self.cfg
        if cfg.stages == [1, 2]:
            return {"source": f"this run's {checkpoint_name(1, cfg.recipe.stage2_init)}"}
        if cfg.init is None or cfg.init == "scratch":
            return None if cfg.init is None else {"source": "scratch"}
        state = load_checkpoint(Path(cfg.init))
        return {"source": str(Path(cfg.init).resolve()), "stage": state.get("stage"), "epoch": state.get("epoch"), "bnn_config": state.get("bnn_config")}

    def _provenance(
        self, device: torch.device, amp: bool, channels_last: bool, model: nn.Module, bundle: Any, init: Any, parallel: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "run_id": self.path.name,
            "created": datetime.now().isoformat(timespec="seconds"),
            "config": self.cfg.to_dict(),
            "resolved": {"device": str(device), "amp_bf16": amp, "channels_last": channels_last, "stage2_init": init, **parallel},
            "model": model.bnn_config,
            "data": bundle.info,
            "git": git_commit(),
            "versions": package_versions(),
            "machine": device_info(device),
        }

    def _final_summary(self) -> dict[str, Any]:
        rows = self.metrics.rows
        stages: dict[str, Any] = {}
        for stage in self.cfg.stages:
            mine = [r for r in rows if int(r["stage"]) == stage]
            last = mine[-1]
            best = max(mine, key=lambda r: (float(r["test_top1"]), -int(r["epoch"])))
            stages[str(stage)] = {
                "epochs": int(last["epoch"]),
                "last": {k: float(last[k]) for k in ("test_top1", "test_top5", "test_loss")},
                "best": {"test_top1": float(best["test_top1"]), "epoch": int(best["epoch"])},
            }
        final_stage = stages[str(self.cfg.stages[-1])]
        return {
            "run_id": self.path.name,
            "status": "finished",
            "method": self.cfg.method,
            "net": self.cfg.net,
            "data": self.cfg.data,
            "seed": self.cfg.seed,
            "recipe": self.cfg.recipe.name,
            "final_test_top1": final_stage["last"]["test_top1"],
            "final_test_top5": final_stage["last"]["test_top5"],
            "best_test_top1": final_stage["best"]["test_top1"],
            "stages": stages,
            "train_time_s": sum(float(r["epoch_time_s"]) for r in rows),
            "note": "best = highest test top-1 over the stage's epochs (upstream practice: selected on the test set)",
        }

    # ------------------------------------------------------------------ processes

    def _rank_rng_state(self, latest: dict[str, Any], world: int) -> dict[str, Any]:
        """This rank's saved RNG state when the world size is unchanged, else rank 0's (see the module docstring)."""
        saved_world = int(latest.get("world_size", 1))
        if saved_world != world:
            self.display.log(
                f"resuming a run trained on {saved_world} process(es) with {world}: the data shards and per-rank RNG "
                "differ, so the numbers will not match an uninterrupted run exactly"
            )
        if saved_world == world and "rng_ranks" in latest:
            return latest["rng_ranks"][distributed.rank()]
        return latest["rng"]

    def _leave(self) -> None:
        """Leave the process group if this run joined it."""
        if self.joined:
            distributed.leave()
            self.joined = False

    # ------------------------------------------------------------------ files
    def _latest_checkpoint(self) -> dict[str, Any] | None:
        for stage in (2, 1):
            path = self.path / checkpoint_name(stage, "last")
            if path.is_file():
                return load_checkpoint(path)
        return None

    def _save(self, name: str, state: dict[str, Any]) -> None:
        if self.writes:
            save_checkpoint(self.path / name, state)

    def _write_json(self, name: str, data: Any) -> None:
        if self.writes:
            write_json(self.path / name, data)

    def _last_checkpoint_note(self) -> str:
        latest = self._latest_checkpoint()
        if latest is None:
            return f"no epoch has finished yet in {self.path}"
        name = checkpoint_name(latest["stage"], "last")
        return f"the last good checkpoint is {self.path / name} (stage {latest['stage']}, epoch {latest['epoch']})"

    def _remove_if_nothing_saved(self) -> bool:
        """A fresh run that stops before its first checkpoint leaves nothing behind; True if removed."""
        if self.fresh and self.writes and self.path.is_dir() and not any(self.path.glob("stage*_last.pt")):
            shutil.rmtree(self.path)
            return True
        return False

    @staticmethod
    def _synchronize(device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def run_training(cfg: TrainConfig, *, quiet: bool = False, callbacks: Sequence[EpochCallback] | None = None) -> dict[str, Any]:
    """Train a fresh run (library entry point; the CLI is ``bnnbench run``)."""
    return Run(cfg, display=Display(quiet), callbacks=callbacks).execute()


def resume_training(path: str | Path, *, quiet: bool = False, callbacks: Sequence[EpochCallback] | None = None) -> dict[str, Any]:
    """Continue the run in ``path`` from its latest checkpoint."""
    return Run.resume(path, display=Display(quiet), callbacks=callbacks).execute()


__all__ = [
    "EpochCallback",
    "EpochReport",
    "Run",
    "RunInterrupted",
    "TIMING_COLUMNS",
    "TrainConfig",
    "TrainingDiverged",
    "resume_training",
    "run_training",
]
