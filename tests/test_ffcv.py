"""FFCV: `bnnbench prepare` writes .beton files; make_data reads them in the torch loaders' order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip(
    "ffcv.loader", reason="FFCV is not installed (apt-get install libopencv-dev libturbojpeg0-dev; pip install ffcv==1.0.2)"
)

from bnnbench.cli import main as cli_main  # noqa: E402
from bnnbench.data import BadImageError, DataError, DataNotFoundError, make_data  # noqa: E402
from bnnbench.data.ffcv_prepare import prepare_betons  # noqa: E402
from bnnbench.data.ffcv_store import MANIFEST, MIN_PAGE_SIZE, ImageFieldSettings  # noqa: E402

pytestmark = pytest.mark.usefixtures("private_cache")

SMALL_PAGES = str(MIN_PAGE_SIZE)  # FFCV's default page is 8 MiB; 2 MiB is its minimum


def epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def identical(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def cifar_betons(cifar10_tar, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ffcv-cifar")
    args = ["prepare", "--data", "cifar10", "--data-dir", str(cifar10_tar), "--out", str(out)]
    assert cli_main([*args, "--train-subset", "200", "--test-subset", "100", "--page-size", SMALL_PAGES]) == 0
    return out


def test_prepare_writes_betons_labels_and_manifest(cifar_betons):
    assert {p.name for p in cifar_betons.iterdir()} == {
        "train.beton",
        "test.beton",
        "train_labels.npy",
        "test_labels.npy",
        MANIFEST,
    }
    manifest = json.loads((cifar_betons / MANIFEST).read_text())
    assert manifest["dataset"] == "cifar10" and manifest["page_size"] == MIN_PAGE_SIZE
    assert manifest["source"]["note"] == "CIFAR-10 (JPEG q75 copy)" and manifest["image_field"]["write_mode"] == "raw"
    assert manifest["splits"]["train"]["samples"] == 200 and manifest["splits"]["test"]["samples"] == 100
    assert np.bincount(np.load(cifar_betons / "train_labels.npy")).tolist() == [20] * 10


def test_ffcv_loader_replays_the_torch_loader_batch_for_batch(cifar_betons, cifar10_tar):
    common = dict(batch_size=64, seed=4, train_subset=200, test_subset=100)
    ffcv = make_data("cifar10", loader="auto", ffcv_dir=cifar_betons, **common)  # auto: the .beton files exist
    torch_path = make_data("cifar10", data_dir=cifar10_tar, loader="torch", **common)
    assert ffcv.info["loader"].startswith("ffcv") and ffcv.info["note"] == "CIFAR-10 (JPEG q75 copy)"
    assert (ffcv.train_size, ffcv.test_size, len(ffcv.train)) == (200, 100, 4)
    for e in (0, 1):
        ffcv.set_epoch(e)
        torch_path.set_epoch(e)
        from_ffcv = epoch(ffcv.train)
        assert identical(from_ffcv, epoch(torch_path.train)), f"epoch {e}: FFCV and torch batches differ"
    ffcv.set_epoch(0)
    assert not identical(from_ffcv, epoch(ffcv.train))  # a new epoch, a new order
    assert identical(epoch(ffcv.test), epoch(torch_path.test))


def test_ffcv_subset_and_loader_errors(cifar_betons, tmp_path):
    half = make_data("cifar10", loader="ffcv", ffcv_dir=cifar_betons, batch_size=50, train_subset=100, test_subset=20)
    assert torch.bincount(torch.cat([y for _, y in half.train])).tolist() == [10] * 10
    with pytest.raises(DataNotFoundError, match="bnnbench prepare --data cifar10"):
        make_data("cifar10", loader="ffcv", ffcv_dir=tmp_path)
    for name in ("train.beton", "test.beton"):
        (tmp_path / name).write_bytes((cifar_betons / name).read_bytes())
    with pytest.raises(DataNotFoundError, match=f"{MANIFEST} is missing"):
        make_data("cifar10", loader="ffcv", ffcv_dir=tmp_path)
    with pytest.raises(DataError, match="holds 'cifar10' .beton files, not 'imagenet'"):
        make_data("imagenet", loader="ffcv", ffcv_dir=cifar_betons)
    with pytest.raises(DataError, match="power of two"):
        prepare_betons("cifar10", None, tmp_path / "x", page_size=3 << 20)


@pytest.fixture
def imagenet_dir(tmp_path, make_image_folder) -> Path:
    splits = {"train": {"n01": 4, "n02": 4, "n03": 4}, "val": {"n01": 2, "n03": 2}}
    return make_image_folder(tmp_path / "imagenet", splits, size=None, smooth=True)


def test_imagenet_betons_through_ffcv(imagenet_dir, tmp_path):
    out = tmp_path / "ffcv"
    raw = ImageFieldSettings(write_mode="raw", max_resolution=500)  # exact pixels, to compare with the torch path
    prepare_betons("imagenet", imagenet_dir, out, page_size=MIN_PAGE_SIZE, image_field=raw)
    ffcv = make_data("imagenet", loader="ffcv", ffcv_dir=out, batch_size=5, eval_batch_size=4)
    torch_path = make_data("imagenet", data_dir=imagenet_dir, loader="torch", batch_size=5, eval_batch_size=4)
    train = epoch(ffcv.train)
    assert [x.shape for x, _ in train] == [(5, 3, 224, 224), (5, 3, 224, 224), (2, 3, 224, 224)]
    assert [y.tolist() for _, y in train] == [y.tolist() for _, y in epoch(torch_path.train)]  # same order
    ((x_ffcv, y_ffcv),) = epoch(ffcv.test)
    ((x_torch, y_torch),) = epoch(torch_path.test)
    assert y_ffcv.tolist() == y_torch.tolist() == [0, 0, 2, 2]
    # FFCV centre-crops 224/256 of the short side and resizes; we resize to 256 and crop 224: same region
    assert (x_ffcv - x_torch).abs().mean() < 0.05


def test_imagenet_prepare_names_a_corrupt_image_or_skips_it(imagenet_dir, tmp_path):
    bad = imagenet_dir / "val" / "n03" / "0001.jpg"
    bad.write_bytes(b"this is not a jpeg" * 10)
    out = tmp_path / "ffcv"
    with pytest.raises(BadImageError, match=str(bad)):
        prepare_betons("imagenet", imagenet_dir, out, page_size=MIN_PAGE_SIZE)
    assert not (out / MANIFEST).exists() and not (out / "test.beton").exists()
    manifest = prepare_betons("imagenet", imagenet_dir, out, page_size=MIN_PAGE_SIZE, skip_bad_images=True)
    assert manifest["splits"]["test"]["excluded"] == [3] and manifest["splits"]["test"]["skipped"] == [str(bad)]
    with pytest.raises(DataError, match="leaves out 1 unreadable images"):
        make_data("imagenet", loader="ffcv", ffcv_dir=out)
    lenient = make_data("imagenet", loader="ffcv", ffcv_dir=out, batch_size=4, skip_bad_images=True)
    assert lenient.test_size == 3 and torch.cat([y for _, y in lenient.test]).tolist() == [0, 0, 2]
    assert lenient.test.skipped_images == {str(bad)}


class _DyingSamples:
    """A data set whose reader process exits abruptly, as a crashing decoder would."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        import os

        os._exit(3)


@pytest.mark.parametrize("sigint", ["handled", "ignored"])
def test_a_crashed_writer_process_is_an_error_not_a_hang(tmp_path, sigint):
    """Also when SIGINT is ignored, as in a process a shell started with ``nohup ... &``."""
    import signal

    from bnnbench.data.ffcv_store import CIFAR_FIELD, write_beton

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN if sigint == "ignored" else signal.default_int_handler)
    try:
        with pytest.raises(DataError, match="writer process died"):
            write_beton(tmp_path / "x.beton", _DyingSamples(), CIFAR_FIELD, page_size=MIN_PAGE_SIZE, workers=1)
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL  # the watchdog's handler is gone again
    finally:
        signal.signal(signal.SIGINT, previous)
