"""Data for bnnbench: CIFAR-10, ImageNet and the offline digits demo, through torch or FFCV.

::

    from bnnbench.data import make_data
    bundle = make_data("cifar10", data_dir="~/data/cifar10-jpeg.tar", batch_size=128, train_subset=1000)
    for epoch in range(epochs):
        bundle.set_epoch(epoch)
        for images, labels in bundle.train: ...

``data_dir`` for cifar10 is a folder holding ``cifar-10-batches-py/`` (torchvision), a folder with
``train/<class>/*`` and ``test/<class>/*`` images, or a ``.tar`` of such a folder (read in place).
With ``data_dir=None`` the cache (``$BNNBENCH_CACHE`` or ``~/.cache/bnnbench``) is searched, and
torchvision's copy is downloaded there only with ``download=True``.  ImageNet is a folder with
``train/<class>/`` and ``val/<class>/``.  ``digits`` is scikit-learn's bundled 8x8 digits at 32x32:
an offline demo, not a benchmark.

Subsets are the first N of a fixed class-balanced order (N=100 -> 10 per class), the same for
every run seed.  Training order and augmentation are pure functions of (seed, epoch), set with
``DataBundle.set_epoch``.  With ``loader="ffcv"`` (or "auto" when ``ffcv_dir`` holds the .beton
files written by ``bnnbench prepare``) FFCV decodes the images.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "DataBundle": "bundle",
    "DataRequest": "bundle",
    "make_data": "bundle",
    "open_data": "bundle",
    "BadImageError": "errors",
    "DataError": "errors",
    "DataNotFoundError": "errors",
    "balanced_order": "sampling",
    "balanced_subset": "sampling",
    "extract_archive": "sources",
    "DATASETS": "specs",
    "DatasetSpec": "specs",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)  # the loaders need torch; the data set table does not
