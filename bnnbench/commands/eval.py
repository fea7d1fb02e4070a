"""``bnnbench eval --packed FILE --data cifar10``: accuracy and speed of a packed model against its float path."""

from __future__ import annotations

import argparse
import time

from ._arguments import at_least

HELP = "evaluate a packed model (from `bnnbench export --packed`) on a test set: accuracy, agreement with the float path, images/s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--packed", required=True, metavar="FILE", help="packed model written by `bnnbench export RUN_DIR --packed`")
    parser.add_argument("--data", required=True, help="data set: cifar10, imagenet or digits")
    parser.add_argument("--data-dir", default=None, help="data location (see `bnnbench run --help`); default: the bnnbench cache")
    parser.add_argument("--test-subset", type=at_least(1), default=None, metavar="N", help="evaluate the first N test images of the class-balanced order")
    parser.add_argument("--batch-size", type=at_least(1), default=100, help="images per batch (default: 100)")
    parser.add_argument("--threads", type=at_least(1), default=1, help="threads for torch and numba (default: 1)")
    parser.add_argument("--no-compare", action="store_true", help="skip the float path (the same bits through F.conv2d)")


def main(args: argparse.Namespace) -> int:
    import numba
    import torch
    from rich.console import Console
    from rich.table import Table

    from ..data import make_data
    from ..packed import load_packed, set_backend

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    model = load_packed(args.packed)
    reference = None if args.no_compare else set_backend(load_packed(args.packed), "float")
    data = make_data(args.data, data_dir=args.data_dir, batch_size=args.batch_size, test_subset=args.test_subset, augment=False, loader="torch")
    classes = model.spec.num_classes
    if data.num_classes != classes:
        raise ValueError(f"the model has {classes} classes but {args.data} has {data.num_classes}")
    seen = top1 = top5 = agree = 0
    seconds = {"xnor": 0.0, "float": 0.0}
    max_difference = 0.0
    with torch.no_grad():
        for images, labels in data.test:
            start = time.perf_counter()
            logits = model(images)
            seconds["xnor"] += time.perf_counter() - start
            best5 = logits.topk(min(5, classes), dim=1).indices
            top1 += int((best5[:, 0] == labels).sum())
            top5 += int((best5 == labels[:, None]).any(dim=1).sum())
            seen += len(labels)
            if reference is not None:
                start = time.perf_counter()
                expected = reference(images)
                seconds["float"] += time.perf_counter() - start
                agree += int((expected.argmax(1) == best5[:, 0]).sum())
                max_difference = max(max_difference, float((expected - logits).abs().max()))
    table = Table(title=f"{args.packed} on {args.data} ({seen} test images, batch {args.batch_size}, {args.threads} thread(s))")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("top-1 / top-5 (packed)", f"{100 * top1 / seen:.2f}% / {100 * top5 / seen:.2f}%")
    table.add_row("images/s, packed XNOR-popcount", f"{seen / seconds['xnor']:.1f}")
    if reference is not None:
        table.add_row("images/s, float path (F.conv2d of the same +-1 weights)", f"{seen / seconds['float']:.1f}")
        table.add_row("speed-up", f"{seconds['float'] / seconds['xnor']:.2f}x")
        table.add_row("argmax agreement with the float path", f"{agree}/{seen}")
        table.add_row("max |logit difference|", f"{max_difference:.2e}")
    Console().print(table)
    return 0 if reference is None or agree == seen else 1
