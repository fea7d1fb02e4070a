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
    stats = parser.add_argument_group("statistics (runs grouped into experiments: the same spec but the seed)")
    stats.add_argument("--stats", action="store_true", help="compare the experiments: mean ± 95%% CI, paired t and McNemar tests (Holm), P(best)")
    stats.add_argument("--reference", metavar="TEXT", help="the experiment the others are compared with: a part of its label (default: the first)")
    stats.add_argument("--value", default="final_test_top1", help="final.json value to compare (default final_test_top1)")
    stats.add_argument("--match", metavar="TEXT", help="only runs whose experiment label contains TEXT")


def main(args: argparse.Namespace) -> int:
    from ..runners.report import export, runs_frame

    runs = args.runs or f"{args.out}/runs"
    if args.stats:
        return show_statistics(runs, args)
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


def show_statistics(runs: str, args: argparse.Namespace) -> int:
    from .. import stats
    from ..runners.catalog import scan_runs
    from ..runners.report import experiment_label, export, statistics_frame

    records = [r for r in scan_runs(runs) if args.match is None or args.match in experiment_label(r)]
    table = statistics_frame(records, reference=args.reference, value=args.value)
    print(f"{len(table)} experiments, reference: {table.attrs['reference']} ({args.value}; * / †: paired t / McNemar, Holm, p < 0.05)")
    for label, line in table.iterrows():
        mark = stats.significance_marker(line["p_t_holm"]) + ("†" if line["p_mcnemar_holm"] < 0.05 else "")
        diff = "reference" if label == table.attrs["reference"] else stats.format_diff(line["diff"], line["diff_low"], line["diff_high"]) + mark
        best = "" if line["p_best"] != line["p_best"] else f"  P(best) {line['p_best']:.2f}"
        print(f"  {stats.format_mean_ci(line['mean'], line['half_width'], int(line['n']), show_n=True):24} {diff:28}{best}  {label}")
    if args.csv:
        for path in export(table.reset_index(), csv=args.csv):
            print(path)
    return 0
