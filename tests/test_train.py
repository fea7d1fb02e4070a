"""The training loop as a library: schedule, weight-decay groups, two-stage hand-over, regulariser,
per-epoch progress, callbacks, checkpoints, determinism and divergence handling (digits, CPU)."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import bnnbench
from bnnbench import registry
from bnnbench.runners.optim import WarmupCosine, decayed_parameters, make_optimizer, official_biper_stage2
from bnnbench.runners.recipes import Recipe, get_recipe, list_recipes
from bnnbench.runners.results import load_checkpoint
from bnnbench.runners.callbacks import EpochCallback, EpochReport
from bnnbench.runners.train import TIMING_COLUMNS, TrainingDiverged, run_training
from tiny import TinyRun, tiny_recipe, tiny_run


def tiny_config(tmp_path: Path, **changes) -> TinyRun:
    """resnet20 on 64 digits, batches of 16, 1 + 1 epochs: about a second per epoch."""
    return tiny_run(tiny_recipe(train=64, test=40), tmp_path / "results", **changes)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def without_timing(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]


def run_dir(cfg: TinyRun) -> Path:
    return cfg.run_dir()


# ---------------------------------------------------------------- schedule and optimiser
def upstream_lrs(base: float, epochs: int, warm_up: bool) -> list[float]:
    """The learning rate of each epoch in the upstream BiPer loop, emulated with torch's own scheduler:
    lr*(e+1)/5 for the first five epochs when warming up, CosineAnnealingLR(T_max=E-4*warm_up) stepped
    after every epoch from epoch 4*warm_up on."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs - 4 * warm_up, eta_min=0)
    lrs = []
    for epoch in range(epochs):
        if warm_up and epoch < 5:
            opt.param_groups[0]["lr"] = base * (epoch + 1) / 5
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if epoch >= 4 * warm_up:
            cosine.step()
    return lrs


@pytest.mark.parametrize("epochs,warmup", [(20, 5), (12, 0), (600, 5)])
def test_warmup_cosine_matches_the_upstream_schedule(epochs, warmup):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.021)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(epochs, warmup))
    ours = []
    for _ in range(epochs):
        ours.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert ours == pytest.approx(upstream_lrs(0.021, epochs, warm_up=warmup > 0), rel=1e-12, abs=1e-15)
    assert ours[0] == pytest.approx(0.021 / warmup if warmup else 0.021) and min(ours) > 0


def test_official_biper_stage2_schedule_trains_one_epoch_less_from_two_fifths_to_zero():
    """main_stage2.py: range(1, E) with warm-up lr (e+1)/5 while e < 5, then torch's recursive cosine (values read off
    that loop for E = 10 with torch 2.14: 0.8038, 0.5359, 0.2679, 0.0718, 0)."""
    ten = official_biper_stage2(10, warmup=True).values
    assert ten == pytest.approx([0.4, 0.6, 0.8, 1.0, 0.8038, 0.5359, 0.2679, 0.0718, 0.0], abs=1e-4)
    long = official_biper_stage2(300, warmup=True).values
    assert len(long) == 299 and long[:4] == pytest.approx([0.4, 0.6, 0.8, 1.0]) and long[-1] == 0.0 and long[-2] > 0
    stage = get_recipe("upstream-cifar-official").stage2
    assert (stage.trained_epochs, stage.progress(1), stage.progress(299)) == (299, 1 / 300, 299 / 300)
    assert get_recipe("upstream-cifar").stage2.trained_epochs == 300


def test_a_run_on_the_official_schedule_logs_its_epochs_and_rates(tmp_path):
    cfg = tiny_config(tmp_path, stages=[1])
    cfg.recipe.stage1.epochs, cfg.recipe.stage1.schedule = 3, "biper-official"
    run_training(cfg.spec, cfg.machine, quiet=True)
    rows = read_rows(run_dir(cfg) / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2] and [float(r["progress"]) for r in rows] == [1 / 3, 2 / 3]
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.02 * m for m in official_biper_stage2(3, warmup=False).values])
    assert json.loads((run_dir(cfg) / "config.json").read_text())["spec"]["recipe"]["stage1"]["schedule"] == "biper-official"


def test_weight_decay_groups_follow_upstream_names():
    model = bnnbench.build_model("resnet18", "biper", family="imagenet", num_classes=10)
    names = {id(p): n for n, p in model.named_parameters()}

    def decayed(grouping: str) -> set[str]:
        return {names[i] for i in decayed_parameters(model, grouping)}

    assert decayed("all") == set(names.values())
    conv_fc = decayed("conv_fc")
    # upstream ImageNet: parameters whose name contains conv/fc: stem conv, binary convs with alpha, classifier
    binary = {n for n in names.values() if ".conv" in n}
    assert conv_fc == binary | {"stem.0.weight", "fc.weight", "fc.bias"}
    assert any(n.endswith(".alpha") for n in conv_fc)
    assert not any(".shortcut." in n or ".bn" in n for n in conv_fc)  # real 1x1 downsample and norms: no decay
    weights_only = decayed("weights_only")
    assert not any(n.endswith((".alpha", ".bias")) for n in weights_only)
    assert any(".shortcut.0.weight" in n for n in weights_only) and not any(".bn" in n for n in weights_only)
    recipe = get_recipe("upstream", family="imagenet")
    opt = make_optimizer(model, recipe.stage1, recipe)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    assert opt.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ValueError, match="valid: all, conv_fc, weights_only"):
        decayed_parameters(model, "bn")


def test_classifier_is_named_fc():
    """The conv_fc rule picks the last Linear: make sure that is the classifier of every backbone."""
    for net, family in (("resnet20", "cifar"), ("resnet18", "imagenet"), ("vgg_small", "cifar")):
        model = bnnbench.build_model(net, "biper", family=family, num_classes=7)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert linears[-1].out_features == 7


def test_recipes_resolve_and_validate():
    assert {"paper", "upstream", "upstream-cifar", "upstream-imagenet", "quick", "short"} <= set(list_recipes())
    cifar, imagenet = get_recipe("upstream"), get_recipe("upstream", family="imagenet")
    assert (cifar.stage1.epochs, cifar.stage1.lr, cifar.stage1.weight_decay, cifar.batch_size, cifar.stage1.warmup_epochs) == (600, 0.021, 1.6e-3, 256, 5)
    assert (cifar.stage2.epochs, cifar.stage2.lr, cifar.stage2.weight_decay, cifar.stage2.warmup_epochs) == (300, 0.0037, 1.6e-4, 5)
    assert (imagenet.stage1.epochs, imagenet.stage1.lr, imagenet.batch_size, imagenet.wd_groups) == (200, 0.1, 512, "conv_fc")
    assert (imagenet.stage2.epochs, imagenet.stage2.lr, imagenet.stage2.warmup_epochs) == (100, 0.01, 0)
    paper = get_recipe("paper")
    assert (paper.stage1.lr, paper.stage1.weight_decay, paper.stage2.lr, paper.stage2.weight_decay) == (0.1, 5e-4, 0.01, 5e-5)
    assert not paper.stage1.regularizer and not paper.stage2.regularizer
    assert Recipe.from_dict(cifar.to_dict()) == cifar
    get_recipe("quick").stage1.epochs = 99  # presets are copies
    assert get_recipe("quick").stage1.epochs != 99
    with pytest.raises(ValueError, match="unknown recipe 'fast'"):
        get_recipe("fast")
    cifar.stage1.epochs = 3
    with pytest.raises(ValueError, match="--warmup"):
        cifar.validate()


# ---------------------------------------------------------------- the protocol
@dataclass
class Recorder(EpochCallback):
    """Records what the loop shows a diagnostics callback, and reports columns and per-layer rows."""

    def __post_init__(self) -> None:
        self.starts: list[tuple[int, int, dict[str, Tensor], list[float], list[int]]] = []
        self.backward_steps = 0
        self.grads_seen = True

    def on_epoch_start(self, stage: int, epoch: int, model: nn.Module) -> None:
        layers = [layer for _, layer in bnnbench.binary_layers(model)]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        self.starts.append((stage, epoch, state, [float(layer.progress) for layer in layers], [layer.stage for layer in layers]))

    def on_after_backward(self, stage: int, epoch: int, step: int, model: nn.Module) -> None:
        self.backward_steps += 1
        self.grads_seen &= all(layer.weight.grad is not None for _, layer in bnnbench.binary_layers(model))

    @torch.no_grad()
    def on_epoch_end(self, stage: int, epoch: int, model: nn.Module) -> EpochReport:
        layers = list(bnnbench.binary_layers(model))
        return EpochReport(
            columns={"mean_abs_w": float(torch.stack([layer.weight.abs().mean() for _, layer in layers]).mean())},
            layers=[{"layer": name, "abs_mean": float(layer.weight.abs().mean())} for name, layer in layers],
        )


def test_two_stages_hand_over_schedule_and_callbacks(tmp_path):
    cfg = tiny_config(tmp_path, method="recu")
    cfg.recipe.stage1.epochs, cfg.recipe.stage2_init = 2, "best"
    recorder = Recorder()
    final = run_training(cfg.spec, cfg.machine, quiet=True, callbacks=[recorder])
    path = run_dir(cfg)
    rows = read_rows(path / "metrics.csv")
    assert [(r["stage"], r["epoch"]) for r in rows] == [("1", "1"), ("1", "2"), ("2", "1")]

    # progress p = finished epochs / stage epochs, set on every binary layer before the epoch
    assert [(s, e, set(p)) for s, e, _, p, _ in recorder.starts] == [(1, 1, {0.0}), (1, 2, {0.5}), (2, 1, {0.0})]
    assert [set(stages) for *_, stages in recorder.starts] == [{1}, {1}, {2}]
    method = bnnbench.get_method("recu")
    assert [float(r["schedule_tau"]) for r in rows] == [float(method.tau(p)) for p in (0.0, 0.5, 0.0)]

    # stage 2 starts from the stage-1 checkpoint the recipe names (best test top-1 here)
    best = load_checkpoint(path / "stage1_best.pt")
    stage2_start = recorder.starts[2][2]
    assert all(torch.equal(stage2_start[k], v) for k, v in best["model"].items())
    best_epoch = max(rows[:2], key=lambda r: (float(r["test_top1"]), -int(r["epoch"])))["epoch"]
    assert best["epoch"] == int(best_epoch) and final["stages"]["1"]["best"]["epoch"] == int(best_epoch)

    # the hook: every step seen after backward with gradients, columns and per-layer rows logged
    assert recorder.backward_steps == 3 * 4 and recorder.grads_seen
    assert all(float(r["mean_abs_w"]) > 0 for r in rows)
    layer_rows = read_rows(path / "layers.csv")
    n_binary = len(list(bnnbench.binary_layers(bnnbench.build_model("resnet20", "recu"))))
    assert len(layer_rows) == 3 * n_binary and {"stage", "epoch", "layer", "abs_mean"} <= set(layer_rows[0])


def test_regulariser_is_added_only_when_the_recipe_says_so(tmp_path):
    on = tiny_config(tmp_path / "on")
    run_training(on.spec, on.machine, quiet=True)
    off = tiny_config(tmp_path / "off")
    off.recipe.stage1.regularizer = off.recipe.stage2.regularizer = False
    run_training(off.spec, off.machine, quiet=True)
    on_rows, off_rows = read_rows(run_dir(on) / "metrics.csv"), read_rows(run_dir(off) / "metrics.csv")
    # BiPer: tau * mean(sin^2(w0 w)) per layer; tau 0.037 / 0.0468 and mean sin^2 below 1
    n_layers = len(list(bnnbench.binary_layers(bnnbench.build_model("resnet20", "biper"))))
    for row, tau in zip(on_rows, (0.037, 0.0468)):
        assert 0.1 * tau * n_layers < float(row["train_reg"]) < tau * n_layers
    assert all(float(r["train_reg"]) == 0.0 for r in off_rows)
    assert on_rows[0]["train_loss"] != off_rows[0]["train_loss"] or on_rows[1]["train_loss"] != off_rows[1]["train_loss"]


def test_checkpoints_load_weights_only_and_hold_the_resume_state(tmp_path):
    cfg = tiny_config(tmp_path)
    run_training(cfg.spec, cfg.machine, quiet=True)
    path = run_dir(cfg)
    for stage in (1, 2):
        state = torch.load(path / f"stage{stage}_last.pt", weights_only=True)
        assert {"model", "optimizer", "scheduler", "rng", "stage", "epoch", "best", "spec"} <= set(state)
        assert (state["stage"], state["epoch"], state["spec"]["stages"]) == (stage, 1, [1, 2])
        assert isinstance(state["rng"]["torch"], Tensor) and state["optimizer"]["state"]
        assert state["scheduler"]["last_epoch"] == 1
    model = bnnbench.build_model("resnet20", "biper", stage=2)
    model.load_state_dict(torch.load(path / "stage2_best.pt", weights_only=True)["model"])


def test_same_seed_gives_bit_identical_metrics_and_weights(tmp_path):
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = tiny_config(tmp_path / name, seed=seed)
        run_training(cfg.spec, cfg.machine, quiet=True)
        path = run_dir(cfg)
        runs.append((without_timing(read_rows(path / "metrics.csv")), torch.load(path / "stage2_last.pt", weights_only=True)["model"]))
    (rows_a, model_a), (rows_b, model_b), (rows_c, model_c) = runs
    assert rows_a == rows_b
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert rows_a != rows_c and not all(torch.equal(model_a[k], model_c[k]) for k in model_a)


# ---------------------------------------------------------------- divergence
class NanInSecondHalf(bnnbench.Method):
    """sign-STE whose weights turn NaN once training progress reaches 1/2: a run that diverges in epoch 2."""

    def weight(self, w: Tensor, progress: float = 0.0, stage: int = 2) -> Tensor:
        out = super().weight(w, progress, stage)
        return out * math.nan if progress >= 0.5 else out


@pytest.fixture
def nan_method(monkeypatch):
    """Registers "test-nan-later" in a private copy of the method table (other tests see the built-ins only)."""
    registry.list_methods()  # built-ins and entry points loaded before the copy
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    bnnbench.register_method("test-nan-later")(NanInSecondHalf)
    return "test-nan-later"


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, nan_method):
    cfg = tiny_config(tmp_path, method=nan_method)
    cfg.recipe.stage2.epochs = 2
    with pytest.raises(TrainingDiverged, match=r"stage 2, epoch 2, step 1/4: the training loss is nan.*stage2_last\.pt \(stage 2, epoch 1\)"):
        run_training(cfg.spec, cfg.machine, quiet=True)
    path = run_dir(cfg)
    assert not (path / "final.json").exists()
    last = load_checkpoint(path / "stage2_last.pt")
    assert (last["stage"], last["epoch"]) == (2, 1) and all(v.isfinite().all() for v in last["model"].values() if v.is_floating_point())
    assert "stage 2, epoch 2" in (path / "failure.json").read_text()
    assert len(read_rows(path / "metrics.csv")) == 2
    assert not [p for p in path.iterdir() if p.name.endswith(".tmp")]


def test_divergence_in_the_first_epoch_leaves_no_run_directory(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.recipe.stage1.lr = 1e30
    with pytest.raises(TrainingDiverged, match=r"stage 1, epoch 1, step [234]/4: the training loss is (nan|inf).*run directory was removed"):
        run_training(cfg.spec, cfg.machine, quiet=True)
    assert list((Path(cfg.out) / "runs").iterdir()) == []


class MemoryFormatProbe(EpochCallback):
    def on_epoch_start(self, stage: int, epoch: int, model: nn.Module) -> None:
        convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
        self.channels_last = all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


def test_bf16_autocast_and_channels_last_paths_run_on_cpu(tmp_path):
    """The CUDA defaults (bf16 autocast, channels_last) forced on CPU: the code path runs, changes the numbers, stays finite."""
    runs = {}
    for amp in (False, True):
        cfg = tiny_config(tmp_path / str(amp), amp=amp, channels_last=amp, stages=[1])
        cfg.recipe.train_subset, cfg.recipe.test_subset = 32, 20
        probe = MemoryFormatProbe()
        run_training(cfg.spec, cfg.machine, quiet=True, callbacks=[probe])
        (row,) = read_rows(run_dir(cfg) / "metrics.csv")
        runs[amp] = row
        assert probe.channels_last == amp
        assert all(math.isfinite(float(row[k])) for k in ("train_loss", "test_loss"))
    assert runs[True]["train_loss"] != runs[False]["train_loss"]


def test_a_bf16_run_records_its_formulas_and_each_choice_trains(tmp_path):
    """--bf16-formulas: recorded in config.json where it matters (act_norm or alpha: BiPer), null where it cannot
    (sign-STE, and fp32); fused and torch give other numbers, both finite."""
    rows = {}
    for formulas in ("fused", "torch"):
        cfg = tiny_config(tmp_path / formulas, amp=True, bf16_formulas=formulas, stages=[1])
        cfg.recipe.train_subset, cfg.recipe.test_subset = 32, 20
        run_training(cfg.spec, cfg.machine, quiet=True)
        assert json.loads((run_dir(cfg) / "config.json").read_text())["resolved"]["bf16_formulas"] == formulas
        (rows[formulas],) = read_rows(run_dir(cfg) / "metrics.csv")
        assert math.isfinite(float(rows[formulas]["train_loss"]))
    assert rows["fused"]["train_loss"] != rows["torch"]["train_loss"]
    for changes in ({"amp": True, "method": "sign-ste"}, {"amp": False}):
        cfg = tiny_config(tmp_path / str(len(changes)) / changes.get("method", "biper"), stages=[1], **changes)
        cfg.recipe.train_subset, cfg.recipe.test_subset = 32, 20
        run_training(cfg.spec, cfg.machine, quiet=True)
        assert json.loads((run_dir(cfg) / "config.json").read_text())["resolved"]["bf16_formulas"] is None


def test_an_fp32_run_records_its_formulas_where_they_matter_and_fused_ones_train(tmp_path):
    """--fp32-formulas: "torch" by default, recorded where act_norm or alpha is (BiPer), null where the choice changes
    nothing (sign-STE, and bf16 runs); both train to finite losses."""
    rows = {}
    for formulas in ("torch", "fused"):
        cfg = tiny_config(tmp_path / formulas, amp=False, stages=[1], **({"fp32_formulas": formulas} if formulas == "fused" else {}))
        cfg.recipe.train_subset, cfg.recipe.test_subset = 32, 20
        run_training(cfg.spec, cfg.machine, quiet=True)
        assert json.loads((run_dir(cfg) / "config.json").read_text())["resolved"]["fp32_formulas"] == formulas
        (rows[formulas],) = read_rows(run_dir(cfg) / "metrics.csv")
        assert math.isfinite(float(rows[formulas]["train_loss"]))
    for changes in ({"amp": False, "method": "sign-ste"}, {"amp": True}):
        cfg = tiny_config(tmp_path / "none" / str(len(changes)), stages=[1], fp32_formulas="fused", **changes)
        cfg.recipe.train_subset, cfg.recipe.test_subset = 32, 20
        run_training(cfg.spec, cfg.machine, quiet=True)
        assert json.loads((run_dir(cfg) / "config.json").read_text())["resolved"]["fp32_formulas"] is None


class NanIntoOneLatentWeight(EpochCallback):
    """Writes NaN into one gradient entry of the first binary layer in stage 2: the SGD step makes that
    latent weight NaN, which sign() maps to -1, so the loss stays finite."""

    def on_after_backward(self, stage: int, epoch: int, step: int, model: nn.Module) -> None:
        if stage == 2:
            _, layer = next(bnnbench.binary_layers(model))
            layer.weight.grad[(0,) * layer.weight.dim()] = math.nan  # (any memory format)


def test_non_finite_latent_weights_behind_a_finite_loss_stop_the_run(tmp_path):
    cfg = tiny_config(tmp_path, method="sign-ste")
    with pytest.raises(TrainingDiverged, match=r"stage 2, epoch 1: non-finite parameters \(stages\.0\.0\.conv1\.weight\)"):
        run_training(cfg.spec, cfg.machine, quiet=True, callbacks=[NanIntoOneLatentWeight()])
    path = run_dir(cfg)
    assert [p.name for p in sorted(path.glob("stage2_*"))] == []  # the NaN model was not checkpointed
    assert load_checkpoint(path / "stage1_last.pt")["stage"] == 1
