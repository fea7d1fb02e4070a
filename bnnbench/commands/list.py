"""``bnnbench list``: every registered method, compact (name, scale, schedule, paper) and readable at 80 columns.

``--formulas`` adds each half's forward and backward, one method per block; ``--json`` prints
everything (formulas, hyper-parameters, defaults) for scripts; ``--nets`` lists the backbones.
"""

from __future__ import annotations

import argparse
import json
import shutil
from typing import Any

HELP = "list registered methods (compact; --formulas for forward/backward, --json for scripts) or networks (--nets)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nets", action="store_true", help="list the backbones instead of the methods")
    parser.add_argument("--formulas", action="store_true", help="show each method's forward and backward formulas and hyper-parameters")
    parser.add_argument("--json", action="store_true", help="print every method's record as JSON")


def method_record(name: str) -> dict[str, Any]:
    """What ``bnnbench list`` knows about a method: both halves' formulas, scale, schedule, defaults."""
    from ..registry import get_method

    method = get_method(name)
    return {
        "name": name,
        "scale": method.scale,
        "schedule": ", ".join(method.schedule(0.0)) or "-",
        "act_norm": method.default_act_norm,
        "weights": {"forward": method.weight_forward, "backward": method.weight_backward} if method.binary_weights else "real",
        "activations": {"forward": method.activation_forward, "backward": method.activation_backward} if method.binary_activations else "real",
        "hparams": method.hparams(),
        "paper": method.paper,
    }


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..models import list_nets
    from ..registry import list_methods

    console = Console()
    if args.nets:
        for net in list_nets():
            print(net)
        return 0
    records = [method_record(name) for name in list_methods()]
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    if args.formulas:
        for r in records:
            console.print(f"[bold]{r['name']}[/bold]  scale {r['scale']}, schedule {r['schedule']}, act_norm {'on' if r['act_norm'] else 'off'}", highlight=False)
            for half in ("weights", "activations"):
                value = r[half]
                text = "real" if value == "real" else f"forward  {value['forward']}\n               backward {value['backward']}"
                console.print(f"  {half:13}{text}", highlight=False, soft_wrap=True)
            hp = ", ".join(f"{k}={v}" for k, v in r["hparams"].items()) or "-"
            console.print(f"  {'hparams':13}{hp}\n  {'paper':13}{r['paper']}\n", highlight=False, soft_wrap=True)
        return 0
    keys, headers = ("name", "scale", "schedule"), ("method", "scale", "schedule")
    widths = [max(len(h), *(len(r[k]) for r in records)) for k, h in zip(keys, headers)]
    room = max(shutil.get_terminal_size().columns - 2 - sum(widths) - 2 * len(widths), 20)
    print(" " + "  ".join(h.ljust(w) for h, w in zip(headers, widths)) + "  paper")
    for r in records:
        paper = r["paper"] if len(r["paper"]) <= room else r["paper"][: room - 3] + "..."
        print(" " + "  ".join(r[k].ljust(w) for k, w in zip(keys, widths)) + "  " + paper)
    print("(--formulas: forward, backward and hyper-parameters; --json: everything)")
    return 0
