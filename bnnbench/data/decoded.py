"""Small images decoded once into a uint8 array cache (the CIFAR fast path).

A split of small fixed-size images (CIFAR-10: 60,000 JPEGs of 32x32) is decoded once into
``<cache>/decoded/<dataset>-<key>/<split>/images.npy`` (N, H, W, 3 uint8) plus ``labels.npy``;
the key is the tar's md5 or a fingerprint of the folder's files.  Later runs memory-map it.
A subset asked for before the full cache exists is decoded directly (a few hundred images
take milliseconds), without building the cache.  Either way the subset is drawn from the split's
full index, the unreadable images among it then left out (``skip_bad_images``), so one command
selects the same images before and after the cache exists.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io import read_json, write_json
from .cache import atomic_directory, cache_root, save_array
from .errors import BadImageError, DataError
from .images import decode_rgb
from .sampling import balanced_subset, readable_subset
from .sources import FolderSource, SplitIndex, TarSource


@dataclass
class SplitArrays:
    """Decoded images (N, H, W, 3 uint8) and int64 labels of one split, with where they came from."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    full_size: int  # images in the whole split (before the subset)
    skipped: list[str] = field(default_factory=list)  # unreadable images left out (skip_bad_images=True)
    cache: str | None = None  # decode-cache folder when one was used


@dataclass
class LoadedSplits:
    """Decoded train and test splits, provenance for ``DataBundle.info``, and data-derived statistics.

    ``mean``/``std`` are set when the data set's normalisation is computed from its training split.
    """

    train: SplitArrays
    test: SplitArrays
    provenance: dict[str, Any]
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


def _decode_many(
    source: FolderSource | TarSource, names: list[str], size: int
) -> tuple[np.ndarray, np.ndarray, list[BadImageError]]:
    """Decode ``names`` into (images, kept positions, errors); every image must be ``size`` x ``size``."""
    images = np.empty((len(names), size, size, 3), dtype=np.uint8)
    kept, bad = [], []
    for i, name in enumerate(names):
        try:
            pixels = decode_rgb(source.read(name), source.display(name))
        except BadImageError as exc:
            bad.append(exc)
            continue
        if pixels.shape[:2] != (size, size):
            raise DataError(f"image {source.display(name)} is {pixels.shape[1]}x{pixels.shape[0]}, expected {size}x{size}")
        images[len(kept)] = pixels
        kept.append(i)
    return images[: len(kept)], np.asarray(kept, dtype=np.int64), bad


def _raise_for_bad(bad: list[str], reasons: list[str]) -> None:
    """Raise for the first unreadable image, counting the others."""
    more = f" (and {len(bad) - 1} more unreadable images)" if len(bad) > 1 else ""
    raise BadImageError(bad[0], reasons[0] + more)


def cache_folder(dataset: str, key: str, split: str) -> Path:
    return cache_root() / "decoded" / f"{dataset}-{key}" / split


def build_cache(dataset: str, source: FolderSource | TarSource, index: SplitIndex, size: int, skip_bad_images: bool) -> Path:
    """Decode every image of ``index`` into the cache; unreadable images raise unless ``skip_bad_images``."""
    target = cache_folder(dataset, source.fingerprint(index), index.split)
    if target.is_dir():
        return target
    start = time.perf_counter()
    images, kept, bad = _decode_many(source, index.names, size)
    if bad and not skip_bad_images:
        _raise_for_bad([e.path for e in bad], [e.reason for e in bad])
    with atomic_directory(target) as tmp:
        save_array(tmp / "images.npy", images)
        save_array(tmp / "labels.npy", index.labels[kept])
        write_json(
            tmp / "meta.json",
            {
                "classes": index.classes,
                "full_size": len(index.names),
                "skipped": [e.path for e in bad],
                "skipped_reasons": [e.reason for e in bad],
                "source": source.display(""),
                "build_seconds": round(time.perf_counter() - start, 3),
            },
        )
    return target


def _from_cache(
    folder: Path, source: FolderSource | TarSource, index: SplitIndex, subset: int | None, skip_bad_images: bool
) -> SplitArrays:
    """The subset of ``index`` read from its decode cache, which holds the split's readable images in order."""
    meta = read_json(folder / "meta.json")
    if meta["classes"] != index.classes:
        raise DataError(f"decode cache {folder} has classes {meta['classes']}, the source has {index.classes}; delete the cache folder")
    displays = np.array([source.display(name) for name in index.names])
    unreadable = np.flatnonzero(np.isin(displays, meta["skipped"]))
    rows = np.setdiff1d(np.arange(len(index.names)), unreadable)  # full-index position of each cached image
    labels = np.load(folder / "labels.npy")
    if len(labels) != len(rows) or not np.array_equal(labels, index.labels[rows]):
        raise DataError(f"decode cache {folder} does not match the images of {source.display('')}; delete the cache folder")
    kept, dropped = readable_subset(index.labels, subset, unreadable)
    if len(dropped) and not skip_bad_images:
        reasons = dict(zip(meta["skipped"], meta["skipped_reasons"]))
        _raise_for_bad(displays[dropped].tolist(), [reasons[d] for d in displays[dropped].tolist()])
    images = np.load(folder / "images.npy", mmap_mode="r")
    cached = np.searchsorted(rows, kept)
    return SplitArrays(
        np.ascontiguousarray(images[cached]), labels[cached], index.classes, meta["full_size"], displays[dropped].tolist(), str(folder)
    )


def load_split(
    dataset: str,
    source: FolderSource | TarSource,
    split: str,
    *,
    classes: list[str] | None,
    subset: int | None,
    size: int,
    skip_bad_images: bool,
) -> SplitArrays:
    """Images of ``split``: the first ``subset`` of the class-balanced order (all when None), sorted.

    Uses the decode cache when it exists (or builds it when the whole split is asked for);
    otherwise decodes only the subset.  Unreadable images raise :class:`BadImageError` naming the
    file, or with ``skip_bad_images`` are left out and listed in ``skipped``.
    """
    index = source.split_index(split, classes)
    folder = cache_folder(dataset, source.fingerprint(index), split)
    if subset is None and not folder.is_dir():
        folder = build_cache(dataset, source, index, size, skip_bad_images)
    if folder.is_dir():
        return _from_cache(folder, source, index, subset, skip_bad_images)
    chosen = balanced_subset(index.labels, subset)
    images, kept, bad = _decode_many(source, [index.names[i] for i in chosen], size)
    if bad and not skip_bad_images:
        _raise_for_bad([e.path for e in bad], [e.reason for e in bad])
    return SplitArrays(images, index.labels[chosen][kept], index.classes, len(index.names), [e.path for e in bad])
