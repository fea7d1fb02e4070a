"""FFCV ``.beton`` files written by ``bnnbench prepare``: layout, manifest, writing.

``<out>/train.beton`` and ``<out>/test.beton`` (ImageNet's val split is written as test.beton),
``<out>/{train,test}_labels.npy`` and ``<out>/bnnbench-ffcv.json`` (the manifest: classes,
provenance, write settings, images excluded as unreadable).  The manifest is removed first and
written last, so its presence means a complete set of files; everything is written into a staging
folder first, so a failed run leaves a previous set untouched.

CIFAR images are stored raw (exact pixels, 3 KiB each).  ImageNet images are stored as FFCV's
ImageNet example does: longest side capped (default 500 px), a share of them (default 50%)
JPEG-compressed at quality 90 (``write_mode="proportion"``).  FFCV's pages are at least 2 MiB and
each writer process fills its own pages, so a tiny test file still takes a few MiB.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..io import read_json, write_json
from .cache import save_array
from .errors import BadImageError, DataError, DataNotFoundError
from .images import decode_rgb
from .sources import FolderSource

FFCV_DATASETS = ("cifar10", "imagenet")  # what bnnbench prepare writes and the FFCV loader reads

MANIFEST = "bnnbench-ffcv.json"
SPLITS = ("train", "test")
MIN_PAGE_SIZE = 1 << 21  # FFCV's smallest page (2 MiB)
DEFAULT_PAGE_SIZE = 1 << 23  # FFCV's default (4 x 2 MiB)


def beton_path(ffcv_dir: Path, split: str) -> Path:
    return Path(ffcv_dir) / f"{split}.beton"


def labels_path(ffcv_dir: Path, split: str) -> Path:
    return Path(ffcv_dir) / f"{split}_labels.npy"


def betons_present(ffcv_dir: Path | None) -> bool:
    """True when ``ffcv_dir`` holds both train.beton and test.beton."""
    return ffcv_dir is not None and all(beton_path(ffcv_dir, s).is_file() for s in SPLITS)


def ffcv_missing_reason() -> str | None:
    """None when FFCV imports, else why not and how to install it."""
    try:
        import ffcv.loader  # noqa: F401
    except ImportError as exc:
        return (
            f"FFCV is not usable ({exc}). Install it with: apt-get install -y --no-install-recommends "
            "libopencv-dev libturbojpeg0-dev && pip install ffcv==1.0.2 (or pip install 'bnnbench[ffcv]')"
        )
    return None


def read_manifest(ffcv_dir: Path, dataset: str) -> dict[str, Any]:
    """The manifest of ``ffcv_dir``; a clear error when it is missing or for another data set."""
    path = Path(ffcv_dir) / MANIFEST
    if not path.is_file():
        raise DataNotFoundError(
            f"{path} is missing: {ffcv_dir} does not hold a complete set written by `bnnbench prepare` "
            f"(rerun: bnnbench prepare --data {dataset} --data-dir DIR --out {ffcv_dir})"
        )
    manifest = read_json(path)
    if manifest["dataset"] != dataset:
        raise DataError(f"{ffcv_dir} holds {manifest['dataset']!r} .beton files, not {dataset!r}")
    return manifest


@dataclass(frozen=True)
class ImageFieldSettings:
    """How ``RGBImageField`` stores images (see FFCV's documentation of the field)."""

    write_mode: str = "raw"
    max_resolution: int | None = None
    jpeg_quality: int = 90
    compress_probability: float = 0.5

    def field(self):
        from ffcv.fields import RGBImageField

        return RGBImageField(
            write_mode=self.write_mode,
            max_resolution=self.max_resolution,
            jpeg_quality=self.jpeg_quality,
            compress_probability=self.compress_probability,
        )


CIFAR_FIELD = ImageFieldSettings(write_mode="raw")
IMAGENET_FIELD = ImageFieldSettings(write_mode="proportion", max_resolution=500, jpeg_quality=90, compress_probability=0.5)


class ArraySamples:
    """(HWC uint8 image, label) pairs from decoded arrays, for ``DatasetWriter.from_indexed_dataset``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


class FileSamples:
    """(HWC uint8 image, label) pairs decoded from image files inside FFCV's writer processes.

    FFCV's writer waits forever when a worker raises, so no exception leaves ``__getitem__``: the
    failure is logged to ``log_dir`` (one JSON line per image) and an 8x8 black placeholder takes
    the image's place; after writing, :func:`write_split` raises or excludes those positions.
    """

    PLACEHOLDER = np.zeros((8, 8, 3), dtype=np.uint8)

    def __init__(self, source: FolderSource, names: list[str], labels: np.ndarray, log_dir: Path) -> None:
        self.source, self.names, self.labels, self.log_dir = source, names, labels, Path(log_dir)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        name = self.names[i]
        try:
            image = decode_rgb(self.source.read(name), self.source.display(name))
        except BadImageError as exc:
            self._log({"position": int(i), "path": exc.path, "reason": exc.reason, "unreadable": True})
            image = self.PLACEHOLDER
        except Exception as exc:  # anything else is a bug or an environment problem: reported, never skipped
            self._log(
                {
                    "position": int(i),
                    "path": self.source.display(name),
                    "reason": f"{type(exc).__name__}: {exc}",
                    "unreadable": False,
                }
            )
            image = self.PLACEHOLDER
        return image, int(self.labels[i])

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.log_dir / f"{os.getpid()}.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")

    def failures(self) -> list[dict[str, Any]]:
        """The logged failures, by position."""
        records = [json.loads(line) for log in self.log_dir.glob("*.jsonl") for line in log.read_text().splitlines()]
        return sorted(records, key=lambda r: r["position"])


def _waiting_for_workers(thread_id: int) -> bool:
    """True while ``thread_id`` sits in the polling loop of FFCV's ``DatasetWriter._write_common``."""
    frame = sys._current_frames().get(thread_id)
    return frame is not None and frame.f_code.co_name == "_write_common"


class _WriterDied(Exception):
    """Raised in the main thread by the watchdog's signal when a writer process has died."""


def _raise_writer_died(signum: int, frame: Any) -> None:
    raise _WriterDied


@contextlib.contextmanager
def _writer_watchdog(grace_s: float = 5.0) -> Iterator[None]:
    """Turn FFCV's endless wait for a crashed writer process into an error.

    FFCV's ``DatasetWriter`` polls a counter until every sample is written; if a worker process
    dies, it polls forever.  A watcher thread interrupts the main thread when it has been polling
    for ``grace_s`` seconds with no worker process alive.  It interrupts with SIGUSR2 and a
    handler installed for the duration, not with SIGINT: a process started in the background
    by a shell (``nohup ... &``, some CI runners) ignores SIGINT, and a real Ctrl-C stays a
    ``KeyboardInterrupt``.  Off the main thread no handler can be installed and the wait is
    left as FFCV has it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    main_id = threading.get_ident()
    finished = threading.Event()

    def watch() -> None:
        idle_since = None
        while not finished.wait(0.5):
            if multiprocessing.active_children() or not _waiting_for_workers(main_id):
                idle_since = None
                continue
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > grace_s:
                _thread.interrupt_main(signal.SIGUSR2)
                return

    previous = signal.signal(signal.SIGUSR2, _raise_writer_died)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    except _WriterDied:
        raise DataError("an FFCV writer process died before finishing (see its traceback above); nothing was written") from None
    finally:
        finished.set()
        watcher.join()
        signal.signal(signal.SIGUSR2, previous)


def check_page_size(page_size: int) -> None:
    if page_size < MIN_PAGE_SIZE or page_size & (page_size - 1):
        raise DataError(f"page_size must be a power of two of at least {MIN_PAGE_SIZE} bytes (2 MiB), got {page_size}")


def write_beton(
    path: Path, samples: ArraySamples | FileSamples, settings: ImageFieldSettings, *, page_size: int, workers: int
) -> None:
    """Write ``samples`` as fields ``image`` and ``label`` to ``path``."""
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    check_page_size(page_size)
    writer = DatasetWriter(
        str(path), {"image": settings.field(), "label": IntField()}, page_size=page_size, num_workers=max(1, workers)
    )
    with _writer_watchdog():
        writer.from_indexed_dataset(samples, chunksize=100)


@dataclass
class SplitRecord:
    """What the manifest says about one written split."""

    samples: int
    full_size: int
    subset: int | None
    excluded: list[int]  # positions in the .beton holding placeholders for unreadable images
    skipped: list[str]  # their paths


def write_split(
    stage: Path,
    split: str,
    samples: ArraySamples | FileSamples,
    labels: np.ndarray,
    settings: ImageFieldSettings,
    *,
    full_size: int,
    subset: int | None,
    skipped: list[str],
    skip_bad_images: bool,
    page_size: int,
    workers: int,
) -> SplitRecord:
    """Write one split's .beton and labels into ``stage``; unreadable files raise unless ``skip_bad_images``."""
    write_beton(beton_path(stage, split), samples, settings, page_size=page_size, workers=workers)
    failures = samples.failures() if isinstance(samples, FileSamples) else []
    errors = [r for r in failures if not r["unreadable"]]
    if errors:
        raise DataError(f"reading {errors[0]['path']} failed with {errors[0]['reason']} ({len(errors)} such failures)")
    bad = [r for r in failures if r["unreadable"]]
    if bad and not skip_bad_images:
        more = f" (and {len(bad) - 1} more unreadable images)" if len(bad) > 1 else ""
        raise BadImageError(bad[0]["path"], bad[0]["reason"] + more)
    save_array(labels_path(stage, split), labels)
    return SplitRecord(len(labels), full_size, subset, [r["position"] for r in bad], skipped + [r["path"] for r in bad])


@contextlib.contextmanager
def staged_output(ffcv_dir: Path) -> Iterator[Path]:
    """A staging folder inside ``ffcv_dir`` whose files replace the old set only when everything succeeded.

    On success the .beton and label files are renamed into ``ffcv_dir`` and the manifest last (the
    old manifest is removed first, so a mixed set is never taken as complete).  On failure the
    staging folder is deleted and a previous set stays as it was.
    """
    ffcv_dir = Path(ffcv_dir)
    ffcv_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=ffcv_dir))
    try:
        yield stage
        with contextlib.suppress(FileNotFoundError):
            (ffcv_dir / MANIFEST).unlink()
        for split in SPLITS:
            for path in (beton_path(stage, split), labels_path(stage, split)):
                os.replace(path, ffcv_dir / path.name)
        os.replace(stage / MANIFEST, ffcv_dir / MANIFEST)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_manifest(stage: Path, manifest: dict[str, Any], records: dict[str, SplitRecord]) -> dict[str, Any]:
    """Write the manifest (with each split's record) into ``stage``; return it."""
    manifest = {**manifest, "splits": {s: asdict(r) for s, r in records.items()}}
    write_json(Path(stage) / MANIFEST, manifest)
    return manifest
