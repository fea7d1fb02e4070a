"""``bnnbench bench train --breakdown``: where a binarizer's training step spends its time beyond fp's.

Per method and operator (aten operators and the autograd Functions of bnnbench and the methods, whose
self time holds the numba kernels they call), the profiler's self CPU time per step, next to fp's for the
same operator name.  Methods and fp take turns round by round, so a slow spell of the machine hits every
model alike.  Figures are taken under ``torch.profiler`` (some 5-10% slower than the unprofiled step), to
attribute a ratio measured without it (``bench train``), not to replace it.
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

from torch.profiler import ProfilerActivity, profile

from .bench import set_threads
from .bench_train import StepSettings, prepared_steps


def operator_breakdown(
    settings: StepSettings, methods: Sequence[str], threads: int = 1, rounds: int = 3, steps: int = 4
) -> list[dict[str, Any]]:
    """One row per method and operator: ms and calls per step, fp's for the same operator and the difference,
    averaged over ``rounds`` profiled blocks of ``steps`` steps each (after one warm-up step per model).
    Rows of a method are sorted by how much more time than fp's the operator takes."""
    if rounds < 1 or steps < 1:
        raise ValueError(f"rounds and steps must be at least 1, got {rounds} and {steps}")
    set_threads(threads)
    calls = prepared_steps(settings, methods)
    names = list(calls)
    self_ms = {name: collections.Counter() for name in names}
    counts = {name: collections.Counter() for name in names}
    per_step = rounds * steps
    for _ in range(rounds):
        for name, call in calls.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    call()
            for event in prof.key_averages():
                self_ms[name][event.key] += event.self_cpu_time_total / 1e3 / per_step
                counts[name][event.key] += event.count / per_step
    rows = []
    for name in names:
        operators = set(self_ms[name]) | (set(self_ms["fp"]) if name != "fp" else set())
        method_rows = [
            {
                "method": name,
                "operator": op,
                "ms_per_step": self_ms[name][op],
                "calls_per_step": counts[name][op],
                "fp_ms_per_step": self_ms["fp"][op],
                "fp_calls_per_step": counts["fp"][op],
                "extra_ms_per_step": self_ms[name][op] - self_ms["fp"][op],
            }
            for op in operators
        ]
        method_rows.sort(key=lambda r: -r["extra_ms_per_step"] if name != "fp" else -r["ms_per_step"])
        rows.extend(method_rows)
    return rows


def step_totals(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Profiled ms per step of each method: the sum of its operators' self times."""
    totals: dict[str, float] = collections.defaultdict(float)
    for r in rows:
        totals[r["method"]] += r["ms_per_step"]
    return dict(totals)


__all__ = ["operator_breakdown", "step_totals"]
