"""The data sets bnnbench knows: classes, image size, normalisation, augmentation family."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DataError


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about one data set.

    ``mean``/``std`` are per channel in [0, 1] units; ``None`` means they are computed from the
    training split when the data are loaded (digits).  ``family`` selects the backbone stem and
    the augmentation: "cifar" (32x32, random crop with 4-pixel zero padding + horizontal flip)
    or "imagenet" (RandomResizedCrop 224 + flip; eval resize 256, centre crop 224).
    """

    name: str
    family: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    augmentable: bool
    description: str
    eval_resize: int | None = None


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        name="cifar10",
        family="cifar",
        num_classes=10,
        image_size=32,
        # per-channel statistics of the 50,000 CIFAR-10 training images
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        augmentable=True,
        description="CIFAR-10: torchvision's cifar-10-batches-py, an image folder train/ test/, or a .tar of one",
    ),
    "imagenet": DatasetSpec(
        name="imagenet",
        family="imagenet",
        num_classes=1000,
        image_size=224,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        augmentable=True,
        description="ImageNet (ILSVRC-2012) as an image folder: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG",
        eval_resize=256,
    ),
    "digits": DatasetSpec(
        name="digits",
        family="cifar",
        num_classes=10,
        image_size=32,
        mean=None,
        std=None,
        augmentable=False,
        description="scikit-learn's bundled 8x8 handwritten digits upsampled to 32x32 RGB: an offline demo, not a benchmark",
    ),
}


def get_spec(name: str) -> DatasetSpec:
    """The spec of ``name``, or a clear error listing the known data sets."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}") from None
