"""``make_data``: one call from a data set name to train/test loaders and their provenance."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cache import cache_root
from .cifar import load_cifar10
from .decoded import LoadedSplits
from .digits import load_digits
from .errors import DataError, DataNotFoundError
from .ffcv_store import (
    FFCV_DATASETS,
    beton_path,
    betons_present,
    ffcv_missing_reason,
    labels_path,
    read_manifest,
)
from .loaders import ArrayLoader, EpochLoader, FolderDataset, FolderLoader
from .sampling import SUBSET_SEED, balanced_subset, distributed_rank, readable_subset
from .sources import FolderSource, archive_note
from .specs import DatasetSpec, get_spec

LOADERS = ("auto", "torch", "gpu", "ffcv")
ARRAY_DATASETS = ("cifar10", "digits")  # held in memory as uint8 arrays: what loader="gpu" serves


@dataclass
class DataBundle:
    """Train and test loaders of one data set, plus what a results file needs to say about them.

    ``train``/``test`` are re-iterable, have ``len()`` in batches and yield ``(images, labels)``:
    float32 (B, C, H, W) normalised images and int64 labels on the requested device.
    ``set_epoch(e)`` makes the next pass over ``train`` a pure function of (seed, e).
    ``train_size``/``test_size`` count the images used (after the subset; over all ranks).
    ``train.skipped_images``/``test.skipped_images`` are the unreadable files left out (sets).
    """

    train: EpochLoader
    test: EpochLoader
    num_classes: int
    family: str
    train_size: int
    test_size: int
    info: dict[str, Any]
    classes: list[str] = field(default_factory=list)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose training order and augmentation the next pass replays."""
        self.train.set_epoch(epoch)


def _choose_backend(name: str, loader: str, ffcv_dir: Path | None, device: torch.device) -> str:
    """"torch", "gpu" or "ffcv": ``loader`` checked against the data set, or chosen for ``auto``
    (on CUDA the device-resident arrays for CIFAR-10 and digits; else FFCV when its files are
    there and it imports; else torch)."""
    if loader not in LOADERS:
        raise DataError(f"loader must be one of {', '.join(LOADERS)}, got {loader!r}")
    if loader == "torch":
        return "torch"
    if loader == "gpu":
        if name not in ARRAY_DATASETS:
            raise DataError(
                f"loader='gpu' keeps a uint8 array of the data set on the device: it serves {' and '.join(ARRAY_DATASETS)}, "
                f"not {name!r}; use loader='ffcv' (--ffcv-dir) or 'torch'"
            )
        return "gpu"
    if loader == "auto":
        if device.type == "cuda" and name in ARRAY_DATASETS:
            return "gpu"
        usable = name in FFCV_DATASETS and betons_present(ffcv_dir) and ffcv_missing_reason() is None
        return "ffcv" if usable else "torch"
    if name not in FFCV_DATASETS:
        raise DataError(f"loader='ffcv' serves {' and '.join(FFCV_DATASETS)}, not {name!r}; use loader='torch'")
    if ffcv_dir is None or not betons_present(ffcv_dir):
        raise DataNotFoundError(
            f"loader='ffcv' needs ffcv_dir (--ffcv-dir) holding train.beton and test.beton (looked in {ffcv_dir}); "
            f"write them with: bnnbench prepare --data {name} --data-dir DIR --out FFCV_DIR"
        )
    reason = ffcv_missing_reason()
    if reason:
        raise DataError(reason)
    return "ffcv"


def _array_bundle(
    spec: DatasetSpec, loaded: LoadedSplits, request: DataRequest, resident: bool
) -> tuple[EpochLoader, EpochLoader, dict[str, Any]]:
    mean, std = loaded.mean or spec.mean, loaded.std or spec.std
    common = {
        "seed": request.seed,
        "mean": mean,
        "std": std,
        "device": request.device,
        "resident": resident,
        "rank": request.rank,
        "world_size": request.world_size,
    }
    train = ArrayLoader(
        loaded.train.images, loaded.train.labels, request.batch_size, train=True, augment=request.augment, **common
    )
    test = ArrayLoader(loaded.test.images, loaded.test.labels, request.eval_batch_size, train=False, augment=False, **common)
    train.skipped_images.update(loaded.train.skipped)
    test.skipped_images.update(loaded.test.skipped)
    skipped = loaded.train.skipped + loaded.test.skipped
    info = {
        **loaded.provenance,
        "loader": _array_loader_note(request.device, resident),
        "classes": loaded.train.classes,
        "full_train_size": loaded.train.full_size,
        "full_test_size": loaded.test.full_size,
        "decode_cache": {"train": loaded.train.cache, "test": loaded.test.cache},
        "skipped_bad_images": len(skipped),
        "skipped_images": skipped[:20],
        "mean": list(mean),
        "std": list(std),
    }
    return train, test, info


def _array_loader_note(device: torch.device, resident: bool) -> str:
    if resident:
        return f"gpu (uint8 arrays resident on {device}: batched crop/flip and normalisation there)"
    where = "" if device.type == "cpu" else f", pinned copies to {device}"
    return f"torch (in-memory uint8 arrays on the host, batched crop/flip{where})"


def _imagenet_root(data_dir: Path | None) -> Path:
    candidates = [Path(data_dir)] if data_dir is not None else [cache_root() / "imagenet"]
    for candidate in candidates:
        if (candidate / "train").is_dir() and (candidate / "val").is_dir():
            return candidate
    raise DataNotFoundError(
        f"no ImageNet found (looked for train/ and val/ in {candidates[0]}). Pass data_dir (--data-dir) as a folder "
        "with train/<class>/*.JPEG and val/<class>/*.JPEG (val sorted into class folders)"
    )


def _imagenet_bundle(
    spec: DatasetSpec, request: DataRequest
) -> tuple[EpochLoader, EpochLoader, dict[str, Any]]:
    source = FolderSource(_imagenet_root(request.data_dir))
    train_index = source.split_index("train")
    val_index = source.split_index("val", train_index.classes)
    loaders = []
    for index, subset, train in ((train_index, request.train_subset, True), (val_index, request.test_subset, False)):
        dataset = FolderDataset(
            source, index, augment=train and request.augment, seed=request.seed, size=spec.image_size, resize=spec.eval_resize
        )
        loaders.append(
            FolderLoader(
                dataset,
                balanced_subset(index.labels, subset),
                request.batch_size if train else request.eval_batch_size,
                train=train,
                seed=request.seed,
                workers=request.workers,
                mean=spec.mean,
                std=spec.std,
                device=request.device,
                skip_bad_images=request.skip_bad_images,
                rank=request.rank,
                world_size=request.world_size,
            )
        )
    info = {
        "root": str(source.root),
        "layout": source.kind,
        "md5": source.md5,
        "note": archive_note(source.md5),
        "loader": f"torch DataLoader ({request.workers} workers)",
        "classes": train_index.classes,
        "full_train_size": len(train_index.names),
        "full_test_size": len(val_index.names),
        "skipped_bad_images": None,  # not known before iterating: see DataBundle.train/test.skipped_images
        "mean": list(spec.mean),
        "std": list(spec.std),
    }
    return loaders[0], loaders[1], info


def _ffcv_bundle(spec: DatasetSpec, request: DataRequest) -> tuple[EpochLoader, EpochLoader, dict[str, Any]]:
    from .ffcv_loader import FFCVLoader

    ffcv_dir = request.ffcv_dir
    manifest = read_manifest(ffcv_dir, spec.name)
    skipped = manifest["splits"]["train"]["skipped"] + manifest["splits"]["test"]["skipped"]
    if skipped and not request.skip_bad_images:
        raise DataError(
            f"{ffcv_dir} was written with --skip-bad-images and leaves out {len(skipped)} unreadable images "
            f"(first: {skipped[0]}); pass skip_bad_images=True (--skip-bad-images) to use it"
        )
    loaders = []
    for split, subset, train in (("train", request.train_subset, True), ("test", request.test_subset, False)):
        labels = np.load(labels_path(ffcv_dir, split))
        sample_ids, _ = readable_subset(labels, subset, np.asarray(manifest["splits"][split]["excluded"], dtype=np.int64))
        loaders.append(
            FFCVLoader(
                beton_path(ffcv_dir, split),
                sample_ids,
                request.batch_size if train else request.eval_batch_size,
                family=spec.family,
                train=train,
                augment=request.augment,
                seed=request.seed,
                workers=request.workers,
                mean=spec.mean,
                std=spec.std,
                device=request.device,
                image_size=spec.image_size,
                eval_resize=spec.eval_resize,
                distributed=request.world_size > 1,
                rank=request.rank,
                world_size=request.world_size,
            )
        )
        loaders[-1].skipped_images.update(manifest["splits"][split]["skipped"])
    info = {
        **manifest["source"],
        "loader": f"ffcv ({Path(ffcv_dir)})",
        "ffcv_dir": str(ffcv_dir),
        "ffcv_image_field": manifest["image_field"],
        "classes": manifest["classes"],
        "full_train_size": manifest["splits"]["train"]["full_size"],
        "full_test_size": manifest["splits"]["test"]["full_size"],
        "skipped_bad_images": len(skipped),
        "skipped_images": skipped[:20],
        "mean": list(spec.mean),
        "std": list(spec.std),
    }
    return loaders[0], loaders[1], info


@dataclass(frozen=True)
class DataRequest:
    """Everything :func:`open_data` needs, typed (see :func:`make_data` for the meaning of each field)."""

    name: str
    data_dir: Path | None = None
    batch_size: int = 128
    eval_batch_size: int | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    seed: int = 0
    loader: str = "auto"
    ffcv_dir: Path | None = None
    workers: int = 0
    device: torch.device = torch.device("cpu")
    augment: bool = True
    skip_bad_images: bool = False
    download: bool = False
    rank: int = 0
    world_size: int = 1

    @classmethod
    def make(cls, name: str, *, data_dir: str | Path | None = None, ffcv_dir: str | Path | None = None, device: str | torch.device = "cpu", distributed: bool = False, **fields: Any) -> DataRequest:
        """A request with paths expanded, the device parsed and, when ``distributed``, this process's rank."""
        rank, world_size = distributed_rank(distributed)
        return cls(
            name,
            data_dir=None if data_dir is None else Path(data_dir).expanduser(),
            ffcv_dir=None if ffcv_dir is None else Path(ffcv_dir).expanduser(),
            device=torch.device(device),
            rank=rank,
            world_size=world_size,
            **fields,
        )


def make_data(name: str, **options: Any) -> DataBundle:
    """Train/test loaders for ``name`` ("cifar10", "imagenet" or "digits") and their provenance.

    Options (the fields of :class:`DataRequest`):

    - ``data_dir``: the local copy (see :mod:`bnnbench.data`); None searches the cache, and for
      cifar10 downloads torchvision's copy there only when ``download`` is True.
    - ``batch_size``/``eval_batch_size`` (default: the training batch).
    - ``train_subset``/``test_subset``: the first N of the fixed class-balanced order of the split.
    - ``seed``: with the epoch set by ``set_epoch``, fixes the training order and augmentation.
    - ``loader``: "torch" (CIFAR-10/digits: arrays in host memory, batches copied to the device),
      "gpu" (CIFAR-10/digits: arrays resident on the device, batches assembled there; the same
      batches bit for bit), "ffcv" (``ffcv_dir`` from ``bnnbench prepare``), or "auto" ("gpu"
      for CIFAR-10/digits on CUDA; else FFCV when ``ffcv_dir`` holds train.beton and test.beton
      and FFCV imports; else "torch").
    - ``workers``: DataLoader processes (ImageNet folders) or FFCV threads; the in-memory CIFAR
      path needs none.  ``device``: where batches are delivered (and CIFAR arrays are kept).
    - ``augment``: CIFAR crop 32 pad 4 + flip, ImageNet RandomResizedCrop 224 + flip (never digits).
    - ``distributed``: shard by ``torch.distributed`` rank like DistributedSampler.
    - ``skip_bad_images``: leave unreadable images out (counted in ``info`` and the loaders'
      ``skipped_images``) instead of raising :class:`BadImageError` naming the first one.
    """
    return open_data(DataRequest.make(name, **options))


def open_data(request: DataRequest) -> DataBundle:
    """The loaders and provenance of one :class:`DataRequest`."""
    spec = get_spec(request.name)
    if request.eval_batch_size is None:
        request = dataclasses.replace(request, eval_batch_size=request.batch_size)
    if not spec.augmentable:
        request = dataclasses.replace(request, augment=False)
    backend = _choose_backend(request.name, request.loader, request.ffcv_dir, request.device)
    resident = backend == "gpu"
    if backend == "ffcv":
        train, test, info = _ffcv_bundle(spec, request)
    elif request.name == "imagenet":
        train, test, info = _imagenet_bundle(spec, request)
    elif request.name == "cifar10":
        loaded = load_cifar10(
            request.data_dir,
            train_subset=request.train_subset,
            test_subset=request.test_subset,
            skip_bad_images=request.skip_bad_images,
            download=request.download,
        )
        train, test, info = _array_bundle(spec, loaded, request, resident)
    else:
        digits = load_digits(train_subset=request.train_subset, test_subset=request.test_subset)
        train, test, info = _array_bundle(spec, digits, request, resident)
    classes = info.pop("classes")
    info = {
        "dataset": request.name,
        "description": spec.description,
        **info,
        "family": spec.family,
        "num_classes": len(classes),
        "classes": classes,
        "image_size": spec.image_size,
        "augment": request.augment,
        "train_subset": request.train_subset,
        "test_subset": request.test_subset,
        "train_size": train.num_samples,
        "test_size": test.num_samples,
        "subset_seed": SUBSET_SEED,
        "seed": request.seed,
        "batch_size": request.batch_size,
        "eval_batch_size": request.eval_batch_size,
        "distributed": {"rank": request.rank, "world_size": request.world_size},
    }
    return DataBundle(train, test, len(classes), spec.family, train.num_samples, test.num_samples, info, classes)
