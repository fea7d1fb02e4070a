"""Progress output of a training run: a rich live bar per epoch, or plain log lines (``--quiet``),
and :class:`CostEstimate`, which says early how long the whole run will take.

The live line fits 80 columns: ``s1 600/600 ━━━━━━━━ 12/196 loss 2.301 acc 10.0% 1,267 img/s 0:01:02 < 0:08:44``
(stage, epoch, bar, steps, running training loss and accuracy, speed, elapsed < remaining).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from .spec import RunSpec

DAY_S = 24 * 3600.0
ESTIMATE_AFTER_STEPS = 20


class EpochBar:
    """Running totals of one training epoch, shown on a rich bar when one is attached."""

    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self.progress, self.task = progress, task
        self.start = time.perf_counter()
        self.images = 0
        self.steps = 0
        self.loss_sum = 0.0
        self.correct = 0

    def advance(self, images: int, loss: float, correct: int, steps: int = 1) -> None:
        """Add ``steps`` finished steps holding ``images`` images, their mean ``loss`` and ``correct`` hits."""
        self.images += images
        self.steps += steps
        self.loss_sum += loss * images
        self.correct += correct
        if self.progress is not None and self.task is not None:
            rate = self.images / max(time.perf_counter() - self.start, 1e-9)
            speed = f"{rate:,.0f}" if rate < 1e5 else f"{rate / 1e3:,.0f}k"
            stats = f"loss {self.loss_sum / self.images:.3f} acc {100 * self.correct / self.images:4.1f}% {speed} img/s"
            self.progress.update(self.task, advance=steps, stats=stats)


class Display:
    """Where a run reports progress: ``quiet`` prints one line per epoch and nothing live."""

    def __init__(self, quiet: bool = False, console: Console | None = None) -> None:
        self.quiet = quiet
        self.console = console or Console()

    def log(self, message: str) -> None:
        if self.quiet:
            print(message, flush=True)
        else:
            self.console.print(message, highlight=False, soft_wrap=True)

    @contextmanager
    def epoch(self, stage: int, epoch: int, epochs: int, steps: int) -> Iterator[EpochBar]:
        if self.quiet:
            yield EpochBar(None, None)
            return
        columns = (
            TextColumn(f"s{stage} {epoch}/{epochs}"),
            BarColumn(bar_width=8),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("<"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console, transient=True, expand=False) as progress:
            yield EpochBar(progress, progress.add_task("train", total=steps, stats=""))

    def epoch_summary(self, row: dict[str, Any]) -> None:
        self.log(
            f"stage {row['stage']} epoch {row['epoch']}/{row['epochs']}: "
            f"train loss {row['train_loss']:.4f} top-1 {row['train_top1']:.2f}% | "
            f"test loss {row['test_loss']:.4f} top-1 {row['test_top1']:.2f}% top-5 {row['test_top5']:.2f}% | "
            f"lr {row['lr']:.3g} | {row['epoch_time_s']:.1f} s, {row['train_images_per_s']:,.0f} img/s"
        )


def format_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.4 h`` or ``23 days``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * DAY_S:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / DAY_S:.0f} days"


class CostEstimate:
    """Says, once, after the first ``ESTIMATE_AFTER_STEPS`` training steps (or the first epoch),
    how long the rest of the run takes at the measured step time, both stages included
    (evaluation excluded); past a day it names cheaper ways to run it."""

    def __init__(self, spec: RunSpec, device: str, display: Display, *, epochs_done: int, steps_per_epoch: int) -> None:
        self.display, self.device = display, device
        total_epochs = sum(spec.recipe.stage(s).trained_epochs for s in spec.stages)
        self.steps_left = max(total_epochs - epochs_done, 0) * steps_per_epoch
        self.after = min(ESTIMATE_AFTER_STEPS, steps_per_epoch)
        self.batch = spec.recipe.batch_size
        self.recipe = spec.recipe.name
        self.start: float | None = None  # when the first observed steps ended: they pay for warm-up, time from there
        self.seen = self.timed = 0
        self.said = False

    def observe(self, steps: int) -> None:
        """Called after ``steps`` more training steps whose results were read."""
        if self.said:
            return
        now = time.perf_counter()
        self.seen += steps
        if self.start is None:
            self.start = now
            return
        self.timed += steps
        if self.seen >= self.after:
            self.said = True
            self._say((now - self.start) / self.timed)

    def _say(self, step_s: float) -> None:
        left = self.steps_left - self.seen
        total = left * step_s
        message = (
            f"estimated training time: {format_duration(total)} for the remaining {left:,} steps of both stages "
            f"({step_s * 1e3:.0f} ms per step of {self.batch} images, {self.batch / step_s:,.0f} img/s on {self.device}; evaluation not included)"
        )
        self.display.log(message)
        if total > DAY_S:
            cheaper = "--recipe short or --recipe quick" if self.recipe not in ("short", "quick") else "fewer --epochs or a --train-subset"
            gpu = " or run it on a GPU (--device cuda)" if self.device.startswith("cpu") else ""
            self.display.log(f"warning: this run needs about {format_duration(total)} on {self.device}; for a trial use {cheaper}{gpu}")


__all__ = ["CostEstimate", "Display", "EpochBar", "format_duration"]
