"""``bnnbench report``: every run under one folder as one table (CSV and/or Parquet) for your own analysis.

One line per run: the flattened run spec (``spec.*``) and machine (``settings.*``, ``resolved.*``), status,
``final.json``'s summary and per-stage best/last metrics (see ``runners/report.py``).
Without ``--csv``/``--parquet`` it prints a short overview.
"""

from __future__ import annotations

import argparse


HELP = "gather all runs into one pandas DataFrame and export it (bnnbench report --csv runs.csv)"

OVERVIEW = ["run_id", "status", "spec.model.method", "spec.model.act_method", "spec.model.net", "spec.data", "spec.seed", "spec.recipe.name", "final_test_top1"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="results", help="results root: the runs are OUT/runs (default results)")
    parser.add_argument("--runs", help="folder of run directories (default OUT/runs)")
    parser.add_argument("--csv", metavar="FILE", help="write the table as CSV")
    parser.add_argument("--parquet", metavar="FILE", help="write the table as Parquet (needs pyarrow)")


def main(args: argparse.Namespace) -> int:
    from ..runners.report import export, runs_frame

    runs = args.runs or f"{args.out}/runs"
    frame = runs_frame(runs)
    if frame.empty:
        print(f"no runs in {runs} (runs are written by bnnbench run / bnnbench table)")
    if args.csv or args.parquet:
        for path in export(frame, csv=args.csv, parquet=args.parquet):
            print(path)
    elif not frame.empty:
        shown = [c for c in OVERVIEW if c in frame.columns]
        print(frame[shown].to_string(index=False))
        print(f"{len(frame)} runs, {frame.shape[1]} columns; export them with --csv FILE or --parquet FILE")
    return 0
