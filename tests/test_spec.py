"""RunSpec / ModelSpec / Machine: one canonical identity per run, defaults in one place, committed runs still matched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bnnbench
from bnnbench.cli import main as cli_main
from bnnbench.errors import ConfigError
from bnnbench.models import ModelSpec
from bnnbench.runners.catalog import scan_runs
from bnnbench.runners.experiments import plan
from bnnbench.runners.recipes import get_recipe
from bnnbench.runners.spec import Machine, RunSpec
from bnnbench.runners.tables import load_spec

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "results"


def test_spellings_of_one_model_are_one_spec():
    a = ModelSpec(net="resnet20", method="biper")
    b = ModelSpec(net="cifar/resnet20", method="biper", hparams={"w0": "20"}, act_method="biper", act_norm=True, options={"skip": "double"})
    assert a == b and a.key() == b.key() and hash(a) == hash(b)
    assert a.to_dict()["hparams"]["w0"] == 20.0 and a.act_norm is True and a.num_classes == 10
    assert ModelSpec(method="biper", hparams={"w0": 10}) != a


def test_activation_half_is_a_factor_of_its_own():
    paired = ModelSpec(method="xnor")
    mixed = ModelSpec(method="xnor", act_method="polynomial")
    assert paired.paired and not mixed.paired and paired != mixed
    assert (mixed.wa, mixed.label) == ("1/1", "xnor + polynomial activations")
    layer = next(layer for _, layer in bnnbench.binary_layers(mixed.build()))
    assert (layer.method.name, layer.act_method.name) == ("xnor", "polynomial")
    w1a32 = ModelSpec(method="biper", act_method="fp")
    assert (w1a32.wa, w1a32.nonlinearity, w1a32.act_norm) == ("1/32", "relu", False)  # act_norm has no effect on real inputs
    w32a1 = ModelSpec(method="fp", act_method="polynomial")
    assert (w32a1.wa, w32a1.nonlinearity) == ("32/1", "hardtanh")
    with pytest.raises(ConfigError, match="act_norm"):
        ModelSpec(method="sign-ste", act_method="reactnet", act_norm=True)


def test_model_spec_round_trips_and_builds_what_build_model_builds():
    spec = ModelSpec(net="resnet18", method="recu", act_method="reste", act_hparams={"t": 1.2}, family="cifar", options={"skip": "single"})
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    torch.manual_seed(0)
    built = spec.build(stage=1)
    torch.manual_seed(0)
    same = bnnbench.build_model("resnet18", "recu", act_method=bnnbench.get_method("reste", t=1.2), stage=1, skip="single")
    assert built.spec == same.spec
    assert all(torch.equal(x, y) for x, y in zip(built.state_dict().values(), same.state_dict().values()))
    with pytest.raises(ConfigError, match="has no option"):
        ModelSpec(net="resnet20", options={"depth": 3})


def test_run_key_ignores_the_machine_and_cosmetics_but_not_the_recipe():
    spec = RunSpec.make("cifar10", net="resnet20", method="biper", recipe="short")
    assert spec.model.family == "cifar" and spec.stages == (1, 2)
    renamed = spec.recipe.__class__.from_dict({**spec.recipe.to_dict(), "description": "another text"})
    assert spec.replace(recipe=renamed).key() == spec.key()
    longer = get_recipe("short")
    longer.stage1.epochs = 7
    assert spec.replace(recipe=longer).key() != spec.key() and spec.replace(seed=1).key() != spec.key()
    assert "device" not in spec.key() and "amp" not in spec.key()
    assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ConfigError, match="needs a imagenet network"):
        RunSpec(ModelSpec(net="resnet20"), "imagenet")
    with pytest.raises(ConfigError, match="--init"):
        RunSpec.make("digits", stages=(2,))


def test_legacy_config_json_reads_as_the_same_spec():
    """A config.json written before specs existed ({"config": TrainConfig, "model": bnn_config}) gives the spec a new run would have."""
    (record,) = [r for r in scan_runs(COMMITTED / "runs") if r.run_id == "resnet20-biper-cifar10-s0-20261125-235844-d8f07b"]
    assert "spec" not in record.saved and "config" in record.saved
    fresh = RunSpec.make("cifar10", net="resnet20", method="biper", hparams={"w0": 20.0}, recipe="short")
    assert record.spec == fresh
    assert Machine.from_saved(record.saved).device in ("auto", "cpu")


def test_the_bf16_formulas_are_a_checked_machine_setting_and_old_runs_resume_with_torchs():
    assert Machine().bf16_formulas == "fused"
    with pytest.raises(ConfigError, match="--bf16-formulas must be one of fused, torch, got 'exact'"):
        Machine(bf16_formulas="exact")
    settings = Machine().to_dict()
    del settings["bf16_formulas"]  # a config.json written before 2026-12-02
    assert Machine.from_saved({"settings": settings}).bf16_formulas == "torch"
    assert Machine.from_saved({"settings": {**settings, "bf16_formulas": "fused"}}).bf16_formulas == "fused"


def test_the_fp32_formulas_are_torchs_unless_chosen_and_checked():
    assert Machine().fp32_formulas == "torch" and Machine(fp32_formulas="fused").fp32_formulas == "fused"
    with pytest.raises(ConfigError, match="--fp32-formulas must be one of fused, torch, got 'fast'"):
        Machine(fp32_formulas="fast")
    settings = Machine(fp32_formulas="fused").to_dict()
    del settings["fp32_formulas"]  # a config.json written before 2026-12-04
    assert Machine.from_saved({"settings": settings}).fp32_formulas == "torch"


# Runs of the shipped tables that are not committed, and why.  A teacher job appears only for a
# student still to train; it is missing in a fresh checkout (committed runs keep no checkpoints)
# and finished where its run was trained.
UNCOMMITTED = {
    "3": [  # both LCR-BNN runs on ResNet-18 diverge in their first epoch: a run without a finished epoch keeps no directory
        "resnet18 lcr-rbnn on cifar10, seed 0, recipe quick",
        "resnet18 lcr-irnet on cifar10, seed 0, recipe quick",
    ],
}


@pytest.mark.parametrize(("table", "recipe", "seeds"), [("comparison-resnet20", "short", 1), ("comparison-resnet20-seeds", "short", 2), ("3", "quick", 1)])
def test_committed_runs_are_reused(table, recipe, seeds):
    """`bnnbench table ... --dry-run` finds every committed run of the shipped tables (read from their old config.json)."""
    spec = load_spec(table)
    runs = plan(spec.runs, range(seeds), get_recipe(recipe, spec.family), Machine(out=str(COMMITTED)))
    absent = sorted(job.spec.describe() for job in runs.jobs if job.status != "finished" and not job.teacher)
    assert absent == sorted(UNCOMMITTED.get(table, [])), absent
    teachers = {job.spec.model.net for job in runs.jobs if job.teacher}
    assert teachers == {job.spec.model.net for job in runs.jobs if job.status == "missing" and not job.teacher}
    assert all(job.status in ("finished", "missing") for job in runs.jobs)


def test_dry_run_cli_reports_committed_runs_as_reused(capsys):
    assert cli_main(["table", "comparison-resnet20", "--budget", "short", "--dry-run", "--out", str(COMMITTED)]) == 0
    # FP and the 19 binarizers (LCR-BNN's two rows since issue 17): finished students need no teacher
    assert "20 of 20 runs available; 0 to train or resume" in capsys.readouterr().out


def test_list_is_compact_greppable_and_scriptable(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert cli_main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert any(line.split()[:2] == ["polynomial", "none"] for line in lines)
    assert cli_main(["list", "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["biper"]["weights"]["backward"] == "w0 cos(w0 w) (Eq. 9)" and records["fp"]["weights"] == "real"
    assert records["reste"]["schedule"] == "o" and records["biper"]["hparams"]["w0"] == 20.0
