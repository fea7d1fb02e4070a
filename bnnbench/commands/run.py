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
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # the heavy modules are imported when the command runs, not for --help
    from ..runners.recipes import Recipe
    from ..runners.rundir import RunDirectory
    from ..runners.spec import Machine, RunSpec

HELP = "train a method with the two-stage protocol (bnnbench run --method biper --net resnet18 --data cifar10)"

EXIT_WORKER_FAILED = 1
EXIT_DIVERGED = 3

# options that define a run: rejected together with --resume (the saved config rules)
SPEC_OPTIONS = (
    "method", "net", "data", "recipe", "epochs", "lr", "wd", "warmup", "regularizer", "schedule", "batch_size", "eval_batch_size",
    "wd_groups", "label_smoothing", "train_subset", "test_subset", "stage2_init", "hp", "act_method",
    "act_hp", "skip", "act_norm", "real_activations", "stage", "init", "seed", "augment", "teacher",
)  # fmt: skip
MACHINE_OPTIONS = (
    "data_dir", "device", "amp", "bf16_formulas", "fp32_formulas", "channels_last", "compile", "threads", "loader", "ffcv_dir", "workers", "skip_bad_images",
    "download", "sync_bn", "name", "tensorboard", "out",
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


ALL = "all"  # --train-subset all / --test-subset all: the whole split


def _subset(text: str) -> int | str:
    """A subset size (a positive number of images) or ``all``."""
    if text == ALL:
        return ALL
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a subset size is a positive number of images, or 'all' for the whole split; got {text!r}")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--hp expects key=value (e.g. w0=10), got {text!r}")
    return key.strip(), value.strip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..runners.recipes import STAGE2_INIT, WD_GROUPS, list_recipes
    from ..runners.defaults import DEFAULT_DATA, DEFAULT_NETS

    what = parser.add_argument_group("what to train (the run's identity)")
    what.add_argument("--method", help="binarizer (bnnbench list): its weight half, and its activation half unless --act-method; default biper")
    what.add_argument("--act-method", metavar="NAME", help="binarize the activations with this method's activation half (fp: real activations)")
    nets = ", ".join(f"{net} for {data}" for data, net in DEFAULT_NETS.items())
    what.add_argument("--net", help=f"backbone: resnet20, resnet18, vgg_small (CIFAR), resnet18, resnet34 (ImageNet); default {nets}")
    what.add_argument("--data", help=f"cifar10, imagenet or digits (bundled offline demo, the default: {DEFAULT_DATA})")
    what.add_argument("--hp", type=_key_value, action="append", metavar="KEY=VALUE", help="hyper-parameter of --method, e.g. --hp w0=10 (repeatable)")
    what.add_argument("--act-hp", type=_key_value, action="append", metavar="KEY=VALUE", help="hyper-parameter of --act-method (repeatable)")
    what.add_argument("--skip", choices=("double", "single"), help="CIFAR ResNet skip connections (paper: double, upstream BiPer code: single)")
    what.add_argument("--act-norm", action=argparse.BooleanOptionalAction, default=None, help="activation surrogate on variance-normalised input (default: the activation method's)")
    what.add_argument("--real-activations", action="store_true", default=None, help="1W/32A: binary weights, real activations (Table 2); same as --act-method fp")
    what.add_argument("--seed", type=int, help="random seed (default 0): initial weights, data order and augmentation")
    what.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None, help="training augmentation (default on; digits never augments)")
    what.add_argument(
        "--teacher",
        metavar="RUN_DIR",
        help="a method with a teacher (lcr-irnet, lcr-rbnn): the finished fp run of the same backbone and data to train against "
        "(default: the fp run of this recipe and seed, found in OUT/runs or trained first)",
    )

    protocol = parser.add_argument_group("protocol and recipe (bnnbench recipes)")
    protocol.add_argument("--recipe", "--budget", dest="recipe", help=f"preset: {', '.join(list_recipes())}; default quick for digits, upstream otherwise")
    protocol.add_argument("--stage", choices=("1", "2", "both"), help="which stages to train (default both)")
    protocol.add_argument("--init", metavar="CKPT", help="stage-1 checkpoint that --stage 2 starts from ('scratch': random weights)")
    protocol.add_argument("--epochs", type=_per_stage(int), metavar="E1,E2", help="epochs of stage 1,2 (one value: both)")
    protocol.add_argument("--lr", type=_per_stage(float), metavar="L1,L2", help="peak learning rate of stage 1,2")
    protocol.add_argument("--wd", type=_per_stage(float), metavar="W1,W2", help="weight decay of stage 1,2")
    protocol.add_argument("--warmup", type=_per_stage(int), metavar="N1,N2", help="linear warm-up epochs of stage 1,2")
    protocol.add_argument("--regularizer", type=_per_stage(_on_off), metavar="on|off[,on|off]", help="add the method's extra loss term in stage 1,2")
    protocol.add_argument("--schedule", type=_per_stage(str), metavar="S1,S2", help="per-stage lr schedule: warmup-cosine (bnnbench) or biper-official (bnnbench recipes)")
    protocol.add_argument("--batch-size", type=int, help="training batch size (global)")
    protocol.add_argument("--eval-batch-size", type=int, help="evaluation batch size (global)")
    protocol.add_argument("--wd-groups", choices=tuple(WD_GROUPS), help="which parameters get weight decay")
    protocol.add_argument("--label-smoothing", type=float, help="label smoothing of the cross-entropy (default 0)")
    protocol.add_argument("--train-subset", type=_subset, metavar="N|all", help="train on the first N images of a fixed, seeded, class-balanced subset")
    protocol.add_argument("--test-subset", type=_subset, metavar="M|all", help="evaluate on the first M images of such a subset")
    protocol.add_argument("--stage2-init", choices=STAGE2_INIT, help="stage-1 checkpoint stage 2 starts from (best test top-1 or last epoch)")

    machine = parser.add_argument_group("machine (never part of a run's identity)")
    machine.add_argument("--data-dir", help="local copy of the data set (image folder, torchvision cifar-10-batches-py or .tar)")
    machine.add_argument("--download", action="store_true", default=None, help="cifar10: download torchvision's copy into the cache if none is found")
    machine.add_argument("--device", help="cpu, cuda, cuda:1 or auto (default)")
    machine.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on for CUDA and for CPUs with AVX512-BF16/AMX)")
    machine.add_argument(
        "--bf16-formulas",
        metavar="fused|torch",
        help="under bf16: act_norm, a learned alpha, RAD's moments and DSQ's soft quantizer in float32 kernels, rounded once "
        "(fused, the default), or torch's eager formulas bit for bit (torch: the numbers of runs before 2026-12-02)",
    )
    machine.add_argument(
        "--fp32-formulas",
        metavar="torch|fused",
        help="in fp32: torch's formulas bit for bit (torch, the default: the reference numbers), or fused: act_norm in "
        "float32 sweeps, a learned alpha folded into the conv's backward, RAD's, DSQ's, FDA's, SwishSign's, ReSTE's and "
        "IR-Net's own formulas in one pass (the forward bit for bit, gradients within float32's rounding; faster)",
    )
    machine.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="channels_last memory format (default: on for CUDA, and on CPUs with bf16 hardware under bf16 autocast where every binary layer's kernels take it)")
    machine.add_argument("--compile", action="store_true", default=None, help="run the model through torch.compile (off by default; see the README's performance section)")
    machine.add_argument("--threads", type=int, help="torch threads (default: torch's, all cores)")
    machine.add_argument(
        "--loader",
        choices=("auto", "torch", "gpu", "ffcv"),
        help="data loader: gpu (CIFAR-10/digits held on the device, batches built there), torch (batches built on the host), "
        "ffcv (.beton files); auto: gpu for CIFAR-10/digits on CUDA, else FFCV when .beton files exist, else torch",
    )
    machine.add_argument("--ffcv-dir", help="folder with the .beton files written by bnnbench prepare")
    machine.add_argument("--workers", type=int, help="data loading worker processes (default 0)")
    machine.add_argument("--skip-bad-images", action="store_true", default=None, help="skip undecodable images (counted in config.json) instead of stopping")
    machine.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train on N local processes with DistributedDataParallel (one per GPU on CUDA: NCCL; gloo on CPU); "
        "--batch-size stays the global batch. Several nodes: torchrun ... -m bnnbench run (README)",
    )
    machine.add_argument("--sync-bn", action="store_true", default=None, help="with several processes: SyncBatchNorm (batch statistics over the global batch; CUDA only)")
    machine.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None, help="TensorBoard event files in the run directory (default on where tensorboard is installed)")

    output = parser.add_argument_group("output")
    output.add_argument("--out", help="results root; runs go to OUT/runs/<run-id>/ (default results)")
    output.add_argument("--name", help="run id instead of net-method-data-seed-timestamp-hash")
    output.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its latest checkpoint")
    output.add_argument("--quiet", action="store_true", help="plain log lines instead of live progress bars")


def resolve_recipe(args: argparse.Namespace, data: str, family: str) -> Recipe:
    """The preset named by ``--recipe`` (or the data set's default) with the command line's overrides applied."""
    from ..runners.defaults import default_recipe
    from ..runners.recipes import get_recipe

    recipe = get_recipe(args.recipe or default_recipe(data), family)
    per_stage = {"epochs": "epochs", "lr": "lr", "wd": "weight_decay", "warmup": "warmup_epochs", "regularizer": "regularizer", "schedule": "schedule"}
    for option, field in per_stage.items():
        values = getattr(args, option)
        if values is not None:
            setattr(recipe.stage1, field, values[0])
            setattr(recipe.stage2, field, values[1])
    for option in ("batch_size", "eval_batch_size", "wd_groups", "label_smoothing", "train_subset", "test_subset", "stage2_init"):
        value = getattr(args, option)
        if value is not None:
            setattr(recipe, option, None if value == ALL else value)
    return recipe


def _absolute(path: str | None) -> str | None:
    """Paths are saved absolute, so that --resume works from any working directory."""
    return None if path is None else str(Path(path).expanduser().resolve())


def build_spec(args: argparse.Namespace) -> RunSpec:
    """The run the command line describes; what it leaves out takes the dataclasses' defaults."""
    from ..data import DATASETS
    from ..runners.defaults import DEFAULT_DATA
    from ..runners.spec import RunSpec

    data = args.data or DEFAULT_DATA
    if data not in DATASETS:
        raise ValueError(f"unknown data set {data!r}; valid: {', '.join(DATASETS)}")
    model: dict[str, Any] = {"hparams": dict(args.hp or []), "act_hparams": dict(args.act_hp or []), "act_norm": args.act_norm}
    if args.method:
        model["method"] = args.method
    if args.net:
        model["net"] = args.net
    if args.real_activations:
        if args.act_method not in (None, "fp"):
            raise ValueError(f"--real-activations means --act-method fp; drop one of --real-activations and --act-method {args.act_method}")
        model["act_method"] = "fp"
    elif args.act_method:
        model["act_method"] = args.act_method
    if args.skip:
        model["options"] = {"skip": args.skip}
    run: dict[str, Any] = {"stages": {"1": (1,), "2": (2,), "both": (1, 2), None: (1, 2)}[args.stage]}
    if args.init is not None:
        run["init"] = args.init if args.init == "scratch" else _absolute(args.init)
    if args.seed is not None:
        run["seed"] = args.seed
    if args.augment is not None:
        run["augment"] = args.augment
    if args.teacher is not None:
        from ..runners.catalog import read_run

        teacher = read_run(args.teacher).spec
        if teacher is None:
            raise ValueError(f"--teacher {args.teacher}: its config.json names something unknown here (a plugin method?)")
        run["teacher"] = teacher
    return RunSpec.make(data, recipe=resolve_recipe(args, data, DATASETS[data].family), **run, **model)


def build_machine(args: argparse.Namespace) -> Machine:
    """Where and how to run; options not given keep :class:`Machine`'s defaults."""
    from ..runners.spec import Machine

    given = {name: getattr(args, name) for name in MACHINE_OPTIONS if getattr(args, name) is not None}
    for path in ("data_dir", "ffcv_dir"):
        if path in given:
            given[path] = _absolute(given[path])
    if args.teacher is not None:
        given["teacher_dir"] = _absolute(args.teacher)
    return Machine(**given)


def check_resume_options(args: argparse.Namespace) -> None:
    given = [f"--{o.replace('_', '-')}" for o in (*SPEC_OPTIONS, *MACHINE_OPTIONS) if getattr(args, o) is not None]
    if given:
        raise ValueError(f"--resume continues a run with its saved config.json; drop {', '.join(given)}")


def open_run(path: str) -> RunDirectory:
    """The run directory ``--resume`` names, checked writable; a method no longer registered hints at --plugin."""
    from ..errors import UnknownMethodError
    from ..preflight import writable_folder
    from ..runners.rundir import RunDirectory

    try:
        directory = RunDirectory.open(path)
    except UnknownMethodError as exc:
        raise UnknownMethodError(
            f"{exc}. The run {path} was trained with it: if a plugin file defines it, "
            f"resume with: bnnbench --plugin FILE.py run --resume {path}"
        ) from None
    writable_folder(path, "--resume")
    return directory


def resume_command(path: Path, processes: int) -> str:
    return f"bnnbench run --resume {path}" + (f" --nproc {processes}" if processes > 1 else "")


def main(args: argparse.Namespace) -> int:
    if args.nproc is not None and args.nproc != 1:
        return launch(args)
    import signal

    from ..errors import PathError
    from ..preflight import environment_problem, writable_folder
    from ..runners import distributed
    from ..runners.display import Display
    from ..runners.rundir import RunDirectory
    from ..runners.train import RunInterrupted, TrainingDiverged, train

    display = Display(quiet=args.quiet)
    if args.resume:
        check_resume_options(args)
        machine = open_run(args.resume).machine
    else:
        spec, machine = build_spec(args), build_machine(args)
        writable_folder(machine.out, "--out")
        if spec.teacher_spec is not None and machine.teacher_dir is None and not distributed.launched_by_torchrun():
            from ..runners.experiments import Task, run_task

            display.log(f"teacher: {spec.teacher_spec.describe()} (found in {machine.run_root()} or trained first)")
            made = run_task(Task(spec.teacher_spec, machine, quiet=args.quiet, teacher=True))
            if made.diverged:
                print(f"bnnbench: the teacher run diverged: {made.diverged}", file=sys.stderr)
                return EXIT_DIVERGED
    with distributed.process_group(machine.resolve_device()):
        directory = open_run(args.resume) if args.resume else RunDirectory.new(spec, machine)
        processes = distributed.world_size()
        try:
            train(directory, display=display)
        except OSError as exc:
            problem = environment_problem(exc)
            if problem is None:
                raise
            kept = f"finished epochs are saved; continue with: {resume_command(directory.path, processes)}"
            raise PathError(f"{problem}. {kept if directory.has_checkpoint() else 'No epoch had finished'}") from None
        except TrainingDiverged as exc:
            if directory.writes:  # every rank stops on the same step; rank 0 speaks for them
                print(f"bnnbench: training diverged: {exc}", file=sys.stderr)
            return EXIT_DIVERGED
        except (KeyboardInterrupt, RunInterrupted) as exc:
            signum = exc.signum if isinstance(exc, RunInterrupted) else signal.SIGINT
            if directory.writes:
                saved = directory.has_checkpoint()
                where = f"finished epochs are saved; continue with: {resume_command(directory.path, processes)}" if saved else "no epoch had finished, nothing was kept"
                print(f"bnnbench: interrupted ({signal.Signals(signum).name}); {where}", file=sys.stderr)
            return 128 + int(signum)
    return 0


# ======================================================================== --nproc
def launch(args: argparse.Namespace) -> int:
    """``--nproc N``: N local processes started by torch's elastic agent (torchrun's engine), each
    running this command as a rank of one DistributedDataParallel job; returns the first non-zero
    worker status, or 1 with the reason when a worker died or raised."""
    import torch

    from ..runners import distributed

    nproc = args.nproc
    if distributed.launched_by_torchrun():
        raise ValueError("--nproc starts its own processes; under torchrun drop --nproc (torchrun's --nproc_per_node sets the count)")
    # the errors every worker would hit, once and before anything starts
    if args.resume:
        check_resume_options(args)
        opened = open_run(args.resume)
        spec, machine = opened.spec, opened.machine
    else:
        spec, machine = build_spec(args), build_machine(args)
    device = machine.resolve_device()
    distributed.check_processes(spec.recipe.batch_size, machine.sync_bn, device, nproc)
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {nproc} needs one GPU per process, but {torch.cuda.device_count()} are visible")

    try:
        statuses = distributed.launch_local(_worker, (argparse.Namespace(**{**vars(args), "nproc": None}),), nproc)
    except distributed.WorkersFailed as exc:
        if args.resume:
            run_dir = str(args.resume)
        elif machine.name:
            run_dir = str(machine.run_root() / machine.name)
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
    from ..errors import USER_ERRORS
    from ..registry import load_plugin

    for path in getattr(args, "plugin", []):  # methods registered by plugins, in this process too
        load_plugin(path)
    try:
        return main(args)
    except USER_ERRORS as exc:
        print(f"bnnbench: error (rank {os.environ.get('RANK')}): {exc}", file=sys.stderr)
        return 2
