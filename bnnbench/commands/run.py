"""``bnnbench run``: train a method on a backbone and data set with the two-stage protocol.

``bnnbench run`` alone is the offline demo: BiPer on a ResNet-20 over the
bundled digits with the ``quick`` recipe (under a minute on a CPU).  ``--data cifar10`` / ``--data imagenet``
use the ``upstream`` recipe unless ``--recipe`` says otherwise; every recipe
field can be overridden.  Exit status: 0 done, 1 a worker process of
``--nproc`` died, 2 bad input, 3 the loss diverged (NaN/inf), 130/143
interrupted by Ctrl-C/SIGTERM (resume with ``--resume RUN_DIR``).

Several processes (DistributedDataParallel, see ``bnnbench.runners.distributed``):
``--nproc N`` starts N local workers through torch's elastic agent (torchrun's
engine), each running this command; ``torchrun --nproc_per_node N -m bnnbench run ...``
does the same from outside and spans several nodes.  ``--batch-size`` stays the
global batch.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import USER_ERRORS
from ..registry import load_plugin
from ..runners import distributed
from ..runners.display import Display
from ..runners.recipes import STAGE2_INIT, WD_GROUPS, Recipe, get_recipe, list_recipes
from ..io import read_json
from ..runners.results import CONFIG
from ..runners.train import Run, RunInterrupted, TrainConfig, TrainingDiverged, resolve_device

HELP = "train a method with the two-stage protocol (bnnbench run --method biper --net resnet18 --data cifar10)"

DEFAULT_DATA = "digits"
EXIT_WORKER_FAILED = 1
EXIT_DIVERGED = 3

# options that define a run: rejected together with --resume (the saved config rules)
CONFIG_OPTIONS = (
    "method", "net", "data", "data_dir", "recipe", "epochs", "lr", "wd", "warmup", "regularizer", "batch_size",
    "eval_batch_size", "wd_groups", "label_smoothing", "train_subset", "test_subset", "stage2_init", "hp", "skip",
    "act_norm", "real_activations", "stage", "init", "seed", "device", "amp", "channels_last", "compile", "loader",
    "ffcv_dir", "workers", "augment", "skip_bad_images", "download", "sync_bn", "name",
)  # fmt: skip


def _per_stage(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """Parse "V" (both stages) or "V1,V2" (stage 1, stage 2)."""

    def parse(text: str) -> list[Any]:
        parts = text.split(",")
        if len(parts) not in (1, 2):
            raise argparse.ArgumentTypeError(f"expected one value or two comma-separated values (stage 1,stage 2), got {text!r}")
        try:
            values = [kind(p.strip()) for p in parts]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
        return values * 2 if len(values) == 1 else values

    return parse


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise ValueError("use on or off")
    return text == "on"


def _subset(text: str) -> int:
    """A subset size; ``all`` parses to 0 (no subset)."""
    value = 0 if text == "all" else int(text)
    if value < 0:
        raise ValueError("a subset size is a positive number of images or 'all'")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--hp expects key=value (e.g. w0=10), got {text!r}")
    return key.strip(), value.strip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to train")
    what.add_argument("--method", help="binarizer (bnnbench list); default biper")
    what.add_argument(
        "--net", help="backbone: resnet20, resnet18, vgg_small (CIFAR), resnet18, resnet34 (ImageNet); default resnet18 (resnet20 for the digits demo)"
    )
    what.add_argument("--data", help=f"cifar10, imagenet or digits (bundled offline demo, the default: {DEFAULT_DATA})")
    what.add_argument("--data-dir", help="local copy of the data set (image folder, torchvision cifar-10-batches-py or .tar)")
    what.add_argument("--download", action="store_true", default=None, help="cifar10: download torchvision's copy into the cache if none is found")
    what.add_argument("--hp", type=_key_value, action="append", metavar="KEY=VALUE", help="method hyper-parameter, e.g. --hp w0=10 (repeatable)")
    what.add_argument("--skip", choices=("double", "single"), help="CIFAR ResNet skip connections (paper: double, upstream BiPer code: single)")
    what.add_argument("--act-norm", action=argparse.BooleanOptionalAction, default=None, help="activation surrogate on variance-normalised input (default: the method's)")
    what.add_argument("--real-activations", action="store_true", default=None, help="1W/32A: binary weights, real activations (Table 2)")

    protocol = parser.add_argument_group("protocol and recipe (bnnbench recipes)")
    protocol.add_argument("--recipe", help=f"preset: {', '.join(list_recipes())}; default quick for digits, upstream otherwise")
    protocol.add_argument("--stage", choices=("1", "2", "both"), help="which stages to train (default both)")
    protocol.add_argument("--init", metavar="CKPT", help="stage-1 checkpoint that --stage 2 starts from ('scratch': random weights)")
    protocol.add_argument("--epochs", type=_per_stage(int), metavar="E1,E2", help="epochs of stage 1,2 (one value: both)")
    protocol.add_argument("--lr", type=_per_stage(float), metavar="L1,L2", help="peak learning rate of stage 1,2")
    protocol.add_argument("--wd", type=_per_stage(float), metavar="W1,W2", help="weight decay of stage 1,2")
    protocol.add_argument("--warmup", type=_per_stage(int), metavar="N1,N2", help="linear warm-up epochs of stage 1,2")
    protocol.add_argument("--regularizer", type=_per_stage(_on_off), metavar="on|off[,on|off]", help="add the method's extra loss term in stage 1,2")
    protocol.add_argument("--batch-size", type=int, help="training batch size")
    protocol.add_argument("--eval-batch-size", type=int, help="evaluation batch size")
    protocol.add_argument("--wd-groups", choices=tuple(WD_GROUPS), help="which parameters get weight decay")
    protocol.add_argument("--label-smoothing", type=float, help="label smoothing of the cross-entropy (default 0)")
    protocol.add_argument("--train-subset", type=_subset, metavar="N|all", help="train on the first N images of a fixed, seeded, class-balanced subset")
    protocol.add_argument("--test-subset", type=_subset, metavar="M|all", help="evaluate on the first M images of such a subset")
    protocol.add_argument("--stage2-init", choices=STAGE2_INIT, help="stage-1 checkpoint stage 2 starts from (best test top-1 or last epoch)")

    machine = parser.add_argument_group("machine")
    machine.add_argument("--seed", type=int, help="random seed (default 0); same seed on CPU -> identical metrics")
    machine.add_argument("--device", help="cpu, cuda, cuda:1 or auto (default)")
    machine.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on for CUDA)")
    machine.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="channels_last memory format (default: on for CUDA)")
    machine.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="run the model through torch.compile (off by default: it does not pay on CPU, since every epoch recompiles; see bnnbench.runners.train)",
    )
    machine.add_argument("--loader", choices=("auto", "torch", "ffcv"), help="data loader (auto: FFCV when .beton files exist)")
    machine.add_argument("--ffcv-dir", help="folder with the .beton files written by bnnbench prepare")
    machine.add_argument("--workers", type=int, help="data loading worker processes (default 0)")
    machine.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None, help="training augmentation (default on; digits never augments)")
    machine.add_argument("--skip-bad-images", action="store_true", default=None, help="skip undecodable images (counted in config.json) instead of stopping")
    machine.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train on N local processes with DistributedDataParallel (one per GPU on CUDA: NCCL; gloo on CPU); "
        "--batch-size stays the global batch. Several nodes: torchrun ... -m bnnbench run (README)",
    )
    machine.add_argument("--sync-bn", action="store_true", default=None, help="with several processes: SyncBatchNorm (batch statistics over the global batch; CUDA only)")

    output = parser.add_argument_group("output")
    output.add_argument("--out", default="results", help="results root; runs go to OUT/runs/<run-id>/ (default results)")
    output.add_argument("--name", help="run id instead of net-method-data-seed-timestamp-hash")
    output.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its latest checkpoint")
    output.add_argument("--quiet", action="store_true", help="plain log lines instead of live progress bars")


def resolve_recipe(args: argparse.Namespace, family: str) -> Recipe:
    """The preset named by ``--recipe`` (or the default) with the command line's overrides applied."""
    data = args.data or DEFAULT_DATA
    recipe = get_recipe(args.recipe or ("quick" if data == "digits" else "upstream"), family)
    per_stage = {"epochs": "epochs", "lr": "lr", "wd": "weight_decay", "warmup": "warmup_epochs", "regularizer": "regularizer"}
    for option, field in per_stage.items():
        values = getattr(args, option)
        if values is not None:
            setattr(recipe.stage1, field, values[0])
            setattr(recipe.stage2, field, values[1])
    for option in ("batch_size", "eval_batch_size", "wd_groups", "label_smoothing", "train_subset", "test_subset", "stage2_init"):
        value = getattr(args, option)
        if value is not None:
            setattr(recipe, option, value or None if option.endswith("_subset") else value)
    return recipe


def _absolute(path: str | None) -> str | None:
    """Paths are saved absolute, so that --resume works from any working directory."""
    return None if path is None else str(Path(path).expanduser().resolve())


def build_config(args: argparse.Namespace) -> TrainConfig:
    data = args.data or DEFAULT_DATA
    family = "imagenet" if data == "imagenet" else "cifar"
    stages = {"1": [1], "2": [2], "both": [1, 2], None: [1, 2]}[args.stage]
    return TrainConfig(
        method=args.method or "biper",
        net=args.net or ("resnet20" if data == "digits" else "resnet18"),
        data=data,
        data_dir=_absolute(args.data_dir),
        recipe=resolve_recipe(args, family),
        hparams=dict(args.hp or []),
        stages=stages,
        init=args.init if args.init in (None, "scratch") else _absolute(args.init),
        seed=0 if args.seed is None else args.seed,
        device=args.device or "auto",
        amp=args.amp,
        channels_last=args.channels_last,
        compile=bool(args.compile),
        loader=args.loader or "auto",
        ffcv_dir=_absolute(args.ffcv_dir),
        workers=args.workers or 0,
        augment=True if args.augment is None else args.augment,
        skip_bad_images=bool(args.skip_bad_images),
        download=bool(args.download),
        net_options={"skip": args.skip} if args.skip else {},
        act_norm=args.act_norm,
        real_activations=bool(args.real_activations),
        sync_bn=bool(args.sync_bn),
        out=args.out,
        name=args.name,
    )


def check_resume_options(args: argparse.Namespace) -> None:
    given = [f"--{o.replace('_', '-')}" for o in CONFIG_OPTIONS if getattr(args, o) is not None]
    if given:
        raise ValueError(f"--resume continues a run with its saved config.json; drop {', '.join(given)}")


def resume_command(path: Path, processes: int) -> str:
    return f"bnnbench run --resume {path}" + (f" --nproc {processes}" if processes > 1 else "")


def main(args: argparse.Namespace) -> int:
    if args.nproc is not None and args.nproc != 1:
        return launch(args)
    display = Display(quiet=args.quiet)
    if args.resume:
        check_resume_options(args)
        run = Run.resume(args.resume, display=display)
    else:
        run = Run(build_config(args), display=display)
    processes = distributed.world_size()  # read before execute() leaves the process group
    try:
        run.execute()
    except TrainingDiverged as exc:
        if run.writes:  # every rank stops on the same step; rank 0 speaks for them
            print(f"bnnbench: training diverged: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except (KeyboardInterrupt, RunInterrupted) as exc:
        signum = exc.signum if isinstance(exc, RunInterrupted) else signal.SIGINT
        if run.writes:
            saved = any(run.path.glob("stage*_last.pt"))
            where = f"finished epochs are saved; continue with: {resume_command(run.path, processes)}" if saved else "no epoch had finished, nothing was kept"
            print(f"bnnbench: interrupted ({signal.Signals(signum).name}); {where}", file=sys.stderr)
        return 128 + int(signum)
    return 0


# ======================================================================== --nproc
def launch(args: argparse.Namespace) -> int:
    """``--nproc N``: N local processes started by torch's elastic agent (torchrun's engine), each
    running this command as a rank of one DistributedDataParallel job; returns the first non-zero
    worker status, or 1 with the reason when a worker died or raised."""
    nproc = args.nproc
    if distributed.launched_by_torchrun():
        raise ValueError("--nproc starts its own processes; under torchrun drop --nproc (torchrun's --nproc_per_node sets the count)")
    # the errors every worker would hit, once and before anything starts
    if args.resume:
        check_resume_options(args)
        if not (Path(args.resume) / CONFIG).is_file():
            raise FileNotFoundError(f"{args.resume!r} is not a run directory (no {CONFIG}); pass the directory printed when the run started")
        cfg = TrainConfig.from_dict(read_json(Path(args.resume) / CONFIG)["config"])
    else:
        cfg = build_config(args)
        cfg.validate()
    device = resolve_device(cfg.device)
    distributed.check_processes(cfg.recipe.batch_size, cfg.sync_bn, device, nproc)
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {nproc} needs one GPU per process, but {torch.cuda.device_count()} are visible")

    try:
        statuses = distributed.launch_local(_worker, (argparse.Namespace(**{**vars(args), "nproc": None}),), nproc)
    except distributed.WorkersFailed as exc:
        if args.resume:
            run_dir = str(args.resume)
        elif args.name:
            run_dir = str(Path(args.out) / "runs" / args.name)
        else:
            run_dir = "RUN_DIR"
        where = "" if run_dir != "RUN_DIR" else " (RUN_DIR: the 'run directory' rank 0 printed above)"
        print(
            f"bnnbench: distributed training failed: {exc}. Finished epochs are kept; continue with: "
            f"{resume_command(Path(run_dir), nproc)}{where}",
            file=sys.stderr,
        )
        return EXIT_WORKER_FAILED
    except distributed.LaunchInterrupted as exc:
        return 128 + exc.signum  # rank 0 has said where the finished epochs are
    return next((status for status in statuses if status), 0)


def _worker(args: argparse.Namespace) -> int:
    """One process of ``--nproc``: this command under the torchrun environment the agent set."""
    for path in getattr(args, "plugin", []):  # methods registered by plugins, in this process too
        load_plugin(path)
    try:
        return main(args)
    except USER_ERRORS as exc:
        print(f"bnnbench: error (rank {os.environ.get('RANK')}): {exc}", file=sys.stderr)
        return 2
