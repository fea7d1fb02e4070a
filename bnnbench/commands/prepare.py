"""``bnnbench prepare``: write FFCV .beton files for ``bnnbench run --loader ffcv``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.ffcv_store import DEFAULT_PAGE_SIZE, FFCV_DATASETS, IMAGENET_FIELD, ImageFieldSettings

HELP = "write a data set's train/test splits as FFCV .beton files (for --loader ffcv)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, choices=FFCV_DATASETS, help="data set to write")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="cifar10: folder with cifar-10-batches-py/ or train/ test/ image folders, or a .tar of them "
        "(default: the bnnbench cache); imagenet: folder with train/ and val/ class folders",
    )
    parser.add_argument(
        "--ffcv-dir", "--out", dest="ffcv_dir", type=Path, required=True, help="folder for train.beton, test.beton, labels and the manifest (bnnbench run --ffcv-dir reads it)"
    )
    parser.add_argument(
        "--train-subset", type=int, default=None, metavar="N", help="write only the first N of the class-balanced training order"
    )
    parser.add_argument(
        "--test-subset", type=int, default=None, metavar="M", help="write only the first M of the class-balanced test order"
    )
    parser.add_argument(
        "--page-size",
        type=int,
        default=DEFAULT_PAGE_SIZE,
        help=f"FFCV page size in bytes, a power of two >= 2 MiB (default {DEFAULT_PAGE_SIZE}); use 2097152 for small files",
    )
    parser.add_argument("--workers", type=int, default=1, help="writer processes (default 1)")
    parser.add_argument(
        "--skip-bad-images", action="store_true", help="leave out unreadable images (counted) instead of stopping"
    )
    imagenet = parser.add_argument_group("ImageNet storage (as FFCV's ImageNet example)")
    imagenet.add_argument(
        "--max-resolution", type=int, default=IMAGENET_FIELD.max_resolution, help="longest side kept (default %(default)s)"
    )
    imagenet.add_argument(
        "--jpeg-quality", type=int, default=IMAGENET_FIELD.jpeg_quality, help="JPEG quality (default %(default)s)"
    )
    imagenet.add_argument(
        "--compress-probability",
        type=float,
        default=IMAGENET_FIELD.compress_probability,
        help="share of images stored as JPEG, the rest raw (default %(default)s)",
    )


def main(args: argparse.Namespace) -> int:
    from ..data.ffcv_prepare import prepare_betons
    from ..preflight import writable_folder

    writable_folder(args.ffcv_dir, "--ffcv-dir")
    image_field = None
    if args.data == "imagenet":
        image_field = ImageFieldSettings(
            write_mode="proportion",
            max_resolution=args.max_resolution,
            jpeg_quality=args.jpeg_quality,
            compress_probability=args.compress_probability,
        )
    manifest = prepare_betons(
        args.data,
        args.data_dir,
        args.ffcv_dir,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        page_size=args.page_size,
        workers=args.workers,
        skip_bad_images=args.skip_bad_images,
        image_field=image_field,
    )
    for split, record in manifest["splits"].items():
        skipped = f", {len(record['skipped'])} unreadable images skipped" if record["skipped"] else ""
        print(f"{args.ffcv_dir / (split + '.beton')}: {record['samples']} images{skipped}")
    if manifest["source"].get("note"):
        print(f"note: {manifest['source']['note']}")
    return 0
