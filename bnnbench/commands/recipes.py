"""``bnnbench recipes``: the named training presets of the two-stage protocol."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from ..runners.recipes import SCHEDULES, WD_GROUPS, Recipe, preset_recipes

HELP = "list the training recipes (paper, upstream, quick, short) with every field"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the recipes as JSON instead of tables")


def _stage_table(recipes: list[Recipe]) -> Table:
    table = Table(title="per stage: SGD momentum 0.9, linear warm-up then cosine, stepped per epoch")
    for col in ("recipe", "stage", "epochs", "lr", "wd", "warm-up", "reg.", "schedule"):
        table.add_column(col, no_wrap=col == "recipe")
    for r in recipes:
        for stage in (1, 2):
            s = r.stage(stage)
            name = r.name if stage == 1 else ""
            reg = "on" if s.regularizer else "off"
            table.add_row(name, str(stage), str(s.trained_epochs), f"{s.lr:g}", f"{s.weight_decay:g}", str(s.warmup_epochs), reg, s.schedule, end_section=stage == 2)
    return table


def _run_table(recipes: list[Recipe]) -> Table:
    table = Table(title="per run (decay on: see below; stage 2 starts from the best or last stage-1 checkpoint)")
    for col in ("recipe", "batch", "eval", "decay on", "subsets", "stage 2", "smooth"):
        table.add_column(col, no_wrap=col == "recipe")
    for r in recipes:
        subsets = f"{r.train_subset or 'all'} / {r.test_subset or 'all'}"
        eval_batch = str(r.eval_batch_size or r.batch_size)
        table.add_row(r.name, str(r.batch_size), eval_batch, r.wd_groups, subsets, r.stage2_init, f"{r.label_smoothing:g}")
    return table


def main(args: argparse.Namespace) -> int:
    recipes = preset_recipes()
    if args.json:
        print(json.dumps([r.to_dict() for r in recipes], indent=2))
        return 0
    console = Console()
    console.print(_stage_table(recipes))
    console.print(_run_table(recipes))
    for r in recipes:
        console.print(f"  [bold]{r.name}[/bold]: {r.description} ({r.source})", highlight=False)
    console.print("  'upstream' selects upstream-cifar or upstream-imagenet from the data set's family", highlight=False)
    for name, meaning in SCHEDULES.items():
        console.print(f"  schedule [bold]{name}[/bold]: {meaning}", highlight=False)
    for name, meaning in WD_GROUPS.items():
        console.print(f"  decay on [bold]{name}[/bold]: {meaning}", highlight=False)
    console.print("Override any field: bnnbench run --recipe upstream --epochs 10,5 --lr 0.05,0.005 --wd-groups all ...", highlight=False)
    return 0
