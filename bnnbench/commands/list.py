"""``bnnbench list``: every registered method with its formulas and hyper-parameters."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from ..models import list_nets
from ..registry import list_methods, method_class

HELP = "list registered methods (forward/backward formulas, hyper-parameters) and networks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nets", action="store_true", help="list the backbones instead of the methods")


def main(args: argparse.Namespace) -> int:
    console = Console()
    if args.nets:
        for net in list_nets():
            console.print(net)
        return 0
    table = Table(title="bnnbench methods", show_lines=True)
    for col in ("method", "weights: forward", "weights: backward", "activations: fwd / bwd", "scale", "hyper-parameters", "paper"):
        table.add_column(col, overflow="fold")
    for name in list_methods():
        cls = method_class(name)
        hp = ", ".join(f"{k}={v}" for k, v in cls.hparam_defaults().items()) or "-"
        act = f"{cls.activation_forward} / {cls.activation_backward}" if cls.binary_activations else "real"
        extras = " (act-norm)" if cls.default_act_norm else ""
        table.add_row(name, cls.weight_forward, cls.weight_backward, act + extras, cls.scale, hp, cls.paper)
    console.print(table)
    return 0
