"""``bnnbench table 1|2|3|4|NAME|SPEC.toml``: train (or reuse) the runs a table needs and write it.

1-4 are the BiPer paper's tables; NAME a spec shipped in ``tables/`` (``comparison-resnet20``:
every method on CIFAR-10 ResNet-20 with its weight diagnostics and training curves); or the
path of your own spec.

Runs are looked up in ``OUT/runs/`` by their resolved configuration; finished
ones are reused, interrupted ones resumed, missing ones trained one after the
other, or ``--jobs N`` at once in worker processes (Ctrl-C keeps every finished
epoch: run the same command again to go on).  ``--jobs auto``: one per CPU core,
or on CUDA as many as the GPU's free memory holds (a probe measures one run's
footprint; ``runners/concurrency.py``).  ``--executor slurm`` submits each run as
a Slurm job through submitit (``submitit-local``: submitit's local subprocesses),
all writing into the same ``OUT/runs``; a lock per run (``OUT/locks``) keeps two
commands sharing a results folder from training one run twice at once.
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
from pathlib import Path
from typing import Any

from ..runners.executors import EXECUTORS
from ..runners.recipes import list_recipes
from ..tables import named_specs
from ._arguments import at_least

DEFAULT_SLURM_MINUTES = 24 * 60

HELP = "regenerate Table 1-4 of the BiPer paper, or a shipped/own table spec, from bnnbench runs (bnnbench table 3 --recipe quick)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("table", help=f"table number (1, 2, 3, 4), a spec shipped with bnnbench ({', '.join(named_specs())}) or the path of a table spec (.toml)")
    parser.add_argument("--recipe", "--budget", dest="recipe", default="quick", help=f"training recipe of every run: {', '.join(list_recipes())} (default quick)")
    parser.add_argument("--seeds", type=at_least(1), default=1, help="seeds per row, 0..N-1 (default 1); cells show mean ± 95%% CI when N > 1")
    parser.add_argument("--data-dir", help="the data set's local copy for new runs (CIFAR-10 folder/.tar, ImageNet folder)")
    parser.add_argument("--out", default="results", help="results root: runs in OUT/runs, tables in OUT/tables (default results)")
    parser.add_argument("--device", help="device of new runs: cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast of new runs (default: on for CUDA and CPUs with bf16 hardware)")
    parser.add_argument("--workers", type=int, default=0, help="data loading worker processes of new runs (default 0)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print which runs would be used, resumed or trained; write nothing")
    mode.add_argument("--no-run", action="store_true", help="only render the table from finished runs (the others show as missing)")
    parser.add_argument("--quiet", action="store_true", help="plain log lines instead of live progress bars")
    parser.add_argument(
        "--jobs",
        type=_jobs,
        help="runs trained at once: N, or auto (CPU: one per core; CUDA: as many as the GPU's free memory holds, measured by a probe). "
        "Local: worker processes, each on its share of the cores (default 1); slurm/submitit-local: jobs queued at once (default all)",
    )
    cluster = parser.add_argument_group("where the runs train")
    cluster.add_argument("--executor", choices=EXECUTORS, default="local", help="local (this machine, default), slurm (one Slurm job per run, through submitit), submitit-local (submitit's local subprocesses)")
    cluster.add_argument("--slurm-partition", help="Slurm partition of the jobs")
    cluster.add_argument("--slurm-time", type=int, metavar="MINUTES", help=f"time limit of each job in minutes (default {DEFAULT_SLURM_MINUTES}); a job that reaches it is requeued and resumes its run")
    cluster.add_argument("--slurm-gpus", type=int, metavar="N", help="GPUs per job (default 1, 0 with --device cpu)")
    cluster.add_argument("--slurm-cpus", type=int, metavar="N", help="CPU cores per job (default: the cluster's)")
    cluster.add_argument("--slurm-option", action="append", type=_key_value, metavar="KEY=VALUE", help="any other sbatch option, e.g. account=abc or qos=high (repeatable)")


def _jobs(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--jobs takes a number or auto, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--jobs must be at least 1, got {value}")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--slurm-option expects KEY=VALUE (e.g. account=abc), got {text!r}")
    return key.strip().replace("-", "_"), value.strip()


def slurm_options_given(args: argparse.Namespace) -> list[str]:
    names = ("slurm_partition", "slurm_time", "slurm_gpus", "slurm_cpus", "slurm_option")
    return [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is not None]


def build_executor(args: argparse.Namespace, out: str) -> Any:
    """The submitit executor of ``--executor slurm|submitit-local`` with its ``--slurm-*`` options."""
    from ..runners.executors import SUBMITIT_CLUSTERS, Submitit

    cluster = SUBMITIT_CLUSTERS[args.executor]
    gpus = args.slurm_gpus if args.slurm_gpus is not None else (0 if args.device == "cpu" else 1)
    parameters: dict[str, Any] = {
        "timeout_min": args.slurm_time or DEFAULT_SLURM_MINUTES,
        "gpus_per_node": gpus,
        "name": "bnnbench",
    }
    if args.slurm_cpus is not None:
        parameters["cpus_per_task"] = args.slurm_cpus
    if args.slurm_partition:
        parameters["slurm_partition"] = args.slurm_partition
    if args.slurm_option:
        parameters["slurm_additional_parameters"] = dict(args.slurm_option)
    max_running = args.jobs if isinstance(args.jobs, int) else None
    return Submitit(cluster, Path(out) / "submitit", parameters, max_running=max_running, poll_s=15.0 if cluster == "slurm" else 1.0)


def main(args: argparse.Namespace) -> int:
    from ..preflight import writable_folder
    from ..runners.experiments import plan
    from ..runners.recipes import get_recipe
    from ..runners.spec import Machine
    from ..runners.tables import describe_plan, load_spec, make_table
    from ..runners.train import RunInterrupted

    spec = load_spec(args.table)
    recipe = get_recipe(args.recipe, spec.family)
    machine = Machine(data_dir=args.data_dir, device=args.device or "auto", amp=args.amp, workers=args.workers, out=args.out)
    if args.executor == "local" and slurm_options_given(args):
        raise ValueError(f"{', '.join(slurm_options_given(args))} apply to --executor slurm or submitit-local, not to local runs")
    if args.dry_run:
        runs = plan(spec.runs, range(args.seeds), recipe, machine)
        for line in describe_plan(spec, runs, args.seeds):
            print(line)
        todo = [job for job in runs.jobs if not job.done]
        print(f"{len(runs.jobs) - len(todo)} of {len(runs.jobs)} runs available; {len(todo)} to train or resume (budget {recipe.name})")
        return 0
    writable_folder(args.out, "--out")
    if args.executor != "local":
        parallel = build_executor(args, args.out)
    elif args.jobs == "auto" and not args.no_run:
        from ..runners.concurrency import auto_jobs

        todo = [job.spec for job in plan(spec.runs, range(args.seeds), recipe, machine).jobs if not job.done]
        parallel = auto_jobs(todo, machine)
    else:
        parallel = args.jobs if isinstance(args.jobs, int) else 1
    try:
        result = make_table(spec, recipe, machine, seeds=args.seeds, train=not args.no_run, quiet=args.quiet, parallel=parallel)
    except RunInterrupted as exc:
        print(f"bnnbench: interrupted ({exc}); finished runs and epochs are kept: run the same command again to go on", file=sys.stderr)
        return 128 + exc.signum
    for path in result.paths:
        print(path)
    if result.stopped:
        print(f"bnnbench: error: some runs could not be made: {result.stopped}", file=sys.stderr)
        return 2
    return 0
