"""Hostile inputs (issue 16, classes 2, 3, 7, 8, 9): a cut tar, subsets and the decode cache, environment
errors, misleading messages and values that must be refused.  Each is answered in one clear line (exit 2)
naming the file or value and the fix, before any training where it can be."""

from __future__ import annotations

import errno
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from bnnbench.runners.spec import Machine, RunSpec
from PIL import Image

from bnnbench import get_method, list_methods
from bnnbench.cli import build_parser
from bnnbench.cli import main as cli_main
from bnnbench.data import make_data
from bnnbench.data.cache import cache_root, file_md5
from bnnbench.data.decoded import load_split
from bnnbench.data.errors import DataError
from bnnbench.data.sampling import balanced_order
from bnnbench.data.sources import FolderSource, TarSource, extract_archive
from bnnbench.errors import ConfigError
from bnnbench.functional import normalized_surrogate_sign, surrogate_sign
from bnnbench.registry import method_class

pytestmark = pytest.mark.usefixtures("private_cache")

TINY = ["--epochs", "1", "--train-subset", "8", "--test-subset", "4", "--batch-size", "4", "--quiet", "--device", "cpu"]


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path: Path, per_class: int = 3) -> Path:
    """A complete CIFAR-like tar: train/ and test/ with classes a and b of 32x32 PNGs."""
    with tarfile.open(path, "w") as tf:
        for split in ("train", "test"):
            for cls in "ab":
                for i in range(per_class):
                    data = png(10 * i + (cls == "b") * 100)
                    info = tarfile.TarInfo(f"c10/{split}/{cls}/{i}.png")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return path


def member_starts(path: Path) -> list[int]:
    with tarfile.open(path, "r:") as tf:
        return [m.offset for m in tf.getmembers()]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("bnnbench: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ======================================================================== 2. a cut tar
def cut_points(full: Path) -> dict[str, int]:
    starts = member_starts(full)
    return {"inside a header": starts[5] + 100, "inside data": starts[5] + 600, "at a member boundary": starts[-1]}


@pytest.mark.parametrize("where", ["inside a header", "inside data", "at a member boundary"])
def test_a_cut_tar_is_refused_naming_the_file_and_caches_nothing(tmp_path, where):
    full = write_tar(tmp_path / "full.tar")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full.read_bytes()[: cut_points(full)[where]])
    with pytest.raises(DataError, match=f"{cut} is incomplete.*Copy it again"):
        TarSource(cut)
    with pytest.raises(DataError, match="incomplete"):
        make_data("cifar10", data_dir=cut, train_subset=4)
    with pytest.raises(DataError, match="incomplete"):
        extract_archive(cut, tmp_path / "cache")
    assert not list(cache_root().rglob(f"{file_md5(cut)}*")) and not (cache_root() / "decoded").exists()
    assert not (tmp_path / "cache" / "extracted").exists() or not any((tmp_path / "cache" / "extracted").iterdir())
    assert len(TarSource(full).split_index("train").names) == 6  # the complete tar still reads


def test_a_member_index_from_before_the_check_is_not_trusted(tmp_path):
    """A cut tar indexed by an older bnnbench (``<md5>-members.npz``) is checked again, not reused."""
    full = write_tar(tmp_path / "full.tar")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full.read_bytes()[: cut_points(full)["at a member boundary"]])
    with tarfile.open(cut, "r:") as tf:
        members = tf.getmembers()
    old = cache_root() / "archives" / f"{file_md5(cut)}-members.npz"
    old.parent.mkdir(parents=True, exist_ok=True)
    np.savez(old, names=np.array([m.name for m in members]), offsets=np.array([m.offset_data for m in members]), sizes=np.array([m.size for m in members]))
    with pytest.raises(DataError, match="incomplete"):
        TarSource(cut)


def test_a_cut_tar_on_the_command_line_is_one_line_before_training(tmp_path, capsys):
    full = write_tar(tmp_path / "full.tar")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full.read_bytes()[: cut_points(full)["inside a header"]])
    out = tmp_path / "results"
    assert cli_main(["run", "--data", "cifar10", "--data-dir", str(cut), "--recipe", "quick", "--out", str(out), *TINY]) == 2
    assert str(cut) in one_line_error(capsys)
    assert not (out / "runs").exists() or not any((out / "runs").iterdir())


# ======================================================================== 3. subsets and the decode cache
def test_a_subset_is_the_same_before_and_after_the_decode_cache_exists(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "c10", {"train": {"a": 6, "b": 6}, "test": {"a": 2, "b": 2}})
    source = FolderSource(root)
    index = source.split_index("train")
    order = balanced_order(index.labels)
    for position in order[[1, 4, 9]]:  # two inside the subset of 8, one outside it; the first image is readable
        (root / index.names[position]).write_bytes(b"not an image" * 10)
    common = {"classes": None, "size": 32}

    def subset(n):
        return load_split("cifar10", source, "train", subset=n, skip_bad_images=True, **common)

    before = subset(8)
    assert before.cache is None
    full = subset(None)
    assert full.cache is not None and len(full.skipped) == 3
    after = subset(8)
    assert after.cache is not None
    assert np.array_equal(before.images, after.images) and np.array_equal(before.labels, after.labels)
    assert before.skipped == after.skipped == [str(root / index.names[p]) for p in sorted(order[[1, 4]])]
    assert len(before.labels) == 6
    # a subset holding none of the unreadable images needs no --skip-bad-images, with the cache as without it
    assert len(load_split("cifar10", source, "train", subset=1, skip_bad_images=False, **common).labels) == 1


def test_an_ffcv_subset_holds_the_images_the_folder_gives(tmp_path, make_image_folder):
    """An FFCV store written with --skip-bad-images (unreadable images as placeholders) and the image
    folder it came from give one subset: drawn from the full index, the unreadable ones then left out."""
    pytest.importorskip("ffcv.loader", reason="FFCV is not installed")
    from bnnbench.data.ffcv_prepare import prepare_betons
    from bnnbench.data.ffcv_store import MIN_PAGE_SIZE

    root = make_image_folder(tmp_path / "imagenet", {"train": {"n01": 4, "n02": 4}, "val": {"n01": 2, "n02": 2}}, size=None)
    index = FolderSource(root).split_index("train")
    for position in balanced_order(index.labels)[[1, 2]]:
        (root / index.names[position]).write_bytes(b"not an image" * 10)
    prepare_betons("imagenet", root, tmp_path / "ffcv", page_size=MIN_PAGE_SIZE, skip_bad_images=True)
    common = {"train_subset": 5, "skip_bad_images": True, "batch_size": 8, "augment": False}
    store = make_data("imagenet", loader="ffcv", ffcv_dir=tmp_path / "ffcv", **common)
    folder = make_data("imagenet", data_dir=root, loader="torch", **common)
    labels = [sorted(torch.cat([y for _, y in bundle.train]).tolist()) for bundle in (store, folder)]
    assert labels[0] == labels[1] and len(labels[0]) == 3


# ======================================================================== 7. environment errors
def test_an_out_that_is_a_file_or_below_a_file_is_one_line_before_training(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "below"):
        assert cli_main(["run", "--out", str(out), *TINY]) == 2
        assert str(afile) in one_line_error(capsys)


def test_a_full_disk_under_out_is_refused_before_training(tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "results"
    assert cli_main(["run", "--out", str(out), *TINY]) == 2
    err = one_line_error(capsys)
    assert str(out) in err and "disk is full" in err
    assert not (out / "runs").exists()


def test_a_disk_that_fills_during_training_is_one_line_with_the_resume_command(tmp_path, capsys, monkeypatch):
    from bnnbench.runners import results

    write = results.atomic_write

    def fill_at_stage_2(path, *args):
        if Path(path).name.startswith("stage2"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write(path, *args)

    monkeypatch.setattr(results, "atomic_write", fill_at_stage_2)
    out = tmp_path / "results"
    assert cli_main(["run", "--out", str(out), *TINY, "--name", "full"]) == 2
    err = one_line_error(capsys)
    assert "stage2_" in err and "disk is full" in err and f"bnnbench run --resume {out / 'runs' / 'full'}" in err


def test_a_cache_that_cannot_be_written_is_one_line_naming_bnnbench_cache(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("BNNBENCH_CACHE", str(blocker))
    tar = write_tar(tmp_path / "c10.tar")
    assert cli_main(["run", "--data", "cifar10", "--data-dir", str(tar), "--recipe", "quick", "--out", str(tmp_path / "r"), *TINY]) == 2
    err = one_line_error(capsys)
    assert str(blocker) in err and "BNNBENCH_CACHE" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert cli_main(["run", "--out", str(out), *TINY]) == 2
        assert str(out) in one_line_error(capsys)
    finally:
        out.chmod(0o755)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cuda:99"])
def test_unknown_devices_are_one_line(tmp_path, capsys, device):
    assert cli_main(["run", "--out", str(tmp_path), *TINY, "--device", device]) == 2
    assert repr(device) in one_line_error(capsys)


def test_bench_train_checks_its_device_before_timing(capsys):
    assert cli_main(["bench", "train", "--device", "tpu", "--methods", "biper"]) == 2
    assert "'tpu'" in one_line_error(capsys)


def test_bench_train_names_the_bf16_formulas_it_takes(capsys):
    assert cli_main(["bench", "train", "--bf16-formulas", "exact", "--methods", "biper"]) == 2
    error = one_line_error(capsys)
    assert "--bf16-formulas" in error and "fused, torch" in error and "'exact'" in error
    assert cli_main(["bench", "train", "--fp32-formulas", "fast", "--methods", "biper"]) == 2
    error = one_line_error(capsys)
    assert "--fp32-formulas" in error and "fused, torch" in error and "'fast'" in error


def test_eval_threads_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit:
        cli_main(["eval", "--packed", "x.pt", "--data", "digits", "--threads", "0"])
    assert exit.value.code == 2 and "--threads" in capsys.readouterr().err


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A stage-2 checkpoint of resnet20 + biper on digits, made without training."""
    spec = RunSpec.make("digits", method="biper")
    path = tmp_path / "run" / "stage2_best.pt"
    path.parent.mkdir()
    torch.save({"model": spec.model.build(stage=2).state_dict(), "spec": spec.to_dict(), "stage": 2, "epoch": 1}, path)
    return path


def test_export_out_that_is_a_folder_is_one_line_and_writes_nothing(checkpoint, tmp_path, capsys):
    target = tmp_path / "exports"
    target.mkdir()
    assert cli_main(["export", str(checkpoint), "--packed", "--verify", "0", "--out", str(target)]) == 2
    assert str(target) in one_line_error(capsys) and not any(target.iterdir())


def test_a_checkpoint_missing_weights_is_one_line_naming_them(checkpoint, capsys):
    state = torch.load(checkpoint, weights_only=True)
    del state["model"]["fc.weight"]
    torch.save(state, checkpoint)
    assert cli_main(["export", str(checkpoint), "--packed", "--verify", "0"]) == 2
    err = one_line_error(capsys)
    assert str(checkpoint) in err and "missing fc.weight" in err


def test_a_checkpoint_of_another_method_is_one_line_before_training(tmp_path, capsys):
    other = RunSpec.make("digits", method="dorefa")
    path = tmp_path / "dorefa.pt"
    torch.save({"model": other.model.build(stage=1).state_dict(), "spec": other.to_dict(), "stage": 1, "epoch": 1}, path)
    out = tmp_path / "results"
    assert cli_main(["run", "--out", str(out), *TINY, "--method", "biper", "--stage", "2", "--init", str(path)]) == 2
    err = one_line_error(capsys)
    assert str(path) in err and "dorefa" in err and "biper" in err


# ======================================================================== 8. messages that mislead
@pytest.mark.parametrize("content", [os.urandom(4096), b""], ids=["random-bytes", "empty"])
def test_an_unreadable_checkpoint_says_so_and_never_suggests_weights_only_false(tmp_path, capsys, content):
    path = tmp_path / "stage2_best.pt"
    path.write_bytes(content)
    assert cli_main(["export", str(path), "--packed"]) == 2
    err = one_line_error(capsys)
    assert str(path) in err and "not a bnnbench checkpoint" in err and "weights_only" not in err
    assert ("empty" in err) == (not content)


def test_a_plugin_that_fails_to_import_is_named(tmp_path, capsys):
    plugin = tmp_path / "broken_plugin.py"
    plugin.write_text("import math\nraise RuntimeError('boom')\n")
    assert cli_main(["--plugin", str(plugin), "list"]) == 2
    err = one_line_error(capsys)
    assert str(plugin) in err and "RuntimeError: boom" in err


def test_resuming_a_plugin_run_without_the_plugin_hints_at_it(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "plugin-run"
    run_dir.mkdir(parents=True)
    spec = RunSpec.make("digits").to_dict()
    spec["model"]["method"] = spec["model"]["act_method"] = "my-plugin-method"
    (run_dir / "config.json").write_text(json.dumps({"spec": spec, "settings": Machine().to_dict()}))
    assert cli_main(["run", "--resume", str(run_dir)]) == 2
    err = one_line_error(capsys)
    assert "my-plugin-method" in err and f"--plugin FILE.py run --resume {run_dir}" in err


def test_an_unknown_data_name_is_named_first(tmp_path, capsys):
    assert cli_main(["run", "--out", str(tmp_path), "--data", "mnist", "--epochs", "1", "--warmup", "5"]) == 2
    assert "unknown data set 'mnist'" in one_line_error(capsys)


def test_a_train_subset_of_one_image_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "results"
    assert cli_main(["run", "--out", str(out), *TINY, "--train-subset", "1"]) == 2
    assert "train_subset must be at least 2" in one_line_error(capsys)
    assert not (out / "runs").exists()


# ======================================================================== 9. values that must be refused
@pytest.mark.parametrize(
    "argv",
    [["run", "--train-subset", "0"], ["run", "--test-subset", "0"], ["table", "1", "--seeds", "-2"], ["table", "1", "--seeds", "0"]],
    ids=["train-subset-0", "test-subset-0", "seeds-negative", "seeds-0"],
)
def test_out_of_range_numbers_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(argv)
    assert exit.value.code == 2 and argv[-2] in capsys.readouterr().err


def test_train_subset_all_still_means_the_whole_split():
    from bnnbench.commands.run import build_spec

    args = build_parser().parse_args(["run", "--train-subset", "all", "--test-subset", "5"])
    recipe = build_spec(args).recipe
    assert (recipe.train_subset, recipe.test_subset) == (None, 5)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_biper_w0_must_be_positive(value, tmp_path, capsys):
    with pytest.raises(ConfigError, match="w0"):
        get_method("biper", w0=value)
    assert cli_main(["run", "--out", str(tmp_path), *TINY, "--hp", f"w0={value}"]) == 2
    assert "w0" in one_line_error(capsys)


def test_every_declared_positive_hyper_parameter_is_checked():
    declared = [(name, field) for name in list_methods() for field in method_class(name).positive]
    assert len(declared) >= 8
    for name, field in declared:
        with pytest.raises(ConfigError, match=field):
            get_method(name, **{field: 0.0 if isinstance(getattr(method_class(name)(), field), float) else 0})


@pytest.mark.parametrize(
    "machine",
    [{"workers": -2}, {"threads": 0}, {"name": "../evil"}, {"name": "a/b"}, {"name": ".."}, {"name": ""}, {"device": "tpu"}],
    ids=["workers", "threads", "dotdot", "slash", "parent", "empty-name", "device"],
)
def test_bad_machine_values_are_refused(machine):
    with pytest.raises(ConfigError):
        Machine(**machine)


def test_a_run_name_cannot_leave_runs(tmp_path, capsys):
    out = tmp_path / "results"
    assert cli_main(["run", "--out", str(out), *TINY, "--name", "../evil"]) == 2
    assert "'../evil'" in one_line_error(capsys)
    assert not (out / "evil").exists()


@pytest.mark.parametrize("kind", ["plain", "shifted", "normalized"])
def test_a_surrogate_derivative_of_the_wrong_shape_is_refused(kind):
    x = torch.randn(2, 3, 4, 4, requires_grad=True)

    def scalar(t):
        return torch.ones(1)

    if kind == "plain":
        y = surrogate_sign(x, scalar)
    elif kind == "shifted":
        y = surrogate_sign(x, scalar, shift=torch.zeros(1, 3, 1, 1, requires_grad=True))
    else:
        y = normalized_surrogate_sign(x, scalar, 1e-5)
    with pytest.raises(ValueError, match=r"returned shape \(1,\) for an input of shape \(2, 3, 4, 4\)"):
        y.sum().backward()
