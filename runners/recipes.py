"""Training recipes: named presets of the two-stage protocol (SPEC section 3, paper Sec. 5.1.3).

A recipe fixes everything about optimisation that is not the method, the
network or the data: per stage the epochs, learning rate, weight decay,
linear warm-up and whether the method's extra loss term is used; for the run
the batch sizes, which parameters are decayed, label smoothing, subsets and
which stage-1 checkpoint stage 2 starts from.  Every field can be overridden
from the command line (``bnnbench run --epochs 2,1 --lr 0.05,0.005 ...``).

Presets
-------
``paper``
    The text of Sec. 5.1.3: SGD momentum 0.9, cosine; stage 1 lr 0.1, wd 5e-4;
    stage 2 lr 0.01, wd 5e-5.  The text gives no epochs, batch or warm-up: we
    use the upstream CIFAR epochs (600 / 300) and batch 256.  No regulariser
    (the text has none).
``upstream`` (resolved per data family to ``upstream-cifar`` / ``upstream-imagenet``)
    The official BiPer scripts (``cifar10/run_stg{1,2}.sh``, ``imagenet/run_stg{1,2}.sh``):
    CIFAR ResNet-18: 600 epochs, lr 0.021, wd 1.6e-3, batch 256 (eval 128), 5-epoch linear
    warm-up, regulariser on (tau 0.037) / 300 epochs, lr 0.0037, wd 1.6e-4, warm-up (the
    stage-2 script passes ``--warm_up`` too), regulariser on (tau 0.0468); every parameter
    decayed; stage 2 starts from the best stage-1 checkpoint.
    ImageNet ResNet-18: 200 epochs, lr 0.1, wd 1e-4, batch 512 (eval 256), warm-up (the
    stage-1 script passes ``--warm_up``) / 100 epochs, lr 0.01, wd 1e-4, no warm-up; decay
    only on the parameters upstream names conv*/fc* (see ``WD_GROUPS``); the regulariser is
    commented out in the upstream ImageNet code, so it is off.
``quick``
    A CPU budget for demos and tests: 3 + 2 epochs on 1,024 training images
    (``bnnbench run``: BiPer ResNet-20 reached 90.7% on 300 test digits on 2026-11-25, 2 min on 2 shared
    CPU cores, seed 0).
``upstream-cifar-official``
    ``upstream-cifar`` with stage 2 on the official script's loop (``SCHEDULES["biper-official"]``):
    299 epochs, warm-up from 2/5 of the rate, the last epoch at lr 0.  ``upstream-cifar`` itself
    trains 300 epochs with bnnbench's warm-up + cosine; each run's config.json records which.
``controlled``
    The budget of ``tables/controlled-resnet20.toml``: upstream CIFAR lr, weight decay and
    regulariser, batch 128, 4 + 2 epochs on 10,000 training images, every one of the 10,000
    test images (McNemar and the bootstrap need them), stage 2 from the last stage-1 epoch.
``short``
    A CPU budget for the real CIFAR-10 comparison across methods: upstream CIFAR lr,
    weight decay and regulariser, batch 128, one warm-up epoch per stage, stage 2 from
    the last stage-1 epoch (no selection on the test set), 6 + 3 epochs (stage 2 at half
    of stage 1, as upstream's 600 + 300) on 12,000 training / 2,000 test images of the
    class-balanced subset; sized from measured one-thread ResNet-20 throughput (84-210
    images/s per method) so that the 13 runs take about 100 minutes on 2 cores, 2 jobs.

``gpu-short``
    The GPU budget of the CIFAR-10 comparison: the ``short`` protocol (upstream CIFAR lr,
    weight decay and regulariser, stage 2 from the last stage-1 epoch) at 60 + 30 epochs on
    all 50,000 training and all 10,000 test images, batch 256 (the upstream CIFAR batch),
    3 + 2 warm-up epochs (a twentieth of each stage, rounded up).  Sized for the issue's
    target of the 13 ResNet-20 runs within 10 minutes of one H100/H200 with several runs
    sharing the GPU (13 x 90 x 50,000 images in 600 s: about 100,000 training images/s over
    all runs); not yet run on a GPU.

The regulariser's strength (BiPer's tau) is a method hyper-parameter
(``--hp reg_tau_stage1=...``); the recipe only switches the term on or off.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

WD_GROUPS: dict[str, str] = {
    "all": "every parameter (upstream CIFAR scripts)",
    "conv_fc": "binary layers (weights and alpha), the stem conv and the classifier; no decay on norms "
    "or the real 1x1 downsample convs (upstream ImageNet: parameters whose name contains conv/fc)",
    "weights_only": "weight tensors of conv and linear layers; no decay on norms, biases or alpha",
}
STAGE2_INIT = ("best", "last")
MIN_TRAIN_IMAGES = 2  # per training batch and per training subset: BatchNorm cannot normalise one image
SCHEDULES: dict[str, str] = {
    "warmup-cosine": "E epochs e = 0..E-1: lr (e+1)/W during W warm-up epochs, then a cosine from the full rate (bnnbench)",
    "biper-official": "the official BiPer stage-2 loop: E-1 epochs e = 1..E-1, warm-up lr (e+1)/5 from 2/5 of the rate, then "
    "torch's CosineAnnealingLR(T_max = E - 4) stepped from epoch 4, so the last epoch runs at lr 0",
}


@dataclass
class StageRecipe:
    """Optimisation of one stage: SGD with a cosine schedule after an optional linear warm-up."""

    epochs: int
    lr: float
    weight_decay: float
    warmup_epochs: int = 0
    regularizer: bool = True
    schedule: str = "warmup-cosine"  # see SCHEDULES

    @property
    def trained_epochs(self) -> int:
        """Epochs the stage trains: ``epochs``, or ``epochs - 1`` under the official BiPer loop."""
        return self.epochs - 1 if self.schedule == "biper-official" else self.epochs

    def progress(self, epoch: int) -> float:
        """Training progress p of the stage's ``epoch`` (1-based): (epoch - 1) / E, or epoch / E under the
        official BiPer loop, whose epoch index e = 1..E-1 is what its schedules see."""
        return (epoch if self.schedule == "biper-official" else epoch - 1) / self.epochs

    def validate(self, stage: int) -> None:
        if self.epochs < 1:
            raise ValueError(f"stage {stage}: epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"stage {stage}: lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"stage {stage}: weight decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(
                f"stage {stage}: warm-up must be between 0 and the stage's {self.epochs} epochs, got {self.warmup_epochs} "
                "(override it with --warmup N1,N2)"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"stage {stage}: unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.schedule == "biper-official" and (self.epochs < 2 or self.warmup_epochs not in (0, 5) or (self.warmup_epochs and self.epochs < 6)):
            raise ValueError(
                f"stage {stage}: the official BiPer schedule trains epochs - 1 epochs with a warm-up of 0 or 5 "
                f"(upstream's fixed --warm_up), so it needs at least 2 epochs (6 with warm-up); got {self.epochs} epochs, warm-up {self.warmup_epochs}"
            )


@dataclass
class Recipe:
    """A named preset of the two-stage protocol; see the module docstring for the presets."""

    name: str
    description: str
    stage1: StageRecipe
    stage2: StageRecipe
    batch_size: int = 256
    eval_batch_size: int | None = None
    wd_groups: str = "all"
    momentum: float = 0.9
    label_smoothing: float = 0.0
    train_subset: int | None = None
    test_subset: int | None = None
    stage2_init: str = "last"
    source: str = ""

    def stage(self, s: int) -> StageRecipe:
        return self.stage1 if s == 1 else self.stage2

    def validate(self) -> None:
        self.stage1.validate(1)
        self.stage2.validate(2)
        if self.batch_size < MIN_TRAIN_IMAGES or (self.eval_batch_size is not None and self.eval_batch_size < 1):
            raise ValueError(
                f"the training batch must hold at least {MIN_TRAIN_IMAGES} images (BatchNorm normalises over it) and the "
                f"evaluation batch at least 1, got {self.batch_size} / {self.eval_batch_size}"
            )
        if self.wd_groups not in WD_GROUPS:
            raise ValueError(f"unknown weight-decay grouping {self.wd_groups!r}; valid: {', '.join(WD_GROUPS)}")
        if self.stage2_init not in STAGE2_INIT:
            raise ValueError(f"stage2_init must be one of {STAGE2_INIT}, got {self.stage2_init!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label smoothing must lie in [0, 1), got {self.label_smoothing}")
        for name, least in (("train_subset", MIN_TRAIN_IMAGES), ("test_subset", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                why = " (BatchNorm needs at least two images per training batch)" if least > 1 else ""
                raise ValueError(f"{name} must be at least {least}{why}, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        data = dict(data)
        data["stage1"] = StageRecipe(**data["stage1"])
        data["stage2"] = StageRecipe(**data["stage2"])
        return cls(**data)


_RECIPES: dict[str, Recipe] = {
    "paper": Recipe(
        name="paper",
        description="Sec. 5.1.3 text; epochs and batch from the upstream CIFAR scripts (the text gives none)",
        stage1=StageRecipe(epochs=600, lr=0.1, weight_decay=5e-4, regularizer=False),
        stage2=StageRecipe(epochs=300, lr=0.01, weight_decay=5e-5, regularizer=False),
        batch_size=256,
        eval_batch_size=128,
        source="BiPer paper, Sec. 5.1.3",
    ),
    "upstream-cifar": Recipe(
        name="upstream-cifar",
        description="official BiPer CIFAR-10 ResNet-18 scripts",
        stage1=StageRecipe(epochs=600, lr=0.021, weight_decay=1.6e-3, warmup_epochs=5, regularizer=True),
        stage2=StageRecipe(epochs=300, lr=0.0037, weight_decay=1.6e-4, warmup_epochs=5, regularizer=True),
        batch_size=256,
        eval_batch_size=128,
        wd_groups="all",
        stage2_init="best",
        source="edmav4/BiPer cifar10/run_stg1.sh, run_stg2.sh",
    ),
    "upstream-cifar-official": Recipe(
        name="upstream-cifar-official",
        description="official BiPer CIFAR-10 ResNet-18 scripts, stage 2 on the official script's epoch loop and learning rates",
        stage1=StageRecipe(epochs=600, lr=0.021, weight_decay=1.6e-3, warmup_epochs=5, regularizer=True),
        stage2=StageRecipe(epochs=300, lr=0.0037, weight_decay=1.6e-4, warmup_epochs=5, regularizer=True, schedule="biper-official"),
        batch_size=256,
        eval_batch_size=128,
        wd_groups="all",
        stage2_init="best",
        source="edmav4/BiPer cifar10/run_stg1.sh, run_stg2.sh, main_stage2.py",
    ),
    "upstream-imagenet": Recipe(
        name="upstream-imagenet",
        description="official BiPer ImageNet ResNet-18 scripts",
        stage1=StageRecipe(epochs=200, lr=0.1, weight_decay=1e-4, warmup_epochs=5, regularizer=False),
        stage2=StageRecipe(epochs=100, lr=0.01, weight_decay=1e-4, warmup_epochs=0, regularizer=False),
        batch_size=512,
        eval_batch_size=256,
        wd_groups="conv_fc",
        stage2_init="best",
        source="edmav4/BiPer imagenet/run_stg1.sh, run_stg2.sh",
    ),
    "quick": Recipe(
        name="quick",
        description="CPU demo and test budget: 3 + 2 epochs on a small subset",
        stage1=StageRecipe(epochs=3, lr=0.02, weight_decay=5e-4, regularizer=True),
        stage2=StageRecipe(epochs=2, lr=0.01, weight_decay=5e-5, regularizer=True),
        batch_size=32,
        eval_batch_size=256,
        train_subset=1024,
        test_subset=300,
        source="bnnbench",
    ),
    "short": Recipe(
        name="short",
        description="CPU budget of the CIFAR-10 method comparison: upstream CIFAR hyper-parameters, 6 + 3 epochs on 12,000 images",
        stage1=StageRecipe(epochs=6, lr=0.021, weight_decay=1.6e-3, warmup_epochs=1, regularizer=True),
        stage2=StageRecipe(epochs=3, lr=0.0037, weight_decay=1.6e-4, warmup_epochs=1, regularizer=True),
        batch_size=128,
        eval_batch_size=256,
        wd_groups="all",
        train_subset=12000,
        test_subset=2000,
        source="bnnbench: sized so that all 13 ResNet-20 runs fit about 100 minutes of a 2-core CPU (2 jobs)",
    ),
    "controlled": Recipe(
        name="controlled",
        description="CPU budget of the controlled comparison: upstream CIFAR hyper-parameters, 4 + 2 epochs on 10,000 images, the whole test set",
        stage1=StageRecipe(epochs=4, lr=0.021, weight_decay=1.6e-3, warmup_epochs=1, regularizer=True),
        stage2=StageRecipe(epochs=2, lr=0.0037, weight_decay=1.6e-4, warmup_epochs=1, regularizer=True),
        batch_size=128,
        eval_batch_size=256,
        wd_groups="all",
        train_subset=10000,
        test_subset=None,
        source="bnnbench: sized from a measured epoch (40-50 s for 10,000 images + 10,000 test images, one thread of a "
        "2-core Xeon with AVX512-BF16/AMX, bf16 autocast, 2026-12-01) so that 23 rows x 3 seeds fit about 3 hours with 2 jobs",
    ),
    "gpu-short": Recipe(
        name="gpu-short",
        description="GPU budget of the CIFAR-10 method comparison: upstream CIFAR hyper-parameters, 60 + 30 epochs on all 50,000 images",
        stage1=StageRecipe(epochs=60, lr=0.021, weight_decay=1.6e-3, warmup_epochs=3, regularizer=True),
        stage2=StageRecipe(epochs=30, lr=0.0037, weight_decay=1.6e-4, warmup_epochs=2, regularizer=True),
        batch_size=256,
        eval_batch_size=1000,
        wd_groups="all",
        source="bnnbench: the 13 ResNet-20 runs in 10 minutes of one H100/H200 (target; several runs sharing the GPU)",
    ),
}

ALIASES: dict[str, str] = {"upstream": "upstream-{family}"}


def list_recipes() -> list[str]:
    """Names of the presets (aliases included)."""
    return list(_RECIPES) + list(ALIASES)


def get_recipe(name: str, family: str = "cifar") -> Recipe:
    """A fresh copy of preset ``name``; ``upstream`` resolves to the data family's scripts."""
    resolved = ALIASES.get(name, name).format(family=family)
    if resolved not in _RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(list_recipes())} (see `bnnbench recipes`)")
    return Recipe.from_dict(_RECIPES[resolved].to_dict())


def preset_recipes() -> list[Recipe]:
    """Every preset (copies), in display order."""
    return [get_recipe(name) for name in _RECIPES]
