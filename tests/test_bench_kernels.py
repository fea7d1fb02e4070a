"""`bnnbench bench conv` and `bench model` on tiny shapes: every contender runs, checks its result and lands in the rows."""

from __future__ import annotations

import pytest
from rich.console import Console

from bnnbench.commands.bench import conv_table, conv_verdict, model_table
from bnnbench.kernels import SELECTED
from bnnbench.runners.bench import conv_benchmark, write_csv
from bnnbench.runners.bench_model import CONTENDERS, model_benchmark


def rendered(table) -> str:
    console = Console(record=True, width=250)
    console.print(table)
    return console.export_text()


def test_conv_benchmark_rows_name_every_contender_and_the_kernel(tmp_path):
    rows, machine = conv_benchmark(batches=(1, 2), budget_s=0.02, shapes=((16, 32, 6, 1), (32, 64, 6, 2)))
    assert [(r["layer"], r["batch"]) for r in rows] == [("16->32 @6x6 s1", 1), ("16->32 @6x6 s1", 2), ("32->64 @6x6 s2", 1), ("32->64 @6x6 s2", 2)]
    for r in rows:
        assert r["fastest"] in ("float32 F.conv2d", "float32 prepacked", "bf16 F.conv2d", "bf16 prepacked", "int8 oneDNN", "packed XNOR")
        assert r["speedup"] > 0 and r["ideal_ratio"] > 0 and 0 < r["gemm_share_of_peak"]
        assert r["packed_memory"] in ("nchw", "channels_last") and r["bf16_exact"] in (True, False)
        assert r["gemm_stores"] == "cached"  # outputs of a few KiB stay in the caches
    assert machine["stream_threshold_bytes"] > 0
    assert machine["micro_kernel"] == SELECTED.name and machine["popcount_isa"]
    assert machine["peak_loop_peak_gops_1thread"] == machine["popcount_peak_gops_1thread"]["peak"] > 0
    assert "convolution" not in machine["onednn_int8"] and machine["onednn_int8"]  # an implementation name, e.g. brg_conv_fwd:...
    assert "16->32 @6x6 s1" in rendered(conv_table(rows)) and "fastest per row (4 rows)" in conv_verdict(rows)
    path = write_csv(tmp_path / "conv.csv", rows, machine)
    header = path.read_text().splitlines()[0].split(",")
    assert {"micro_kernel", "popcount_isa", "load_average_1_5_15min", "speedup_vs_int8"} <= set(header)


def test_model_benchmark_times_every_contender_with_identical_predictions():
    rows, machine = model_benchmark(net="resnet20", family="cifar", batches=(2,), budget_s=0.05)
    assert [r["contender"] for r in rows] == list(CONTENDERS)
    assert all(r["predictions_identical"] and r["max_logit_difference"] < 1e-4 for r in rows)
    float_model = next(r for r in rows if r["contender"] == "float model")
    assert float_model["speedup_vs_float_model"] == 1.0 and machine["micro_kernel"] == SELECTED.name
    assert all(name in rendered(model_table(rows)) for name in CONTENDERS)


def test_interleaved_timing_enters_a_contender_setting_around_its_blocks_only():
    """A setting (e.g. a thread count) is active in every call of its contender and in no other's."""
    from contextlib import contextmanager

    from bnnbench.runners.bench import time_interleaved

    state = {"on": False, "entered": 0}
    seen: dict[str, set[bool]] = {"plain": set(), "set": set()}

    @contextmanager
    def switch():
        state["on"], state["entered"] = True, state["entered"] + 1
        try:
            yield
        finally:
            state["on"] = False

    calls = {"plain": lambda: seen["plain"].add(state["on"]), "set": lambda: seen["set"].add(state["on"])}
    times = time_interleaved(calls, budget_s=0.01, min_runs=20, block_s=0.001, settings={"set": switch})
    assert seen == {"plain": {False}, "set": {True}}
    assert times["set"].runs >= 20 and 1 < state["entered"] < times["set"].runs + 1  # once per block, not per call


def test_the_paired_ratio_pairs_each_round_and_one_lucky_call_does_not_move_it(monkeypatch):
    """Each round gives every contender one block; the paired ratio is the median of the rounds' ratios: a baseline
    call that ran twice as fast once (a lucky spell) moves best / best from 1.5 to 3, and the paired ratio not."""
    import itertools

    from bnnbench.runners import bench

    clock = itertools.count()
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock) * 1e-3)  # 1 ms a reading
    calls = {"base": 0, "other": 0}

    def timed(name: str, ms: int):
        def call() -> None:
            calls[name] += 1
            lucky = name == "base" and calls[name] == 3  # the second timed call (the first is the warm-up)
            for _ in range((ms // 2 if lucky else ms) - 1):  # the reading after the call makes the last ms
                next(clock)

        return call

    times = bench.time_interleaved({"base": timed("base", 2), "other": timed("other", 3)}, budget_s=0.0, min_runs=6, block_s=0.0)
    assert len(times["base"].blocks) == len(times["other"].blocks) == times["base"].runs == 6
    assert times["other"].best / times["base"].best == pytest.approx(3.0)
    assert bench.paired_ratio(times["other"], times["base"]) == pytest.approx(1.5)
