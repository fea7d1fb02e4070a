"""What a run shows while it trains: a progress line that fits 80 columns, and an early estimate of the whole run."""

from __future__ import annotations

import io

from rich.console import Console

from bnnbench.runners.display import CostEstimate, Display, format_duration
from bnnbench.runners.spec import RunSpec


class Lines(Display):
    """A display that keeps its log lines."""

    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def test_the_live_line_fits_80_columns_with_the_step_count_and_times():
    buffer = io.StringIO()
    display = Display(console=Console(file=buffer, width=80, force_terminal=True, color_system=None))
    with display.epoch(2, 300, 300, 196) as bar:
        for _ in range(3):
            bar.advance(256, 12.3456, 25)
    shown = [line.replace("\x1b[2K", "") for line in buffer.getvalue().replace("\r", "\n").split("\n") if "s2 300/300" in line]
    assert shown and all(len(line) <= 80 for line in shown), shown
    assert "3/196" in shown[-1] and "loss 12.346" in shown[-1] and "<" in shown[-1] and "…" not in shown[-1]


def test_the_estimate_names_the_whole_run_and_warns_past_a_day():
    spec = RunSpec.make("cifar10", net="resnet18", method="biper")  # upstream: 600 + 300 epochs
    lines = Lines()
    cost = CostEstimate(spec, "cpu", lines, epochs_done=0, steps_per_epoch=196)
    cost._say(12.2)  # 12.2 s per step of 256 images: what a 2-core CPU gives for ResNet-18 (21 img/s)
    assert "estimated training time: 25 days for the remaining 176,400 steps of both stages" in lines.lines[0]
    assert "--recipe short" in lines.lines[1] and "--device cuda" in lines.lines[1]
    short = Lines()
    CostEstimate(RunSpec.make("digits", recipe="quick"), "cpu", short, epochs_done=0, steps_per_epoch=32)._say(0.05)
    assert len(short.lines) == 1 and "warning" not in short.lines[0]


def test_the_estimate_is_said_once_after_the_first_steps():
    lines = Lines()
    cost = CostEstimate(RunSpec.make("digits", recipe="quick"), "cpu", lines, epochs_done=0, steps_per_epoch=32)
    for _ in range(40):
        cost.observe(1)
    assert len(lines.lines) == 1 and "for the remaining 140 steps" in lines.lines[0]


def test_format_duration():
    assert [format_duration(s) for s in (5, 600, 4 * 3600, 3 * 86400)] == ["5 s", "10 min", "4.0 h", "3 days"]
