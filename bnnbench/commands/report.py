"""``bnnbench report``: every run under one folder as one table (CSV and/or Parquet) for your own analysis.

One line per run: the flattened configuration (``config.*``, ``model.*``), status,
``final.json``'s summary and per-stage best/last metrics (see ``runners/report.py``).
Without ``--csv``/``--parquet`` it prints a short overview.
"""

from __future__ import annotations

import argparse

from ..runners.report import export, runs_frame

HELP = "gather all runs into one pandas DataFrame and export it (bnnbench report --csv runs.csv)"

OVERVIEW = ["run_id", "status", "config.method", "config.net", "config.data", "config.seed", "config.recipe.name", "final_test_top1"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", default="results/runs", help="folder of run directories (default results/runs)")
    parser.add_argument("--csv", metavar="FILE", help="write the table as CSV")
    parser.add_argument("--parquet", metavar="FILE", help="write the table as Parquet (needs pyarrow)")


def main(args: argparse.Namespace) -> int:
    frame = runs_frame(args.runs)
    if frame.empty:
        print(f"no runs in {args.runs} (runs are written by bnnbench run / bnnbench table)")
    if args.csv or args.parquet:
        for path in export(frame, csv=args.csv, parquet=args.parquet):
            print(path)
    elif not frame.empty:
        shown = [c for c in OVERVIEW if c in frame.columns]
        print(frame[shown].to_string(index=False))
        print(f"{len(frame)} runs, {frame.shape[1]} columns; export them with --csv FILE or --parquet FILE")
    return 0
