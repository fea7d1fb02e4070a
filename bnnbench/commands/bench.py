"""``bnnbench bench conv|model|train``: packed XNOR conv vs float/bf16/int8 convs, whole networks, and the training-step cost of each binarizer."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ._arguments import at_least

if TYPE_CHECKING:
    from rich.table import Table

HELP = (
    "benchmarks: `bench conv` (packed binary conv vs float32, bf16, int8), `bench model` (whole network: float, int8, packed), "
    "`bench train` (training images/s per method vs fp)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="bench", metavar="KIND")
    kinds.required = True
    conv = kinds.add_parser("conv", help="ResNet-18 binary 3x3 conv shapes: packed XNOR-popcount vs float32, bf16 and int8 convs")
    conv.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes (default: 1 16)")
    conv.add_argument("--out", default="results/bench/conv.csv", help="CSV file (default: results/bench/conv.csv)")
    model = kinds.add_parser("model", help="whole network at inference: float model vs float path vs int8 path vs packed (in bits)")
    model.add_argument("--net", default="resnet18", help="backbone (default: resnet18)")
    model.add_argument("--family", choices=("cifar", "imagenet"), default="imagenet", help="network family (default: imagenet)")
    model.add_argument("--method", default="biper", help="binary method (default: biper)")
    model.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes (default: 1 16)")
    model.add_argument("--out", default="results/bench/model.csv", help="CSV file (default: results/bench/model.csv)")
    train = kinds.add_parser("train", help="images/s and peak memory of one training step per method vs the full-precision model")
    train.add_argument("--net", default="resnet20", help="backbone (default: resnet20)")
    train.add_argument("--family", choices=("cifar", "imagenet"), default="cifar", help="network family (default: cifar)")
    train.add_argument("--batch", type=int, default=128, help="batch size (default: 128)")
    train.add_argument("--methods", nargs="+", default=None, help="methods to time (default: all registered; fp is always added)")
    train.add_argument("--stage", type=int, choices=(1, 2), default=2, help="training stage of the binary methods (default: 2)")
    train.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    train.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: as a run: on for CUDA and CPUs with AVX512-BF16/AMX)")
    train.add_argument("--bf16-formulas", metavar="fused|torch", default="fused", help="the fused bf16 formulas or torch's, as a run's --bf16-formulas")
    train.add_argument("--fp32-formulas", metavar="torch|fused", default="torch", help="torch's fp32 formulas or the fused ones, as a run's --fp32-formulas")
    train.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="channels_last (default: as a run: on for CUDA and, under bf16 autocast on bf16 hardware, for models whose kernels take it)")
    train.add_argument("--compile", action="store_true", help="torch.compile every model (compilation is not timed)")
    train.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement (one process per method)")
    train.add_argument("--csv", "--out", dest="csv", default="results/bench/train.csv", help="CSV file (default: results/bench/train.csv)")
    train.add_argument(
        "--breakdown",
        metavar="CSV",
        default=None,
        help="also profile each method's step per operator against fp's (self CPU ms per step; 3 rounds of 4 steps) into this CSV",
    )
    for sub, budget in ((conv, 3.0), (model, 20.0), (train, 3.0)):
        sub.add_argument("--threads", type=at_least(1), default=1, help="threads for torch and numba alike (default: 1)")
        sub.add_argument("--budget", type=float, default=budget, help=f"seconds of timing per row (per batch for model; default: {budget})")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..runners.bench import conv_benchmark, write_csv  # heavy imports only when run
    from ..runners.bench_model import model_benchmark
    from ..runners.bench_train import StepSettings, train_benchmark
    from ..runners.spec import Machine

    console = Console()
    if args.bench == "conv":
        rows, machine = conv_benchmark(batches=args.batches, threads=args.threads, budget_s=args.budget)
        console.print(machine_line(machine))
        peak = machine["popcount_peak_gops_1thread"]
        console.print(
            f"popcount peak, 1 thread: {peak['peak']:.0f} binary GOPS ({machine['peak_loop']}; best loops: scalar POPCNT "
            f"{peak['scalar']:.0f}, vector {peak['vector']:.0f}, mixed {peak['mixed']:.0f}); GEMM micro-kernel {machine['micro_kernel']} "
            f"({machine['popcount_isa']})"
        )
        console.print(
            "oneDNN kernels: " + ", ".join(f"{name.removeprefix('onednn_')} {impl}" for name, impl in machine.items() if name.startswith("onednn_"))
        )
        console.print(conv_table(rows))
        console.print(conv_verdict(rows))
    elif args.bench == "model":
        rows, machine = model_benchmark(
            net=args.net, family=args.family, method=args.method, batches=args.batches, threads=args.threads, budget_s=args.budget
        )
        console.print(machine_line(machine))
        console.print(model_table(rows))
    else:
        Machine(device=args.device).resolve_device()  # a run's device checks, before any timing
        settings = StepSettings.auto(
            args.amp,
            args.channels_last,
            device=args.device,
            net=args.net,
            family=args.family,
            batch=args.batch,
            stage=args.stage,
            compile=args.compile,
            bf16_formulas=args.bf16_formulas,
            fp32_formulas=args.fp32_formulas,
        )
        rows, machine = train_benchmark(settings, methods=args.methods, threads=args.threads, budget_s=args.budget, memory=not args.no_memory)
        console.print(machine_line(machine))
        console.print(train_table(rows))
    path = write_csv(args.csv if args.bench == "train" else args.out, rows, machine)
    console.print(f"wrote {path}")
    if args.bench == "train" and args.breakdown:  # after the timings are safe on disk
        from ..runners.bench_breakdown import operator_breakdown

        operators = operator_breakdown(settings, [r["method"] for r in rows], threads=args.threads)
        console.print(breakdown_table(operators))
        console.print(f"wrote {write_csv(args.breakdown, operators, machine)}")
    return 0


def machine_line(machine: dict[str, Any]) -> str:
    return (
        f"{machine['date']}  CPU: {machine['cpu']} (family/model {machine['cpu_family_model']}; {machine['isa']}), "
        f"{machine['threads']} thread(s) of {machine['logical_cpus']}, torch {machine['torch']}, numba {machine['numba']}, "
        f"micro-kernel {machine['micro_kernel']}"
    )


def breakdown_table(rows: list[dict[str, Any]], top: int = 5) -> Table:
    """Per binary method, its profiled step and the ``top`` operators that take the most time beyond fp's."""
    from rich.table import Table

    from ..runners.bench_breakdown import step_totals

    totals = step_totals(rows)
    table = Table(title=f"where the step goes beyond fp's: profiled self CPU ms per step (fp {totals['fp']:.1f} ms), top {top} operators")
    for header in ("method", "profiled ms", "operators: extra ms per step (calls per step)"):
        table.add_column(header, justify="left" if header != "profiled ms" else "right")
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "fp"):
        mine = [r for r in rows if r["method"] == method][:top]
        cells = ", ".join(f"{r['operator']} {r['extra_ms_per_step']:+.1f} ({r['calls_per_step']:.0f})" for r in mine)
        table.add_row(method, f"{totals[method]:.1f}", cells)
    return table


def conv_table(rows: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    table = Table(title="binary 3x3 conv, best call of alternating blocks (median in brackets); speed-up over F.conv2d float32 [ideal]")
    headers = ["layer", "batch", "F.conv2d ms", "bf16 ms", "int8 ms", "packed ms", "speed-up [ideal]", "vs int8", "GEMM % peak", "fastest"]
    if "packed_scaling" in rows[0]:
        headers.insert(-1, "2 threads")
    for header in headers:
        table.add_column(header, justify="left" if header in ("layer", "fastest") else "right", no_wrap=True)
    for r in rows:
        cells = [
            r["layer"],
            str(r["batch"]),
            f"{r['float_ms']:.3f} ({r['float_median_ms']:.3f})",
            f"{r['bf16_ms']:.3f}|{r['bf16_prepacked_ms']:.3f}",
            f"{r['int8_ms']:.3f}",
            f"{r['packed_ms']:.3f} ({r['packed_median_ms']:.3f})",
            f"{r['speedup']:.1f}x [{r['ideal_ratio']:.1f}x]",
            f"{r['speedup_vs_int8']:.2f}x",
            f"{100 * r['gemm_share_of_peak']:.0f}%",
            r["fastest"],
        ]
        if "packed_scaling" in r:
            cells.insert(-1, f"{r['packed_scaling']:.2f}x")
        table.add_row(*cells)
    table.caption = "bf16: F.conv2d|weights prepacked for oneDNN; int8: oneDNN, input quantisation included; ideal = popcount peak / F.conv2d GFLOP/s"
    return table


def conv_verdict(rows: list[dict[str, Any]]) -> str:
    """Which contender is fastest how often, and the packed kernel's ratio to the best non-binary conv."""
    wins: dict[str, int] = {}
    for r in rows:
        wins[r["fastest"]] = wins.get(r["fastest"], 0) + 1
    ratios = [min(r["speedup_vs_int8"], r["speedup_vs_bf16_prepacked"], r["speedup_vs_float_prepacked"]) for r in rows]
    tally = ", ".join(f"{name} {count}" for name, count in sorted(wins.items(), key=lambda item: -item[1]))
    return (
        f"fastest per row ({len(rows)} rows): {tally}; packed XNOR vs the best float32/bf16/int8 conv of each row: "
        f"{min(ratios):.2f}x to {max(ratios):.2f}x"
    )


def model_table(rows: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    first = rows[0]
    table = Table(title=f"{first['net']} + {first['method']} inference, best call (median in brackets)")
    for header in ("batch", "contender", "ms", "vs float model", "vs float path", "memory", "predictions = float model"):
        table.add_column(header, justify="left" if header in ("contender", "memory") else "right", no_wrap=True)
    for r in rows:
        table.add_row(
            str(r["batch"]),
            r["contender"],
            f"{r['ms']:.2f} ({r['median_ms']:.2f})",
            f"{r['speedup_vs_float_model']:.2f}x",
            f"{r['speedup_vs_float_path']:.2f}x ({r['speedup_vs_float_path_median']:.2f}x)",
            r["memory"],
            "yes" if r["predictions_identical"] else f"NO (max logit diff {r['max_logit_difference']:.2g})",
        )
    return table


def train_table(rows: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    first = rows[0]
    bf16 = "bf16 autocast" + (" (torch's formulas)" if first.get("bf16_formulas") == "torch" else "")
    fp32 = "fp32 eager" + (" (fused formulas)" if first.get("fp32_formulas") == "fused" else "")
    modes = ", ".join(name for name, on in ((bf16, first["amp_bf16"]), ("channels_last", first["channels_last"]), ("torch.compile", first["compile"])) if on) or fp32
    table = Table(
        title=f"training step, {first['net']} stage {first['stage']}, batch {first['batch']}, {modes} "
        "(best; median, and vs fp the median of the rounds' ratios, in brackets)"
    )
    for header in ("method", "images/s", "step ms", "step vs fp", "peak MiB", "vs fp"):
        table.add_column(header, justify="left" if header == "method" else "right", no_wrap=True)
    for r in rows:
        table.add_row(
            r["method"] + ("" if r["channels_last"] == first["channels_last"] else " (channels_last)" if r["channels_last"] else " (NCHW)"),
            f"{r['images_per_s']:.0f} ({r['images_per_s_median']:.0f})",
            f"{r['step_ms']:.1f}",
            f"{r['step_vs_fp']:.2f}x ({r['step_vs_fp_median']:.2f}x, {r['step_vs_fp_paired']:.2f}x)",
            f"{r['peak_mib']:.0f}",
            f"{r['peak_vs_fp']:.2f}x",
        )
    return table
