"""Two-stage training of a binary network (SPEC section 3, paper Sec. 5.1.3).

Read top to bottom: one epoch (:func:`train_one_epoch`, :func:`evaluate`) -> one stage
(:func:`train_stage`) -> one run (:func:`train`: data, model, run directory, the stages,
``final.json``).  What a run is comes in as a :class:`~.spec.RunSpec`, where and how it runs
as a :class:`~.spec.Machine`; its files go through a :class:`~.rundir.RunDirectory`.

Protocol
--------
Stage 1 trains with binary activations and the method's stage-1 weights
(``sin(w0 w)`` for BiPer, Eq. 10; the latent weights for most methods).
Stage 2 starts from a stage-1 checkpoint (the recipe's ``stage2_init``: ``best``
test top-1 as upstream, or ``last``) and binarizes the weights too.  Each stage
has its own SGD optimiser and warm-up + cosine schedule (``runners/optim.py``).
The method's extra loss term (``bnnbench.regularization_loss``) is added to the
cross-entropy when the stage's recipe switches it on.  For a method with a teacher
(``Method.teacher``) the run's teacher (``runners/teachers.py``) is loaded, frozen and attached
to the model before training (``bnnbench.attach_teacher``): the same loss entry point then adds
the method's feature loss against it; config.json's ``resolved.teacher`` names the run used.

Schedules
---------
Training progress ``p = (finished epochs) / (epochs of the stage)`` is set
with ``bnnbench.set_progress`` at the start of every epoch, so it runs from 0
to (E-1)/E and is constant within an epoch, as in the upstream ReCU/BiPer code
(SPEC: p = epoch/E).  The learning rate is stepped per epoch too.

Results
-------
Each finished epoch appends a metrics row and then writes ``stage{s}_last.pt``
(and ``stage{s}_best.pt`` on a new best test top-1), so an interrupted run loses
at most the epoch in progress; resuming continues from the latest checkpoint
with model, optimiser, scheduler and RNG state restored and the data order
re-derived from (seed, epoch), giving the same numbers as an uninterrupted run
on CPU.  The final model's per-image test predictions go to ``predictions.npz``.

Diagnostics hook
----------------
``callbacks`` are :class:`EpochCallback` objects: ``on_epoch_start``,
``on_after_backward`` (every step, after the backward pass) and
``on_epoch_end`` returning an :class:`EpochReport` whose ``columns`` become
extra metrics.csv columns and whose ``layers`` rows go to layers.csv
(:mod:`bnnbench.runners.callbacks`).  ``callbacks=None`` (the default) records
the per-layer diagnostics of :mod:`bnnbench.runners.diagnostics`; pass ``()``
for none.

Host synchronisation
--------------------
The per-step loss, regulariser and hit counts are summed on the device; the loop reads
them (and checks that the loss is finite) every step on the CPU, where reading costs
nothing, and every ``GPU_CHECK_EVERY`` (25) steps on a GPU, where each read waits for the
device.  A non-finite loss stops the run at the next check with the last epoch's checkpoint
intact (``config.json`` records ``check_every``).

torch.compile
-------------
``Machine(compile=True)`` wraps the model in ``torch.compile``.  The training progress is
a buffer of every binary layer (not a Python attribute), so moving it does not recompile;
the stage switch recompiles once.  See the README's performance section for measurements.

Several processes (DDP)
-----------------------
Under ``torchrun`` (or ``bnnbench run --nproc N``) every process runs this same
loop on its shard of the data; ``runners/distributed.py`` has the mechanics.
Per rank: the model is wrapped in DistributedDataParallel for each stage, the
global ``batch_size`` is split evenly over the processes, the step sums are
all-reduced before the non-finite check (so all ranks stop together, and the bar
shows global numbers), rank 0's BatchNorm statistics are copied to every rank
before the evaluation (so the reduced test accuracy is exactly that of the
checkpoint rank 0 saves, over every test image once), and only rank 0 writes
files or prints.  The regulariser, the callbacks and the checkpoints always get
the unwrapped module (``StepContext.model``).

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
import math
import random
import signal
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnnbench
from bnnbench import functional
from bnnbench.data import open_data
from bnnbench.errors import ConfigError
from bnnbench.hardware import cpu_flags
from bnnbench.layers import channels_last_kernels, takes_fused_formulas

from . import distributed
from .callbacks import EpochCallback, EpochReport
from .diagnostics import default_callbacks
from .display import CostEstimate, Display
from .optim import make_optimizer, make_scheduler
from .results import checkpoint_name, device_info, load_checkpoint, load_model_state, package_versions, rng_state, set_rng_state, source_commit
from .rundir import RunDirectory
from .spec import Machine, RunSpec, data_request
from .teachers import load_teacher
from .tensorboard import TensorBoardLog

TIMING_COLUMNS = ("epoch_time_s", "train_time_s", "eval_time_s", "train_images_per_s")
GPU_CHECK_EVERY = 25


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class RunInterrupted(Exception):
    """SIGTERM (or SIGINT) arrived; finished epochs are saved."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ======================================================================== helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def sigterm_as_interrupt(before: Callable[[], None] | None = None) -> Iterator[None]:
    """Turn SIGTERM into :class:`RunInterrupted` while training (main thread only), after ``before()``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if before is not None:
            before()
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


def bf16_hardware() -> bool:
    """True when this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16), as oneDNN uses it."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_amp(machine: Machine, device: torch.device) -> bool:
    """bf16 autocast: as asked, else on for CUDA and for CPUs with bf16 hardware."""
    if machine.amp is not None:
        return machine.amp
    return device.type == "cuda" or (device.type == "cpu" and bf16_hardware())


def resolve_channels_last(asked: bool | None, device: torch.device, amp: bool, model: nn.Module) -> bool:
    """channels_last: as asked, else on for CUDA, and on a CPU where bf16 autocast runs on bf16 hardware and every
    binary layer's kernels take it (:func:`bnnbench.layers.channels_last_kernels`): there oneDNN's bf16
    convolutions run 1.3x faster in channels_last (the fp ResNet-20 step, Xeon 6/167 with AMX, 2026-12-04; README
    "Training speed"); not in float32, where a probe found BiPer's step slower in it (act_norm's bit-exact float32
    path takes contiguous tensors only) and the other methods were not measured."""
    if asked is not None:
        return asked
    if device.type == "cuda":
        return True
    return device.type == "cpu" and amp and bf16_hardware() and channels_last_kernels(model)


# ======================================================================== one epoch
@dataclass
class StepContext:
    """What the epoch loops need besides the model and the data."""

    model: nn.Module  # the module (state dicts, regulariser, callbacks)
    forward: nn.Module  # what runs the training batches: ``inference``, wrapped in DDP with several processes
    inference: nn.Module  # what runs the test batches: the module or its torch.compile wrapper
    device: torch.device
    amp: bool
    formulas: dict[str, str]  # functional.formulas's arguments: bf16 and fp32, each one of functional.FORMULAS
    channels_last: bool
    label_smoothing: float
    check_every: int
    callbacks: Sequence[EpochCallback]
    display: Display
    cost: CostEstimate

    def autocast(self) -> Any:
        """The run's formulas (:data:`bnnbench.functional.FORMULAS`), with bf16 autocast where the run takes it."""
        stack = ExitStack()
        if self.amp:
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        stack.enter_context(functional.formulas(**self.formulas))
        return stack

    def prepare(self, images: Tensor) -> Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def train_one_epoch(ctx: StepContext, loader: Any, optimizer: torch.optim.Optimizer, stage: int, epoch: int, epochs: int, regularizer: bool) -> dict[str, float]:
    """One pass over the training set; raises :class:`TrainingDiverged` on a non-finite loss.

    Per step the loss x images, regulariser x images, hits and images are added on the device;
    every ``ctx.check_every`` steps (and at the end) the sums since the last check are
    all-reduced over the processes, read, checked to be finite and shown on the bar.  With
    ``check_every = 1`` a diverging step never reaches the weights.  Shards are padded to equal
    length, so ``train_images`` counts up to world_size - 1 repeats.
    """
    ctx.model.train()
    totals = np.zeros(4)  # loss x n, regulariser x n, hits, images
    pending = torch.zeros(4, dtype=torch.float64, device=ctx.device)
    steps = len(loader)
    with ctx.display.epoch(stage, epoch, epochs, steps) as bar:
        for step, (images, labels) in enumerate(loader, start=1):
            with ctx.autocast():
                logits = ctx.forward(ctx.prepare(images))
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=ctx.label_smoothing)
            reg = bnnbench.regularization_loss(ctx.model) if regularizer else None
            total = loss if reg is None else loss + reg
            n = labels.numel()
            with torch.no_grad():
                reg_value = reg.detach().double() if reg is not None else pending.new_zeros(())
                hits = (logits.argmax(dim=1) == labels).sum().double()
                pending += torch.stack([loss.detach().double() * n, reg_value * n, hits, pending.new_tensor(float(n))])
            if step % ctx.check_every == 0 or step == steps:
                read = np.array(distributed.all_reduce_sum(pending).tolist())  # a copy: pending is zeroed next
                pending.zero_()
                loss_value, reg_mean = read[0] / read[3], read[1] / read[3]
                if not (math.isfinite(loss_value) and math.isfinite(reg_mean)):
                    where = f"stage {stage}, epoch {epoch}, step {step}/{steps}"
                    raise TrainingDiverged(f"{where}: the training loss is {loss_value + reg_mean} (cross-entropy {loss_value}, regulariser {reg_mean})")
                totals += read
                new_steps = step - bar.steps
                bar.advance(int(read[3]), loss_value, int(read[2]), steps=new_steps)
                ctx.cost.observe(new_steps)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            for cb in ctx.callbacks:
                cb.on_after_backward(stage, epoch, step, ctx.model)
            optimizer.step()
    loss, reg, hits, count = (float(v) for v in totals)
    return {"train_loss": loss / count, "train_reg": reg / count, "train_top1": 100.0 * hits / count, "train_images": int(count)}


@dataclass
class Evaluation:
    """Test metrics and the per-image predictions (test order, every image once; rank 0 holds them)."""

    metrics: dict[str, float]
    predictions: np.ndarray
    labels: np.ndarray


@torch.no_grad()
def evaluate(ctx: StepContext, loader: Any) -> Evaluation:
    """Test loss (cross-entropy, no regulariser), top-1 and top-5 in percent, over the whole test set.

    With several processes each rank evaluates its shard, leaves out the shard's padding (repeats
    at its end, see :func:`distributed.unpadded_share`) and the sums are all-reduced, so every
    test image counts exactly once; the predictions are gathered by test position.  (With
    ``skip_bad_images`` on image folders, a rank that skipped an unreadable image may count its
    padding repeat in its place.)
    """
    ctx.model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # loss, top-1, top-5, images
    real = distributed.unpadded_share(loader.num_samples, loader.rank, loader.world_size)
    batches = loader.position_batches()
    positions = torch.cat(batches)[:real] if batches else torch.zeros(0, dtype=torch.long)
    predicted, truth = [], []
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
        predicted.append(logits.argmax(dim=1))
        truth.append(labels)
    loss_sum, top1, top5, count = distributed.all_reduce_sum(sums).tolist()
    mine = (positions.numpy(), torch.cat(predicted).cpu().numpy(), torch.cat(truth).cpu().numpy())
    shards = distributed.all_gather(mine) if distributed.world_size() > 1 else [mine]
    order = np.concatenate([s[0] for s in shards])
    predictions, labels_all = np.empty(len(order), dtype=np.int64), np.empty(len(order), dtype=np.int64)
    predictions[order], labels_all[order] = np.concatenate([s[1] for s in shards]), np.concatenate([s[2] for s in shards])
    metrics = {"test_loss": loss_sum / count, "test_top1": 100.0 * top1 / count, "test_top5": 100.0 * top5 / count}
    return Evaluation(metrics, predictions, labels_all)


# ======================================================================== one stage
@dataclass
class RunState:
    """The pieces every stage of one run shares."""

    spec: RunSpec
    directory: RunDirectory
    ctx: StepContext
    bundle: Any
    tensorboard: TensorBoardLog


def train_stage(run: RunState, stage: int, latest: dict[str, Any] | None) -> None:
    """Every remaining epoch of ``stage``: optimiser and schedule, then per epoch train, evaluate,
    check, log and checkpoint."""
    spec, ctx, model = run.spec, run.ctx, run.ctx.model
    recipe = spec.recipe.stage(stage)
    if latest is not None and latest["stage"] > stage:
        return  # finished before the interruption
    bnnbench.set_stage(model, stage)

    optimizer = make_optimizer(model, recipe, spec.recipe)
    scheduler = make_scheduler(optimizer, recipe)
    if latest is not None and latest["stage"] == stage:
        load_model_state(model, latest, run.directory.latest_checkpoint_path(), f"{spec.model.net} with method {spec.model.label}")
        optimizer.load_state_dict(latest["optimizer"])
        scheduler.load_state_dict(latest["scheduler"])
        start, best = latest["epoch"], latest["best"]
    else:
        initialise_stage(run, stage)
        start, best = 0, {"test_top1": -1.0, "epoch": 0}
    # DDP per stage: wrapping broadcasts rank 0's weights after they were loaded
    ctx = dataclasses.replace(ctx, forward=distributed.data_parallel(ctx.inference, ctx.device))
    weights, activations = model.spec.weight_binarizer(), model.spec.activation_binarizer()

    for epoch in range(start + 1, recipe.trained_epochs + 1):
        progress = recipe.progress(epoch)
        bnnbench.set_progress(model, progress)
        run.bundle.set_epoch(epoch - 1)
        for cb in ctx.callbacks:
            cb.on_epoch_start(stage, epoch, model)
        lr = optimizer.param_groups[0]["lr"]

        began = time.perf_counter()
        train = train_one_epoch(ctx, run.bundle.train, optimizer, stage, epoch, recipe.trained_epochs, recipe.regularizer)
        synchronize(ctx.device)
        trained = time.perf_counter()
        distributed.broadcast_buffers(model)  # every rank evaluates the model rank 0 saves
        test = evaluate(ctx, run.bundle.test)
        synchronize(ctx.device)
        ended = time.perf_counter()
        if not math.isfinite(test.metrics["test_loss"]):
            raise TrainingDiverged(f"stage {stage}, epoch {epoch}, evaluation: the test loss is {test.metrics['test_loss']}")
        # sign(NaN) is a valid -1: NaN latent weights can hide behind a finite loss
        broken = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
        if broken:
            raise TrainingDiverged(f"stage {stage}, epoch {epoch}: non-finite parameters ({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''})")
        scheduler.step()

        reports = [cb.on_epoch_end(stage, epoch, model) for cb in ctx.callbacks]
        row: dict[str, Any] = {"stage": stage, "epoch": epoch, "epochs": recipe.trained_epochs, "progress": progress, "lr": lr}
        row.update(train)
        row.update(test.metrics)
        row.update(schedule_columns(weights, activations, progress))
        row.update(
            epoch_time_s=ended - began,
            train_time_s=trained - began,
            eval_time_s=ended - trained,
            train_images_per_s=train["train_images"] / (trained - began),
        )
        for report in reports:
            row.update(report.columns)
        if test.metrics["test_top1"] > best["test_top1"]:
            best = {"test_top1": test.metrics["test_top1"], "epoch": epoch}

        ctx.display.epoch_summary(row)
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
            "spec": run.spec.to_dict(),
        }
        layer_rows = [{"stage": stage, "epoch": epoch, **r} for report in reports for r in report.layers]
        run.directory.record_epoch(row, layer_rows, state, best=best["epoch"] == epoch)
        if stage == spec.stages[-1]:
            run.directory.save_predictions(test.predictions, test.labels, stage, epoch)
        run.tensorboard.epoch(len(run.directory.metrics.rows), row, layer_rows, model)
        distributed.barrier()  # the other ranks may read these files next (stage 2's start)


def schedule_columns(weights: bnnbench.Method, activations: bnnbench.Method, progress: float) -> dict[str, float]:
    """``schedule_<name>`` of the weight binarizer, and ``schedule_act_<name>`` of a different activation one."""
    columns = {f"schedule_{k}": v for k, v in weights.schedule(progress).items()}
    if activations is not weights and activations.name != weights.name:
        columns.update({f"schedule_act_{k}": v for k, v in activations.schedule(progress).items()})
    return columns


def initialise_stage(run: RunState, stage: int) -> None:
    """Stage 2 starts from this run's stage-1 checkpoint, or from ``init``."""
    spec = run.spec
    if stage == 1:
        return
    if 1 in spec.stages:
        source = run.directory.checkpoint_path(1, spec.recipe.stage2_init)
    elif spec.init == "scratch":
        return
    else:
        source = Path(spec.init)  # type: ignore[arg-type]
    state = load_checkpoint(source)
    load_model_state(run.ctx.model, state, source, f"{spec.model.net} with method {spec.model.label}")
    run.ctx.display.log(f"stage 2 starts from {source} (stage {state.get('stage')}, epoch {state.get('epoch')})")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ======================================================================== one run
def train(directory: RunDirectory, *, display: Display | None = None, callbacks: Sequence[EpochCallback] | None = None) -> dict[str, Any]:
    """Train every remaining epoch of every stage of ``directory``'s run under its lock (a
    :class:`~.locks.RunBusy` error when another process trains it); returns ``final.json`` (on
    every rank).  Call within :func:`distributed.process_group` (as :func:`run_training` does)."""
    display = (display or Display()) if directory.writes else distributed.SilentDisplay()
    if not directory.finished:
        with directory.claim():
            if not directory.finished:  # another process may have finished it before the lock was ours
                return train_claimed(directory, display, callbacks)
    display.log(f"run {directory.path} already finished; nothing to resume")
    return directory.final()


def train_claimed(directory: RunDirectory, display: Display, callbacks: Sequence[EpochCallback] | None) -> dict[str, Any]:
    """:func:`train` once the run directory is this process's (:meth:`RunDirectory.claim`)."""
    spec, machine = directory.spec, directory.machine
    if machine.threads:
        torch.set_num_threads(machine.threads)
    seed_everything(spec.seed)
    device = distributed.rank_device(machine.resolve_device())
    world = distributed.world_size()
    distributed.check_processes(spec.recipe.batch_size, machine.sync_bn, device, world)
    amp = resolve_amp(machine, device)
    init_record = stage2_source(spec) if directory.fresh else None

    # ---- data (an image folder may hold fewer classes than the data set: the classifier follows it)
    bundle = open_data(data_request(spec, machine, device, world, distributed.is_distributed()))
    if bundle.num_classes != spec.model.num_classes:
        if not directory.fresh:
            raise ValueError(f"{spec.data} now has {bundle.num_classes} classes, but run {directory.path} was trained with {spec.model.num_classes}")
        display.log(f"{spec.data} here has {bundle.num_classes} classes: the classifier has {bundle.num_classes} outputs")
        spec = directory.spec = spec.replace(model=spec.model.replace(num_classes=bundle.num_classes))

    # ---- model
    model = spec.model.build(stage=spec.stages[0]).to(device)
    sync_bn = machine.sync_bn and world > 1
    if sync_bn:
        model = distributed.sync_batch_norm(model, device)
    elif machine.sync_bn:
        display.log("--sync-bn has no effect with a single process")
    channels_last = resolve_channels_last(machine.channels_last, device, amp, model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    teacher_record = None
    if spec.teacher_spec is not None:
        if machine.compile:
            raise ConfigError(f"method {spec.model.method!r} trains against a teacher, which torch.compile (--compile) does not support here yet: drop --compile")
        teacher, teacher_record = load_teacher(spec, machine, device)
        bnnbench.attach_teacher(model, teacher.to(memory_format=torch.channels_last) if channels_last else teacher)
    inference = torch.compile(model) if machine.compile else model
    check_every = 1 if device.type == "cpu" else GPU_CHECK_EVERY

    # ---- run directory and resume point
    resolved = {
        "device": str(device),
        "amp_bf16": amp,
        "bf16_formulas": machine.bf16_formulas if amp and takes_fused_formulas(model, torch.bfloat16) else None,  # None: no difference
        "fp32_formulas": machine.fp32_formulas if not amp and takes_fused_formulas(model, torch.float32) else None,
        "channels_last": channels_last,
        "compile": machine.compile,
        "stage2_init": init_record,
        "world_size": world,
        "distributed_backend": distributed.backend_name(),
        "process_batch_size": bundle.train.batch_size,
        "process_eval_batch_size": bundle.test.batch_size,
        "sync_bn": sync_bn,
        "check_every": check_every,
        **({"teacher": teacher_record} if teacher_record is not None else {}),
    }
    latest = directory.start(
        {
            "spec": spec.to_dict(),
            "settings": machine.to_dict(),
            "resolved": resolved,
            "model": spec.model.describe(),
            "data": bundle.info,
            "git": source_commit(),
            "versions": package_versions(),
            "machine": device_info(device),
        }
    )
    if latest is not None:
        set_rng_state(rank_rng_state(latest, world, display))  # after everything above that draws random numbers
    display.log(f"run directory: {directory.path}" + (f" ({world} processes, {distributed.backend_name()})" if world > 1 else ""))
    cost = CostEstimate(spec, str(device), display, epochs_done=len(directory.metrics.rows), steps_per_epoch=len(bundle.train))
    ctx = StepContext(
        model,
        inference,
        inference,
        device,
        amp,
        {"bf16": machine.bf16_formulas, "fp32": machine.fp32_formulas},
        channels_last,
        spec.recipe.label_smoothing,
        check_every,
        default_callbacks() if callbacks is None else list(callbacks),
        display,
        cost,
    )
    run = RunState(spec, directory, ctx, bundle, TensorBoardLog.open(directory.path, enabled=machine.tensorboard and directory.writes))

    # ---- stages
    try:
        with sigterm_as_interrupt(), run.tensorboard:
            for stage in spec.stages:
                train_stage(run, stage, latest)
    except RunInterrupted:
        raise  # not a failure: the finished epochs are kept (RunDirectory.claim)
    except Exception as exc:
        where = directory.fail(exc)
        if isinstance(exc, TrainingDiverged):
            raise TrainingDiverged(f"{exc}; {where}. Lower the learning rate (--lr) or check the method's hyper-parameters.") from None
        raise

    # ---- results (rank 0 holds the metrics; every rank returns the same summary)
    final = distributed.main_process_value(directory.summary)
    skipped = distributed.all_gather(bundle.train.skipped_images | bundle.test.skipped_images)
    final["skipped_bad_images"] = sorted(set().union(*skipped))
    directory.finish(final)
    display.log(f"finished: top-1 {final['final_test_top1']:.2f}% (best {final['best_test_top1']:.2f}%), results in {directory.path}")
    return final


def stage2_source(spec: RunSpec) -> dict[str, Any] | None:
    """Where stage 2 starts from (an ``init`` checkpoint is read before anything is written)."""
    if spec.stages == (1, 2):
        return {"source": f"this run's {checkpoint_name(1, spec.recipe.stage2_init)}"}
    if spec.init is None or spec.init == "scratch":
        return None if spec.init is None else {"source": "scratch"}
    state = load_checkpoint(Path(spec.init))
    return {"source": str(Path(spec.init).resolve()), "stage": state.get("stage"), "epoch": state.get("epoch"), "spec": state.get("spec")}


def rank_rng_state(latest: dict[str, Any], world: int, display: Display) -> dict[str, Any]:
    """This rank's saved RNG state when the world size is unchanged, else rank 0's (see the module docstring)."""
    saved_world = int(latest.get("world_size", 1))
    if saved_world != world:
        display.log(
            f"resuming a run trained on {saved_world} process(es) with {world}: the data shards and per-rank RNG "
            "differ, so the numbers will not match an uninterrupted run exactly"
        )
    if saved_world == world and "rng_ranks" in latest:
        return latest["rng_ranks"][distributed.rank()]
    return latest["rng"]


def run_training(
    spec: RunSpec, machine: Machine | None = None, *, quiet: bool = False, callbacks: Sequence[EpochCallback] | None = None
) -> dict[str, Any]:
    """Train a fresh run (library entry point; the CLI is ``bnnbench run``)."""
    machine = machine or Machine()
    with distributed.process_group(machine.resolve_device()):
        return train(RunDirectory.new(spec, machine), display=Display(quiet), callbacks=callbacks)


def resume_training(path: str | Path, *, quiet: bool = False, callbacks: Sequence[EpochCallback] | None = None) -> dict[str, Any]:
    """Continue the run in ``path`` from its latest checkpoint."""
    directory = RunDirectory.open(path)
    with distributed.process_group(directory.machine.resolve_device()):
        return train(directory, display=Display(quiet), callbacks=callbacks)


__all__ = [
    "EpochCallback",
    "EpochReport",
    "RunInterrupted",
    "TIMING_COLUMNS",
    "TrainingDiverged",
    "resume_training",
    "run_training",
    "train",
    "train_stage",
]
