"""``bnnbench run`` and ``bnnbench recipes`` end to end: CIFAR-10 subset, digits accuracy, stages
run separately, overrides, ImageNet folders, FFCV, and every bad input as a clear non-zero exit."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from bnnbench.cli import main as cli_main
from bnnbench.runners.train import TIMING_COLUMNS

pytestmark = pytest.mark.usefixtures("private_cache")  # generated folders' decode caches stay out of ~/.cache

SMALL = ["--net", "resnet20", "--recipe", "quick", "--batch-size", "16", "--quiet"]
def run_files(path: Path) -> set[str]:
    """The run directory's files, TensorBoard's event files (present where tensorboard is installed) left out."""
    return {p.name for p in path.iterdir() if not p.name.startswith("events.out.tfevents")}


RUN_FILES = {".lock", "config.json", "metrics.csv", "layers.csv", "final.json", "predictions.npz", "stage1_last.pt", "stage1_best.pt", "stage2_last.pt", "stage2_best.pt"}


def run(out: Path, *args: str) -> int:
    return cli_main(["run", "--out", str(out), *args])


def rows(path: Path) -> list[dict[str, str]]:
    with (path / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def only_run(out: Path) -> Path:
    (path,) = (out / "runs").iterdir()
    return path


def no_runs(out: Path) -> bool:
    runs = out / "runs"
    return not runs.exists() or not any(runs.iterdir())


# ---------------------------------------------------------------- end to end
def test_cifar10_subset_both_stages_writes_a_complete_run_directory(tmp_path, cifar10_dir, capsys):
    out = tmp_path / "results"
    args = ["--method", "biper", "--data", "cifar10", "--data-dir", str(cifar10_dir), "--train-subset", "192", "--test-subset", "100"]
    assert run(out, *args, *SMALL, "--epochs", "1,1", "--seed", "5") == 0
    path = only_run(out)
    assert re.fullmatch(r"resnet20-biper-cifar10-s5-\d{8}-\d{6}-[0-9a-f]{6}", path.name)
    assert run_files(path) == RUN_FILES

    config = json.loads((path / "config.json").read_text())
    spec = config["spec"]
    assert (spec["model"]["method"], spec["model"]["net"], spec["data"], spec["seed"]) == ("biper", "resnet20", "cifar10", 5)
    assert spec["recipe"]["name"] == "quick" and spec["recipe"]["train_subset"] == 192
    assert re.fullmatch(r"[0-9a-f]{40}", config["git"]["commit"]) and config["versions"]["torch"] == torch.__version__
    assert config["resolved"]["device"] == "cpu" and config["machine"]["device"] == "cpu"
    assert config["model"]["hparams"]["w0"] == 20.0 and config["model"]["options"]["skip"] == "double"
    assert config["data"]["dataset"] == "cifar10" and config["data"]["train_size"] == 192 and config["data"]["note"]

    metrics = rows(path)
    assert [(r["stage"], r["epoch"]) for r in metrics] == [("1", "1"), ("2", "1")]
    required = {"train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "lr", "epoch_time_s", "train_images_per_s"}
    assert required <= set(metrics[0])
    assert [float(r["lr"]) for r in metrics] == [0.02, 0.01]
    for r in metrics:
        assert 0 <= float(r["test_top1"]) <= float(r["test_top5"]) <= 100 and float(r["train_images_per_s"]) > 0
    final = json.loads((path / "final.json").read_text())
    assert final["status"] == "finished" and final["final_test_top1"] == float(metrics[-1]["test_top1"])
    for name in RUN_FILES - {".lock", "config.json", "metrics.csv", "layers.csv", "final.json", "predictions.npz"}:
        assert torch.load(path / name, weights_only=True)["stage"] == int(name[5])
    printed = capsys.readouterr().out
    assert "stage 1 epoch 1/1" in printed and "stage 2 epoch 1/1" in printed and str(path) in printed


def test_digits_training_beats_chance(tmp_path):
    """The bundled demo learns: BiPer ResNet-20, 2 + 2 epochs on 320 digits, well above 10% on 200 test digits."""
    out = tmp_path / "results"
    assert run(out, *SMALL, "--train-subset", "320", "--test-subset", "200", "--epochs", "2,2", "--lr", "0.02,0.005") == 0
    final = json.loads((only_run(out) / "final.json").read_text())
    assert final["data"] == "digits" and final["final_test_top1"] > 25.0, final


def test_stages_separately_with_overrides_saved_in_the_config(tmp_path, capsys):
    out = tmp_path / "results"
    common = [*SMALL, "--train-subset", "48", "--test-subset", "40", "--hp", "w0=10", "--skip", "single", "--no-act-norm"]
    stage1 = [
        "--stage", "1", "--epochs", "1", "--lr", "0.03,0.003", "--wd", "1e-4,1e-5", "--warmup", "1,0", "--regularizer", "off,on",
        "--wd-groups", "weights_only", "--label-smoothing", "0.1", "--stage2-init", "best", "--seed", "3", "--name", "s1",
    ]  # fmt: skip
    assert run(out, *common, *stage1) == 0
    s1 = out / "runs" / "s1"
    assert run_files(s1) == {".lock", "config.json", "metrics.csv", "layers.csv", "final.json", "predictions.npz", "stage1_last.pt", "stage1_best.pt"}
    config = json.loads((s1 / "config.json").read_text())
    recipe = config["spec"]["recipe"]
    assert (recipe["stage1"], recipe["stage2"]) == (
        {"epochs": 1, "lr": 0.03, "weight_decay": 1e-4, "warmup_epochs": 1, "regularizer": False, "schedule": "warmup-cosine"},
        {"epochs": 1, "lr": 0.003, "weight_decay": 1e-5, "warmup_epochs": 0, "regularizer": True, "schedule": "warmup-cosine"},
    )
    assert (recipe["wd_groups"], recipe["label_smoothing"], recipe["stage2_init"], recipe["batch_size"]) == ("weights_only", 0.1, "best", 16)
    assert config["model"]["hparams"]["w0"] == 10.0 and config["model"]["options"] == {"skip": "single"}
    assert config["model"]["act_norm"] is False and config["spec"]["stages"] == [1]
    (metrics,) = rows(s1)
    assert float(metrics["train_reg"]) == 0.0 and float(metrics["lr"]) == 0.03

    # stage 2 alone from that checkpoint
    assert run(out, *common, "--stage", "2", "--init", str(s1 / "stage1_best.pt"), "--epochs", "1", "--name", "s2") == 0
    s2 = out / "runs" / "s2"
    assert [(r["stage"], r["epoch"]) for r in rows(s2)] == [("2", "1")]
    init = json.loads((s2 / "config.json").read_text())["resolved"]["stage2_init"]
    assert init["source"] == str((s1 / "stage1_best.pt").resolve()) and init["stage"] == 1
    assert f"stage 2 starts from {s1 / 'stage1_best.pt'}" in capsys.readouterr().out

    # 1W/32A: real activations
    assert run(out, *common, "--stage", "1", "--epochs", "1", "--real-activations", "--name", "w1a32") == 0
    model = json.loads((out / "runs" / "w1a32" / "config.json").read_text())["model"]
    assert model["binary_activations"] is False and model["nonlinearity"] == "relu"


def test_imagenet_folder_trains_the_imagenet_resnet18(tmp_path, make_image_folder):
    data = make_image_folder(tmp_path / "imagenet", {"train": {"n01": 3, "n02": 3}, "val": {"n01": 1, "n02": 1}}, size=None)
    out = tmp_path / "results"
    args = ["--data", "imagenet", "--data-dir", str(data), "--net", "resnet18", "--recipe", "upstream", "--warmup", "0"]
    assert run(out, *args, "--epochs", "1,1", "--batch-size", "3", "--eval-batch-size", "2", "--quiet") == 0
    path = only_run(out)
    config = json.loads((path / "config.json").read_text())
    assert config["model"]["family"] == "imagenet" and config["model"]["num_classes"] == 2
    assert config["spec"]["recipe"]["name"] == "upstream-imagenet" and config["spec"]["recipe"]["wd_groups"] == "conv_fc"
    assert config["data"]["image_size"] == 224
    assert [(r["stage"], r["epoch"], r["train_images"]) for r in rows(path)] == [("1", "1", "6"), ("2", "1", "6")]


def test_ffcv_loader_trains_like_the_torch_loader(tmp_path, cifar10_dir):
    pytest.importorskip("ffcv", reason="the ffcv extra is not installed (pip install -e '.[ffcv]'; CI installs it)")
    from bnnbench.data.ffcv_prepare import prepare_betons
    from bnnbench.data.ffcv_store import MIN_PAGE_SIZE

    betons = tmp_path / "betons"
    prepare_betons("cifar10", cifar10_dir, betons, train_subset=64, test_subset=40, page_size=MIN_PAGE_SIZE)
    common = [*SMALL, "--data", "cifar10", "--train-subset", "64", "--test-subset", "40", "--epochs", "1,1"]
    assert run(tmp_path / "ffcv", *common, "--loader", "ffcv", "--ffcv-dir", str(betons)) == 0
    assert run(tmp_path / "torch", *common, "--loader", "torch", "--data-dir", str(cifar10_dir)) == 0
    ffcv_run, torch_run = only_run(tmp_path / "ffcv"), only_run(tmp_path / "torch")
    assert json.loads((ffcv_run / "config.json").read_text())["data"]["loader"].startswith("ffcv")

    def strip(r: list[dict[str, str]]) -> list[dict[str, str]]:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in r]

    assert strip(rows(ffcv_run)) == strip(rows(torch_run))  # FFCV replays the torch loader's batches


def test_recipes_command_lists_every_preset(capsys):
    assert cli_main(["recipes"]) == 0
    table = capsys.readouterr().out
    for name in ("paper", "upstream-cifar", "upstream-imagenet", "quick", "short", "conv_fc"):
        assert name in table
    assert cli_main(["recipes", "--json"]) == 0
    presets = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert presets["upstream-cifar"]["stage1"] == {"epochs": 600, "lr": 0.021, "weight_decay": 0.0016, "warmup_epochs": 5, "regularizer": True, "schedule": "warmup-cosine"}


# ---------------------------------------------------------------- bad input
def corrupt(path: Path) -> Path:
    path.write_bytes(b"this is not a JPEG")
    return path


BAD_INPUTS = {
    "unknown method": (["--method", "bnn-magic"], "unknown method 'bnn-magic'", 2),
    "unknown net": (["--net", "resnet99"], "unknown cifar network 'resnet99'", 2),
    "unknown data": (["--data", "mnist"], "unknown data set 'mnist'", 2),
    "unknown hparam": (["--hp", "w1=3"], "no hyper-parameter 'w1'", 2),
    "bad hparam value": (["--hp", "w0=fast"], "w0='fast' is not a valid float", 2),
    "unknown recipe": (["--recipe", "fast"], "unknown recipe 'fast'", 2),
    "warm-up longer than the stage": (["--recipe", "upstream", "--epochs", "2"], "--warmup", 2),
    "stage 2 without init": (["--stage", "2"], "--init", 2),
    "init with both stages": (["--init", "x.pt"], "--init applies to --stage 2 only", 2),
    "missing init checkpoint": (["--stage", "2", "--init", "{tmp}/nope.pt"], "nope.pt' does not exist", 2),
    "diverging loss": (["--lr", "1e30", "--epochs", "1,1"], "training diverged: stage 1, epoch 1, step", 3),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_error_and_writes_nothing(case, tmp_path, capsys):
    args, message, code = BAD_INPUTS[case]
    out = tmp_path / "results"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert run(out, "--train-subset", "32", "--test-subset", "20", "--batch-size", "16", "--net", "resnet20", "--quiet", *args) == code
    assert message in capsys.readouterr().err
    assert no_runs(out)


def test_missing_data_dir_names_where_it_looked(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert run(tmp_path / "results", "--data", "cifar10", "--data-dir", str(missing), *SMALL) == 2
    assert str(missing) in capsys.readouterr().err and no_runs(tmp_path / "results")


def test_corrupt_cifar_image_is_named(tmp_path, make_image_folder, capsys):
    data = make_image_folder(tmp_path / "cifar", {"train": {"cat": 4, "dog": 4}, "test": {"cat": 2, "dog": 2}})
    bad = corrupt(data / "train" / "dog" / "0002.jpg")
    args = ["--data", "cifar10", "--data-dir", str(data), "--train-subset", "all", "--test-subset", "all"]
    assert run(tmp_path / "results", *args, *SMALL, "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert f"cannot decode image {bad}" in err and "--skip-bad-images" in err and no_runs(tmp_path / "results")


def test_corrupt_imagenet_image_found_while_training_removes_the_new_run(tmp_path, make_image_folder, capsys):
    data = make_image_folder(tmp_path / "imagenet", {"train": {"n01": 2, "n02": 2}, "val": {"n01": 1, "n02": 1}}, size=(48, 48))
    bad = corrupt(data / "val" / "n02" / "0000.jpg")  # decoded only when the first evaluation reads it
    args = ["--data", "imagenet", "--data-dir", str(data), "--net", "resnet18", "--recipe", "quick", "--epochs", "1"]
    assert run(tmp_path / "results", *args, "--train-subset", "all", "--test-subset", "all", "--batch-size", "4", "--quiet") == 2
    assert f"cannot decode image {bad}" in capsys.readouterr().err and no_runs(tmp_path / "results")


def test_resume_rejects_new_settings_and_non_run_directories(tmp_path, capsys):
    assert cli_main(["run", "--resume", str(tmp_path), "--epochs", "3,3"]) == 2
    assert "drop --epochs" in capsys.readouterr().err
    assert cli_main(["run", "--resume", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
