"""Progress output of a training run: a rich live bar per epoch, or plain log lines (``--quiet``)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class EpochBar:
    """Running totals of one training epoch, shown on a rich bar when one is attached."""

    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self.progress, self.task = progress, task
        self.start = time.perf_counter()
        self.images = 0
        self.loss_sum = 0.0
        self.correct = 0

    def advance(self, images: int, loss: float, correct: int) -> None:
        self.images += images
        self.loss_sum += loss * images
        self.correct += correct
        if self.progress is not None and self.task is not None:
            rate = self.images / max(time.perf_counter() - self.start, 1e-9)
            stats = f"loss {self.loss_sum / self.images:.3f}  top-1 {100 * self.correct / self.images:5.1f}%  {rate:,.0f} img/s"
            self.progress.update(self.task, advance=1, stats=stats)


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
            TextColumn(f"stage {stage} epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console, transient=True) as progress:
            yield EpochBar(progress, progress.add_task("train", total=steps, stats=""))

    def epoch_summary(self, row: dict[str, Any]) -> None:
        self.log(
            f"stage {row['stage']} epoch {row['epoch']}/{row['epochs']}: "
            f"train loss {row['train_loss']:.4f} top-1 {row['train_top1']:.2f}% | "
            f"test loss {row['test_loss']:.4f} top-1 {row['test_top1']:.2f}% top-5 {row['test_top5']:.2f}% | "
            f"lr {row['lr']:.3g} | {row['epoch_time_s']:.1f} s, {row['train_images_per_s']:,.0f} img/s"
        )
