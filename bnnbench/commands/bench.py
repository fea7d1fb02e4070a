"""``bnnbench bench conv|train``: packed XNOR conv vs F.conv2d, and the training-step cost of each binarizer."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

HELP = "benchmarks: `bench conv` (packed binary conv vs F.conv2d), `bench train` (training images/s per method vs fp)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="bench", metavar="KIND")
    kinds.required = True
    conv = kinds.add_parser("conv", help="ResNet-18 binary 3x3 conv shapes: packed XNOR-popcount vs float32 F.conv2d")
    conv.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes (default: 1 16)")
    conv.add_argument("--out", default="results/bench/conv.csv", help="CSV file (default: results/bench/conv.csv)")
    train = kinds.add_parser("train", help="images/s and peak memory of one training step per method vs the full-precision model")
    train.add_argument("--net", default="resnet20", help="backbone (default: resnet20)")
    train.add_argument("--family", choices=("cifar", "imagenet"), default="cifar", help="network family (default: cifar)")
    train.add_argument("--batch", type=int, default=128, help="batch size (default: 128)")
    train.add_argument("--methods", nargs="+", default=None, help="methods to time (default: all registered; fp is always added)")
    train.add_argument("--stage", type=int, choices=(1, 2), default=2, help="training stage of the binary methods (default: 2)")
    train.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    train.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: as a run: on for CUDA and CPUs with AVX512-BF16/AMX)")
    train.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="channels_last (default: as a run: on for CUDA)")
    train.add_argument("--compile", action="store_true", help="torch.compile every model (compilation is not timed)")
    train.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement (one process per method)")
    train.add_argument("--csv", "--out", dest="csv", default="results/bench/train.csv", help="CSV file (default: results/bench/train.csv)")
    for sub, budget in ((conv, 1.0), (train, 3.0)):
        sub.add_argument("--threads", type=int, default=1, help="threads for torch and numba alike (default: 1)")
        sub.add_argument("--budget", type=float, default=budget, help=f"seconds of timing per row (default: {budget})")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..runners.bench import conv_benchmark, write_csv  # heavy imports only when run
    from ..runners.bench_train import StepSettings, train_benchmark

    console = Console()
    if args.bench == "conv":
        rows, machine = conv_benchmark(batches=args.batches, threads=args.threads, budget_s=args.budget)
        console.print(machine_line(machine))
        peak = machine["popcount_peak_gops_1thread"]
        console.print(
            f"popcount peak, 1 thread: {peak['peak']:.0f} binary GOPS "
            f"(best loops: scalar POPCNT {peak['scalar']:.0f}, vector {peak['vector']:.0f}, mixed {peak['mixed']:.0f})"
        )
        console.print(conv_table(rows))
    else:
        settings = StepSettings.auto(
            args.amp, args.channels_last, device=args.device, net=args.net, family=args.family, batch=args.batch, stage=args.stage, compile=args.compile
        )
        rows, machine = train_benchmark(settings, methods=args.methods, threads=args.threads, budget_s=args.budget, memory=not args.no_memory)
        console.print(machine_line(machine))
        console.print(train_table(rows))
    path = write_csv(args.out if args.bench == "conv" else args.csv, rows, machine)
    console.print(f"wrote {path}")
    return 0


def machine_line(machine: dict[str, Any]) -> str:
    return (
        f"{machine['date']}  CPU: {machine['cpu']} (family/model {machine['cpu_family_model']}; {machine['isa']}), "
        f"{machine['threads']} thread(s) of {machine['logical_cpus']}, torch {machine['torch']}, numba {machine['numba']}"
    )


def conv_table(rows: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    table = Table(title="binary 3x3 conv: packed XNOR-popcount vs float32 F.conv2d (best call of alternating blocks; median in brackets)")
    for header in ("layer", "batch", "F.conv2d ms", "F.conv2d GFLOP/s", "packed ms", "speed-up", "GEMM GOPS", "% of popcount peak"):
        table.add_column(header, justify="left" if header == "layer" else "right", no_wrap=True)
    for r in rows:
        table.add_row(
            r["layer"],
            str(r["batch"]),
            f"{r['float_ms']:.3f} ({r['float_median_ms']:.3f})",
            f"{r['float_gflops']:.0f}",
            f"{r['packed_ms']:.3f} ({r['packed_median_ms']:.3f})",
            f"{r['speedup']:.1f}x ({r['speedup_median']:.1f}x)",
            f"{r['gemm_gops']:.0f}",
            f"{100 * r['gemm_share_of_peak']:.0f}%",
        )
    return table


def train_table(rows: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    first = rows[0]
    modes = ", ".join(name for name, on in (("bf16 autocast", first["amp_bf16"]), ("channels_last", first["channels_last"]), ("torch.compile", first["compile"])) if on) or "fp32 eager"
    table = Table(title=f"training step, {first['net']} stage {first['stage']}, batch {first['batch']}, {modes} (best; median in brackets)")
    for header in ("method", "images/s", "step ms", "step vs fp", "peak MiB", "vs fp"):
        table.add_column(header, justify="left" if header == "method" else "right", no_wrap=True)
    for r in rows:
        table.add_row(
            r["method"],
            f"{r['images_per_s']:.0f} ({r['images_per_s_median']:.0f})",
            f"{r['step_ms']:.1f}",
            f"{r['step_vs_fp']:.2f}x ({r['step_vs_fp_median']:.2f}x)",
            f"{r['peak_mib']:.0f}",
            f"{r['peak_vs_fp']:.2f}x",
        )
    return table
