"""What a run *is* (:class:`RunSpec`) and where and how it runs (:class:`Machine`).

``RunSpec`` = the model (:class:`~bnnbench.models.ModelSpec`: network, weight and activation
binarizers with their hyper-parameters, act_norm, backbone options) + the data set + the
recipe + seed, stages, the stage-2 initialisation and augmentation, and for a method with a
teacher (``Method.teacher``, LCR-BNN) the teacher run's own RunSpec (``teacher_spec``: the one
given with ``--teacher``, else an ``fp`` run of the same backbone, data, recipe and seed).  Everything in it can
change a run's numbers, and nothing else does: its canonical JSON (:meth:`RunSpec.key`) is the
signature on which ``bnnbench table`` and ``bnnbench figure`` match finished runs.

``Machine`` holds what must not change a run's identity: device, bf16 autocast and its
formulas for act_norm and a learned alpha, channels_last, torch.compile, threads, loader and workers, where the data and results live,
and the run's directory name.  (bf16 changes the arithmetic, so its numbers differ slightly
from fp32's; it is recorded in every ``config.json`` and in the tables' captions, but a run
trained in bf16 answers for the same experiment.)

Defaults live here, once; ``bnnbench run`` reads them.  ``RunSpec.from_saved`` reads every
``config.json`` this project has written, including those from before specs existed
(``{"config": TrainConfig, "model": bnn_config}``), so committed runs keep matching.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from bnnbench.data import DATASETS, DataRequest
from bnnbench.errors import ConfigError
from bnnbench.functional import FORMULAS
from bnnbench.models import ModelSpec

from .defaults import DEFAULT_DATA, DEFAULT_NETS, default_recipe
from .distributed import process_batch_size
from .recipes import Recipe, get_recipe

RECIPE_COSMETIC = ("description", "source")


@dataclass(frozen=True)
class RunSpec:
    """The identity of a run (see the module docstring); validated when made."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: str = DEFAULT_DATA
    recipe: Recipe = field(default_factory=lambda: get_recipe("quick"))
    seed: int = 0
    stages: tuple[int, ...] = (1, 2)
    init: str | None = None  # stage 2 alone: a stage-1 checkpoint, or "scratch"
    augment: bool = True
    teacher: RunSpec | None = None  # a teacher method's teacher run; None: the default (teacher_spec)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        self._check_teacher()
        if self.data not in DATASETS:
            raise ConfigError(f"unknown data set {self.data!r}; valid: {', '.join(DATASETS)}")
        dataset = DATASETS[self.data]
        if self.model.family != dataset.family:
            raise ConfigError(f"{self.data} needs a {dataset.family} network, got {self.model.family}/{self.model.net}")
        self.recipe.validate()
        if not self.stages or sorted(set(self.stages)) != list(self.stages) or not set(self.stages) <= {1, 2}:
            raise ConfigError(f"stages must be [1], [2] or [1, 2], got {list(self.stages)}")
        if self.stages == (2,) and self.init is None:
            raise ConfigError(
                "stage 2 alone needs --init CKPT, a stage-1 checkpoint such as results/runs/<run-id>/stage1_best.pt "
                "(or --init scratch to train stage 2 from random weights)"
            )
        if self.init is not None and self.stages != (2,):
            raise ConfigError("--init applies to --stage 2 only; with --stage both, stage 2 starts from this run's stage 1")

    # ------------------------------------------------------------------ teacher
    @property
    def needs_teacher(self) -> bool:
        """True when the weight method trains against a full-precision teacher (``Method.teacher``)."""
        return self.model.weight_binarizer().teacher

    @property
    def teacher_spec(self) -> RunSpec | None:
        """The teacher run: the one given, else an ``fp`` run of this backbone, data, recipe, seed
        and augmentation, both stages (None for a method without a teacher)."""
        if not self.needs_teacher:
            return None
        if self.teacher is not None:
            return self.teacher
        m = self.model
        model = ModelSpec(net=m.net, method="fp", family=m.family, num_classes=m.num_classes, options=m.options)
        return RunSpec(model, self.data, self.recipe, self.seed, (1, 2), None, self.augment)

    def _check_teacher(self) -> None:
        teacher = self.teacher
        if teacher is None:
            return
        if not self.needs_teacher:
            raise ConfigError(f"method {self.model.method!r} trains without a teacher; drop the teacher (--teacher)")
        if teacher.teacher is not None or teacher.model.binary_weights or teacher.model.binary_activations:
            raise ConfigError(f"a teacher must be a full-precision run (method fp), got {teacher.describe()}")
        mine = {k: getattr(self.model, k) for k in ("net", "family", "num_classes", "options")}
        theirs = {k: getattr(teacher.model, k) for k in mine}
        if mine != theirs or teacher.data != self.data:
            raise ConfigError(
                f"the teacher ({teacher.model.family}/{teacher.model.net} {dict(teacher.model.options)}, {teacher.model.num_classes} classes, "
                f"{teacher.data}) must have this run's backbone and data ({self.model.family}/{self.model.net} "
                f"{dict(self.model.options)}, {self.model.num_classes} classes, {self.data}): train an fp run of it"
            )

    @classmethod
    def make(cls, data: str = DEFAULT_DATA, *, recipe: Recipe | str | None = None, **model: Any) -> RunSpec:
        """A spec for ``data`` whose model takes its family and classes from the data set (and its
        network, unless given, from ``DEFAULT_NETS``); ``recipe`` defaults to the data set's
        (:func:`default_recipe`); the ModelSpec fields and the other RunSpec fields (seed, stages,
        init, augment) are keyword arguments."""
        run_fields = {f.name for f in dataclasses.fields(cls)} - {"model", "data", "recipe"}
        own = {k: model.pop(k) for k in list(model) if k in run_fields}
        dataset = DATASETS.get(data)
        if dataset is None:
            raise ConfigError(f"unknown data set {data!r}; valid: {', '.join(DATASETS)}")
        model.setdefault("net", DEFAULT_NETS[data])
        model.setdefault("family", dataset.family)
        model.setdefault("num_classes", dataset.num_classes)
        if recipe is None or isinstance(recipe, str):
            recipe = get_recipe(recipe or default_recipe(data), dataset.family)
        return cls(ModelSpec(**model), data, recipe, **own)

    # ------------------------------------------------------------------ identity
    def to_dict(self) -> dict[str, Any]:
        """The full record (config.json's ``spec``), recipe description included; ``teacher`` (the
        teacher run's record) only for a method with a teacher."""
        record = {
            "model": self.model.to_dict(),
            "data": self.data,
            "recipe": self.recipe.to_dict(),
            "seed": self.seed,
            "stages": list(self.stages),
            "init": self.init,
            "augment": self.augment,
        }
        teacher = self.teacher_spec
        if teacher is not None:
            record["teacher"] = teacher.to_dict()
        return record

    def key(self) -> str:
        """Canonical JSON of everything that decides the run's numbers: the run signature (the
        teacher's signature included)."""
        identity = self.to_dict()
        identity["recipe"] = {k: v for k, v in identity["recipe"].items() if k not in RECIPE_COSMETIC}
        if "teacher" in identity:
            identity["teacher"] = json.loads(self.teacher_spec.key())  # type: ignore[union-attr]
        return json.dumps(identity, sort_keys=True, default=str)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunSpec) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSpec:
        values = dict(data)
        values["model"] = ModelSpec.from_dict(values["model"])
        values["recipe"] = Recipe.from_dict(values["recipe"])
        if values.get("teacher") is not None:
            values["teacher"] = cls.from_dict(values["teacher"])
        return cls(**values)

    @classmethod
    def from_saved(cls, saved: Mapping[str, Any]) -> RunSpec:
        """The spec of a run from its ``config.json``, current or from before specs existed."""
        if "spec" in saved:
            return cls.from_dict(saved["spec"])
        config = saved["config"]
        return cls(
            ModelSpec.from_legacy(saved["model"]),
            config["data"],
            Recipe.from_dict(config["recipe"]),
            config["seed"],
            tuple(config["stages"]),
            config.get("init"),
            config.get("augment", True),
        )

    def replace(self, **changes: Any) -> RunSpec:
        return dataclasses.replace(self, **changes)

    @property
    def family(self) -> str:
        return self.model.family

    def describe(self) -> str:
        """E.g. ``resnet20 biper (w0=10) on cifar10, seed 0, recipe short``."""
        defaults = ModelSpec(net=self.model.net, method=self.model.method, family=self.family).hparams
        changed = {k: v for k, v in self.model.hparams.items() if defaults.get(k) != v}
        hp = f" ({', '.join(f'{k}={v}' for k, v in changed.items())})" if changed else ""
        return f"{self.model.net} {self.model.label}{hp} on {self.data}, seed {self.seed}, recipe {self.recipe.name}"


def check_formulas(**chosen: str) -> None:
    """Refuse a ``--<dtype>-formulas`` value (``bf16=``, ``fp32=``) that is not one of :data:`~bnnbench.functional.FORMULAS`."""
    for dtype, name in chosen.items():
        if name not in FORMULAS:
            raise ConfigError(f"--{dtype}-formulas must be one of {', '.join(FORMULAS)}, got {name!r}")


@dataclass
class Machine:
    """Where and how a run executes; never part of its identity (see the module docstring)."""

    device: str = "auto"
    amp: bool | None = None  # bf16 autocast; None: on for CUDA and for CPUs with bf16 hardware
    bf16_formulas: str = "fused"  # act_norm and learned alpha under bf16: fused or torch (functional.FORMULAS)
    fp32_formulas: str = "torch"  # the same in float32: torch (the reference, bit for bit) or fused
    channels_last: bool | None = None  # None: runners.train.resolve_channels_last (CUDA; bf16 CPUs where the kernels take it)
    compile: bool = False
    threads: int | None = None  # torch threads (None: torch's default)
    loader: str = "auto"
    workers: int = 0
    data_dir: str | None = None
    ffcv_dir: str | None = None
    download: bool = False  # fetch torchvision's CIFAR-10 into the cache when no local copy exists
    skip_bad_images: bool = False
    sync_bn: bool = False  # SyncBatchNorm across the processes of a distributed run (CUDA)
    out: str = "results"
    name: str | None = None  # run directory name instead of net-method-data-seed-timestamp-hash
    teacher_dir: str | None = None  # the teacher's run directory (--teacher); None: found by its signature in OUT/runs
    tensorboard: bool = True  # TensorBoard event files beside metrics.csv, where the package is installed

    def __post_init__(self) -> None:
        parse_device(self.device)
        check_formulas(bf16=self.bf16_formulas, fp32=self.fp32_formulas)
        if self.workers < 0:
            raise ConfigError(f"--workers must be 0 (load in the training process) or more, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        if self.name is not None:
            check_run_name(self.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Machine:
        """Known fields only: a legacy TrainConfig dict carries the machine fields under the same names."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_saved(cls, saved: Mapping[str, Any]) -> Machine:
        """The settings a run was saved with; one saved before ``bf16_formulas`` (``fp32_formulas``) existed computed
        with torch's bf16 (float32) formulas, and resumes with them."""
        settings = dict(saved["settings"] if "settings" in saved else saved["config"])
        settings.setdefault("bf16_formulas", "torch")
        settings.setdefault("fp32_formulas", "torch")
        return cls.from_dict(settings)

    def replace(self, **changes: Any) -> Machine:
        return dataclasses.replace(self, **changes)

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = parse_device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but CUDA is not available; pass --device cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {self.device!r} requested but only {torch.cuda.device_count()} GPU(s) are visible; "
                f"pass --device cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
            )
        return device

    def run_root(self) -> Path:
        return Path(self.out) / "runs"


DEVICE_TYPES = ("cpu", "cuda", "mps")


def parse_device(text: str) -> torch.device | None:
    """The device ``text`` names (None for "auto"); anything but cpu, cuda, cuda:N, mps or auto is refused."""
    if text == "auto":
        return None
    hint = f"unknown device {text!r}; pass cpu, cuda, cuda:N (N a GPU index), mps or auto"
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ConfigError(hint) from None
    if device.type not in DEVICE_TYPES:
        raise ConfigError(hint)
    return device


def check_run_name(name: str) -> None:
    """A run name is one plain folder name inside ``OUT/runs``: no separator, no ``..``, not hidden."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise ConfigError(
            f"run name {name!r} must be a plain folder name (no '/', no '..', not starting with '.'); "
            "the run goes to OUT/runs/NAME: choose the folder with --out"
        )


def data_request(spec: RunSpec, machine: Machine, device: torch.device, world_size: int, distributed: bool) -> DataRequest:
    """The data of ``spec`` as ``machine`` reads it, for one of ``world_size`` processes
    (the recipe's batches are global: each process gets its share)."""
    recipe = spec.recipe
    per_process = process_batch_size(recipe.batch_size, world_size)
    return DataRequest.make(
        spec.data,
        data_dir=machine.data_dir,
        ffcv_dir=machine.ffcv_dir,
        device=device,
        distributed=distributed,
        batch_size=per_process,
        eval_batch_size=None if recipe.eval_batch_size is None else -(-recipe.eval_batch_size // world_size),
        train_subset=recipe.train_subset,
        test_subset=recipe.test_subset,
        seed=spec.seed,
        loader=machine.loader,
        workers=machine.workers,
        augment=spec.augment,
        skip_bad_images=machine.skip_bad_images,
        download=machine.download,
    )


__all__ = ["Machine", "RunSpec", "data_request"]
