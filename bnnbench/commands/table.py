"""``bnnbench table 1|2|3|4|NAME|SPEC.toml``: train (or reuse) the runs a table needs and write it.

1-4 are the BiPer paper's tables; NAME a spec shipped in ``tables/`` (``comparison-resnet20``:
every method on CIFAR-10 ResNet-20 with its weight diagnostics and training curves); or the
path of your own spec.

Runs are looked up in ``OUT/runs/`` by their resolved configuration; finished
ones are reused, interrupted ones resumed, missing ones trained one after the
other, or ``--jobs N`` at once in worker processes (Ctrl-C keeps every finished
epoch: run the same command again to go on).
The table goes to ``OUT/tables/<stem>.md``, ``.tex`` (booktabs) and ``.csv``
(per seed, with the run id of each number; the stem is ``tableN`` or the spec's ``name``),
and a spec's ``curves`` to ``OUT/figures/<stem>_curves.png`` / ``.pdf``.

Exit status: 0 when every run it could make was made (diverged or failed runs
show as such); 2 on bad input (nothing written) or data not found (the table is
written, its missing runs marked); 128 + the signal number when interrupted.
"""

from __future__ import annotations

import argparse
import sys

from ..runners.recipes import list_recipes
from ..tables import named_specs

HELP = "regenerate Table 1-4 of the BiPer paper, or a shipped/own table spec, from bnnbench runs (bnnbench table 3 --recipe quick)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("table", help=f"table number (1, 2, 3, 4), a spec shipped with bnnbench ({', '.join(named_specs())}) or the path of a table spec (.toml)")
    parser.add_argument("--recipe", "--budget", dest="recipe", default="quick", help=f"training recipe of every run: {', '.join(list_recipes())} (default quick)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per row, 0..N-1 (default 1); cells show mean ± 95%% CI when N > 1")
    parser.add_argument("--data-dir", help="the data set's local copy for new runs (CIFAR-10 folder/.tar, ImageNet folder)")
    parser.add_argument("--out", default="results", help="results root: runs in OUT/runs, tables in OUT/tables (default results)")
    parser.add_argument("--device", help="device of new runs: cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast of new runs (default: on for CUDA and CPUs with bf16 hardware)")
    parser.add_argument("--workers", type=int, default=0, help="data loading worker processes of new runs (default 0)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print which runs would be used, resumed or trained; write nothing")
    mode.add_argument("--no-run", action="store_true", help="only render the table from finished runs (the others show as missing)")
    parser.add_argument("--quiet", action="store_true", help="plain log lines instead of live progress bars")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once in worker processes, each on cores/JOBS threads (default 1)")


def main(args: argparse.Namespace) -> int:
    from ..runners.experiments import plan
    from ..runners.recipes import get_recipe
    from ..runners.spec import Machine
    from ..runners.tables import describe_plan, load_spec, make_table
    from ..runners.train import RunInterrupted

    spec = load_spec(args.table)
    recipe = get_recipe(args.recipe, spec.family)
    machine = Machine(data_dir=args.data_dir, device=args.device or "auto", amp=args.amp, workers=args.workers, out=args.out)
    if args.dry_run:
        runs = plan(spec.runs, range(args.seeds), recipe, machine)
        for line in describe_plan(spec, runs, args.seeds):
            print(line)
        todo = [job for job in runs.jobs if not job.done]
        print(f"{len(runs.jobs) - len(todo)} of {len(runs.jobs)} runs available; {len(todo)} to train or resume (budget {recipe.name})")
        return 0
    try:
        result = make_table(spec, recipe, machine, seeds=args.seeds, train=not args.no_run, quiet=args.quiet, parallel=args.jobs)
    except RunInterrupted as exc:
        print(f"bnnbench: interrupted ({exc}); finished runs and epochs are kept: run the same command again to go on", file=sys.stderr)
        return 128 + exc.signum
    for path in result.paths:
        print(path)
    if result.stopped:
        print(f"bnnbench: error: some runs could not be made: {result.stopped}", file=sys.stderr)
        return 2
    return 0
