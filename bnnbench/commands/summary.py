"""``bnnbench summary``: larq-style per-layer table of precision, memory and MACs."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    from ..summary import LayerSummary, ModelSummary


TABLE_WIDTH = 150
HELP = "per-layer parameters by precision, memory, binary and 32-bit MACs, model size float32 vs packed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--net", required=True, help="backbone, e.g. resnet18, resnet20, vgg_small (see `bnnbench list --nets`)")
    parser.add_argument("--method", required=True, help="registered method, e.g. biper (see `bnnbench list`)")
    parser.add_argument("--family", choices=("cifar", "imagenet"), default="cifar", help="network family (default: cifar)")
    parser.add_argument("--resolution", type=int, default=None, help="input height and width (default: 32 for cifar, 224 for imagenet)")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=2, help="1: binary activations only; 2: weights too (default)")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from ..summary import summarize_net

    summary = summarize_net(args.net, args.method, family=args.family, resolution=args.resolution, stage=args.stage)
    console = Console(width=max(Console().width, TABLE_WIDTH))  # never truncate the numbers
    console.print(layer_table(summary))
    console.print(size_table(summary))
    return 0


def _count(n: float) -> str:
    return f"{n:,.0f}" if n else "0"


def _kib(bits: float) -> str:
    return f"{bits / 8 / 1024:,.2f}"


def layer_table(summary: ModelSummary) -> Table:
    table = Table(title=summary.title, show_footer=True)
    totals = summary.totals()
    columns = [
        ("layer", "Total", "left"),
        ("type", "", "left"),
        ("input bits", "", "right"),
        ("outputs", "", "left"),
        ("# 1-bit", _count(totals["params_1bit"]), "right"),
        ("# 32-bit", _count(totals["params_32bit"]), "right"),
        ("memory (KiB)", _kib(totals["memory_bits"]), "right"),
        ("binary MACs", _count(totals["macs_binary"]), "right"),
        ("32-bit MACs", _count(totals["macs_float"]), "right"),
    ]
    for header, footer, justify in columns:
        numeric = justify == "right"
        table.add_column(header, footer=footer, justify=justify, no_wrap=numeric, overflow="fold")  # type: ignore[arg-type]
    for layer in summary.layers:
        table.add_row(*_row(layer))
    return table


def _row(layer: LayerSummary) -> list[str]:
    return [
        layer.name,
        layer.kind,
        "-" if layer.input_bits is None else str(layer.input_bits),
        " x ".join(map(str, layer.output_shape)),
        _count(layer.params_1bit),
        _count(layer.params_32bit),
        _kib(layer.memory_bits),
        _count(layer.macs_binary),
        _count(layer.macs_float),
    ]


def size_table(summary: ModelSummary) -> Table:
    t = summary.totals()
    mib = 1024 * 1024
    table = Table(title="model size and operations (per image)")
    table.add_column("quantity", overflow="fold")
    table.add_column("value", justify="right", no_wrap=True)
    rows = [
        ("parameters", f"{t['params']:,} ({t['params_1bit']:,} 1-bit, {t['params_32bit']:,} 32-bit)"),
        ("size, float32", f"{t['float32_bytes'] / mib:,.2f} MiB"),
        ("size, packed (1 bit per binary weight)", f"{t['packed_bytes'] / mib:,.2f} MiB"),
        ("size, packed as stored (64-bit words)", f"{t['stored_packed_bytes'] / mib:,.2f} MiB"),
        ("compression ratio (float32 / packed)", f"{t['compression']:.2f}x"),
        ("binary MACs (BOPs)", f"{t['macs_binary'] / 1e6:,.1f} M"),
        ("32-bit MACs (FLOPs)", f"{t['macs_float'] / 1e6:,.1f} M"),
        ("OPs = FLOPs + BOPs / 64", f"{t['ops'] / 1e6:,.1f} M"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table
