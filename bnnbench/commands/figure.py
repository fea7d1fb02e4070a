"""``bnnbench figure 2|3|4``: the paper's theory figures (2, 3) and the frequency sweep (4) as PNG and PDF."""

from __future__ import annotations

import argparse

from .. import figures

HELP = "draw Fig. 2 (pdf of sin(w0 w)), Fig. 3 (QE vs w0) or Fig. 4 (w0 sweep, needs --sweep CSV)"

STEMS = {2: "fig2_pdf_w_hat", 3: "fig3_qe_vs_w0", 4: "fig4_frequency_sweep"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("number", type=int, choices=sorted(STEMS), help="figure number of the BiPer paper")
    parser.add_argument("--out", default="results/figures", metavar="DIR", help="output folder (default: results/figures)")
    parser.add_argument(
        "--sweep",
        metavar="CSV",
        help="figure 4 only: sweep results, one row per trained model, columns " + ", ".join(figures.SWEEP_COLUMNS),
    )
    parser.add_argument("--samples", type=int, default=200_000, help="sampled Laplace weights per curve/point (figures 2, 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled weights (figures 2, 3)")
    parser.add_argument("--dpi", type=int, default=200, help="resolution of the PNG (default 200)")


def main(args: argparse.Namespace) -> int:
    if args.number == 4:
        if args.sweep is None:
            raise ValueError(
                "figure 4 plots training results: pass --sweep CSV with the columns "
                + ", ".join(figures.SWEEP_COLUMNS)
                + " (one row per trained model, from the BiPer frequency-sweep runs)"
            )
        fig = figures.figure4(figures.read_sweep(args.sweep))
    elif args.sweep is not None:
        raise ValueError(f"--sweep is for figure 4 only; figure {args.number} needs no training results")
    elif args.samples < 1:
        raise ValueError(f"--samples must be positive, got {args.samples}")
    elif args.number == 2:
        fig = figures.figure2(samples=args.samples, seed=args.seed)
    else:
        fig = figures.figure3(samples=args.samples, seed=args.seed)
    for path in figures.save_figure(fig, args.out, STEMS[args.number], dpi=args.dpi):
        print(path)
    return 0
