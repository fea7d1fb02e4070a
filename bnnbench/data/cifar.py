"""CIFAR-10 from any of its local forms: torchvision's pickles, an image folder, or a tar of one."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .cache import cache_root
from .decoded import LoadedSplits, SplitArrays, load_split
from .errors import DataError, DataNotFoundError
from .sampling import balanced_subset
from .sources import FolderSource, TarSource, archive_note, open_source

PICKLE_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
IMAGE_SIZE = 32


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataNotFoundError(
            f"{path} is missing: a complete {PICKLE_FOLDER}/ has {', '.join(TRAIN_BATCHES + TEST_BATCHES)} and batches.meta"
        )
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}; download or copy it again") from None


def _pickle_split(folder: Path, batches: tuple[str, ...], classes: list[str], subset: int | None) -> SplitArrays:
    parts = [_unpickle(folder / name) for name in batches]
    images = np.concatenate([p["data"] for p in parts]).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    labels = np.concatenate([np.asarray(p["labels"], dtype=np.int64) for p in parts])
    chosen = balanced_subset(labels, subset)
    return SplitArrays(np.ascontiguousarray(images[chosen]), labels[chosen], classes, len(labels))


def _load_pickles(folder: Path, train_subset: int | None, test_subset: int | None) -> LoadedSplits:
    classes = list(_unpickle(folder / "batches.meta")["label_names"])
    return LoadedSplits(
        _pickle_split(folder, TRAIN_BATCHES, classes, train_subset),
        _pickle_split(folder, TEST_BATCHES, classes, test_subset),
        {"root": str(folder), "layout": "torchvision-pickle", "md5": None, "note": None},
    )


def _load_images(
    source: FolderSource | TarSource, train_subset: int | None, test_subset: int | None, skip_bad_images: bool
) -> LoadedSplits:
    common = {"size": IMAGE_SIZE, "skip_bad_images": skip_bad_images}
    train = load_split("cifar10", source, "train", classes=None, subset=train_subset, **common)
    test = load_split("cifar10", source, "test", classes=train.classes, subset=test_subset, **common)
    root = source.path if isinstance(source, TarSource) else source.root
    return LoadedSplits(
        train, test, {"root": str(root), "layout": source.kind, "md5": source.md5, "note": archive_note(source.md5)}
    )


def _download(root: Path) -> Path:
    from torchvision.datasets import CIFAR10

    try:
        for train in (True, False):
            CIFAR10(root=str(root), train=train, download=True)
    except Exception as exc:  # network errors come as URLError, HTTPError, OSError, RuntimeError
        raise DataNotFoundError(
            f"downloading CIFAR-10 into {root} failed ({exc}); pass data_dir (--data-dir) with a local copy"
        ) from None
    return root / PICKLE_FOLDER


def locate(data_dir: Path | None, download: bool) -> Path:
    """The CIFAR-10 copy to use: ``data_dir`` itself, or one found in the cache, or a fresh download."""
    if data_dir is not None:
        if not Path(data_dir).exists():
            raise DataNotFoundError(f"CIFAR-10 data_dir {data_dir} does not exist")
        return Path(data_dir)
    root = cache_root()
    candidates = [root / PICKLE_FOLDER, root / "cifar10", *sorted((root / "extracted").glob("cifar10*"))]
    for candidate in candidates:
        if (candidate / "data_batch_1").is_file() or (candidate / "train").is_dir():
            return candidate
    if download:
        return _download(root)
    looked = ", ".join(str(c) for c in candidates[:2]) + f", {root / 'extracted'}/cifar10*"
    raise DataNotFoundError(
        f"no CIFAR-10 found (looked in {looked}). Pass data_dir (--data-dir) as a folder holding "
        f"{PICKLE_FOLDER}/, a folder with train/<class>/ and test/<class>/ images, or a .tar of such a folder "
        "(e.g. cifar10-jpeg.tar); or allow the torchvision download (download=True, --download)"
    )


def load_cifar10(
    data_dir: Path | None, *, train_subset: int | None, test_subset: int | None, skip_bad_images: bool, download: bool
) -> LoadedSplits:
    """Both CIFAR-10 splits as uint8 arrays, from whichever local layout ``data_dir`` has."""
    path = locate(data_dir, download)
    if path.is_file():
        return _load_images(open_source(path), train_subset, test_subset, skip_bad_images)
    if (path / PICKLE_FOLDER).is_dir():
        return _load_pickles(path / PICKLE_FOLDER, train_subset, test_subset)
    if (path / "data_batch_1").is_file():
        return _load_pickles(path, train_subset, test_subset)
    if (path / "train").is_dir():
        return _load_images(FolderSource(path), train_subset, test_subset, skip_bad_images)
    raise DataError(
        f"{path} is not a CIFAR-10 copy: expected {path}/{PICKLE_FOLDER}/ (torchvision) or "
        f"{path}/train/<class>/ and {path}/test/<class>/ image folders"
    )
