"""``bnnbench prepare``: write a data set's train/test splits as FFCV .beton files."""

from __future__ import annotations

import importlib.metadata
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .cifar import load_cifar10
from .errors import DataError, DataNotFoundError
from .ffcv_store import (
    FFCV_DATASETS,
    CIFAR_FIELD,
    DEFAULT_PAGE_SIZE,
    IMAGENET_FIELD,
    ArraySamples,
    FileSamples,
    ImageFieldSettings,
    SplitRecord,
    check_page_size,
    ffcv_missing_reason,
    staged_output,
    write_manifest,
    write_split,
)
from .sampling import balanced_subset
from .sources import FolderSource, archive_note
from .specs import get_spec



def prepare_betons(
    name: str,
    data_dir: Path | None,
    out: Path,
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    workers: int = 1,
    skip_bad_images: bool = False,
    image_field: ImageFieldSettings | None = None,
) -> dict[str, Any]:
    """Write ``out/train.beton`` and ``out/test.beton`` (+ labels and manifest); return the manifest.

    Subsets are the same class-balanced subsets ``make_data`` picks, stored in the same order, so
    ``make_data(..., loader="ffcv")`` on them yields the batches the torch loader yields.
    """
    if name not in FFCV_DATASETS:
        raise DataError(f"bnnbench prepare writes {' or '.join(FFCV_DATASETS)}, not {name!r}")
    reason = ffcv_missing_reason()
    if reason:
        raise DataError(reason)
    check_page_size(page_size)
    spec = get_spec(name)
    common = {"page_size": page_size, "workers": workers, "skip_bad_images": skip_bad_images}
    records: dict[str, SplitRecord] = {}
    with staged_output(Path(out)) as stage:
        if name == "cifar10":
            field = image_field or CIFAR_FIELD
            loaded = load_cifar10(
                data_dir, train_subset=train_subset, test_subset=test_subset, skip_bad_images=skip_bad_images, download=False
            )
            classes, provenance = loaded.train.classes, loaded.provenance
            for split, arrays, subset in (("train", loaded.train, train_subset), ("test", loaded.test, test_subset)):
                samples = ArraySamples(arrays.images, arrays.labels)
                records[split] = write_split(
                    stage,
                    split,
                    samples,
                    arrays.labels,
                    field,
                    full_size=arrays.full_size,
                    subset=subset,
                    skipped=arrays.skipped,
                    **common,
                )
        else:
            if data_dir is None or not Path(data_dir).is_dir():
                raise DataNotFoundError(
                    f"ImageNet needs --data-dir: a folder with train/<class>/ and val/<class>/ images (got {data_dir})"
                )
            field = image_field or IMAGENET_FIELD
            source = FolderSource(Path(data_dir))
            train_index = source.split_index("train")
            classes = train_index.classes
            provenance = {"root": str(source.root), "layout": source.kind, "md5": source.md5, "note": archive_note(source.md5)}
            for split, index, subset in (
                ("train", train_index, train_subset),
                ("test", source.split_index("val", classes), test_subset),
            ):
                chosen = balanced_subset(index.labels, subset)
                labels = index.labels[chosen]
                with tempfile.TemporaryDirectory(dir=stage) as log_dir:
                    samples = FileSamples(source, [index.names[i] for i in chosen], labels, Path(log_dir))
                    records[split] = write_split(
                        stage, split, samples, labels, field, full_size=len(index.names), subset=subset, skipped=[], **common
                    )
        manifest = {
            "format": 1,
            "dataset": name,
            "family": spec.family,
            "classes": classes,
            "source": provenance,
            "image_field": asdict(field),
            "page_size": page_size,
            "ffcv_version": importlib.metadata.version("ffcv"),
        }
        return write_manifest(stage, manifest, records)
