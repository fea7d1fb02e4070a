"""``bnnbench figure 2|3|4``: the paper's theory figures (2, 3) and the frequency sweep (4) as PNG and PDF.

Figures go to ``OUT/figures`` (``OUT`` is the results root, default ``results``; ``--figures-dir``
names another folder).  Figure 4 needs trained BiPer models, one per frequency w0: ``--recipe``
matches (or trains, as ``bnnbench table`` does) a two-stage BiPer run per w0 and seed under
``OUT/runs`` and writes the sweep table it plots as ``fig4_frequency_sweep.csv`` beside the
figure; ``--sweep CSV`` plots such a table instead.  (Until 2026-12 ``--out`` named the figures
folder and ``--results`` the results root; ``--results`` remains an alias of ``--out``.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..runners.defaults import DEFAULT_SWEEP_NET, DEFAULT_W0
from ..runners.recipes import list_recipes

if TYPE_CHECKING:
    import pandas as pd

HELP = "draw Fig. 2 (pdf of sin(w0 w)), Fig. 3 (QE vs w0) or Fig. 4 (w0 sweep: --recipe quick trains it, or --sweep CSV)"

STEMS = {2: "fig2_pdf_w_hat", 3: "fig3_qe_vs_w0", 4: "fig4_frequency_sweep"}
SWEEP_OPTIONS = ("recipe", "w0", "net", "seeds", "data_dir", "device", "no_run")


def _w0_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--w0 expects comma-separated numbers such as 5,10,20, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("--w0 needs at least one value")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("number", type=int, choices=sorted(STEMS), help="figure number of the BiPer paper")
    parser.add_argument("--out", "--results", dest="out", default="results", help="results root: figures go to OUT/figures, runs are OUT/runs (default results)")
    parser.add_argument("--figures-dir", metavar="DIR", help="write the figures here instead of OUT/figures")
    parser.add_argument("--samples", type=int, default=200_000, help="sampled Laplace weights per curve/point (figures 2, 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled weights (figures 2, 3)")
    parser.add_argument("--dpi", type=int, default=200, help="resolution of the PNG (default 200)")
    sweep = parser.add_argument_group("figure 4 (frequency sweep)")
    sweep.add_argument("--sweep", metavar="CSV", help="plot this sweep table (a fig4_frequency_sweep.csv written by this command)")
    sweep.add_argument("--recipe", "--budget", dest="recipe", help=f"train or reuse the sweep's runs with this recipe: {', '.join(list_recipes())}")
    sweep.add_argument("--w0", type=_w0_list, help=f"frequencies, comma-separated (default {','.join(f'{w:g}' for w in DEFAULT_W0)})")
    sweep.add_argument("--net", help=f"CIFAR backbone of the sweep (default {DEFAULT_SWEEP_NET}; the paper does not name it)")
    sweep.add_argument("--seeds", type=int, help="seeds per w0, 0..N-1 (default 1)")
    sweep.add_argument("--data-dir", help="CIFAR-10 copy for new runs (default: found in the cache)")
    sweep.add_argument("--device", help="device of new runs (default auto)")
    sweep.add_argument("--no-run", action="store_true", default=None, help="plot only the finished runs; train nothing")
    sweep.add_argument("--quiet", action="store_true", help="plain log lines instead of live progress bars while training")
    sweep.add_argument("--jobs", type=int, default=1, help="runs trained at once in worker processes (default 1)")


def _sweep_table(args: argparse.Namespace, folder: Path) -> tuple[pd.DataFrame, str | None]:
    """The Figure 4 table (read from --sweep, or from the matched/trained runs of --recipe) and,
    when some runs could not be made, why."""
    from .. import figures
    from ..io import write_text
    from ..runners.experiments import execute, plan
    from ..runners.recipes import get_recipe
    from ..runners.spec import Machine
    from ..runners.sweep import sweep_frame, sweep_runs

    if args.sweep is not None:
        given = [f"--{o.replace('_', '-')}" for o in SWEEP_OPTIONS if getattr(args, o) is not None]
        if given:
            raise ValueError(f"--sweep plots a finished table; drop {', '.join(given)} (they select runs to train)")
        return figures.read_sweep(args.sweep), None
    if args.recipe is None:
        raise ValueError(
            "figure 4 plots training results: pass --sweep CSV with the columns "
            + ", ".join(figures.SWEEP_COLUMNS)
            + " (one row per trained model), or --recipe quick|short|paper to train (or reuse) one BiPer run per w0"
        )
    seeds = list(range(1 if args.seeds is None else args.seeds))
    if not seeds:
        raise ValueError("--seeds must be at least 1")
    templates = sweep_runs(args.w0 or DEFAULT_W0, args.net or DEFAULT_SWEEP_NET)
    recipe = get_recipe(args.recipe, "cifar")
    machine = Machine(data_dir=args.data_dir, device=args.device or "auto", out=args.out)
    runs = plan(templates, seeds, recipe, machine)
    stopped = None if args.no_run else execute(runs.jobs, quiet=args.quiet, parallel=args.jobs).stopped
    sweep = sweep_frame(templates, runs, seeds)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / f"{STEMS[4]}.csv", sweep.to_csv(index=False))
    print(folder / f"{STEMS[4]}.csv")
    if sweep.empty:
        why = stopped or "run without --no-run to train them"
        raise ValueError(f"no finished sweep runs under {args.out}/runs for recipe {recipe.name}: {why}")
    return sweep, stopped


def main(args: argparse.Namespace) -> int:
    from .. import figures
    from ..runners.train import RunInterrupted

    folder = Path(args.figures_dir) if args.figures_dir else Path(args.out) / "figures"
    stopped = None
    if args.number == 4:
        try:
            sweep, stopped = _sweep_table(args, folder)
        except RunInterrupted as exc:
            print(f"bnnbench: interrupted ({exc}); finished runs and epochs are kept: run the same command again to go on", file=sys.stderr)
            return 128 + exc.signum
        fig = figures.figure4(sweep)
    elif args.sweep is not None or args.recipe is not None:
        raise ValueError(f"--sweep and --recipe are for figure 4 only; figure {args.number} needs no training results")
    elif args.samples < 1:
        raise ValueError(f"--samples must be positive, got {args.samples}")
    elif args.number == 2:
        fig = figures.figure2(samples=args.samples, seed=args.seed)
    else:
        fig = figures.figure3(samples=args.samples, seed=args.seed)
    for path in figures.save_figure(fig, folder, STEMS[args.number], dpi=args.dpi):
        print(path)
    if stopped:
        print(f"bnnbench: error: some sweep runs could not be made (the figure shows the others): {stopped}", file=sys.stderr)
        return 2
    return 0
