"""scikit-learn's bundled handwritten digits as a 32x32 RGB data set: the offline demo.

1,797 grey 8x8 digits (values 0-16) are scaled to 0-255, upsampled bilinearly to 32x32 and
repeated over 3 channels so the CIFAR backbones take them unchanged.  The test split is the
first 20% of the fixed class-balanced order (about 36 per class); the normalisation
statistics are those of the training split.  A demo, not a benchmark.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .decoded import LoadedSplits, SplitArrays
from .sampling import balanced_order, balanced_subset

IMAGE_SIZE = 32
TEST_FRACTION = 0.2


def load_digits(*, train_subset: int | None, test_subset: int | None) -> LoadedSplits:
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    grey = torch.from_numpy(raw.images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    big = F.interpolate(grey, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = big.round().clamp(0, 255).to(torch.uint8).squeeze(1).unsqueeze(-1).expand(-1, -1, -1, 3).contiguous().numpy()
    labels = raw.target.astype(np.int64)
    classes = [str(c) for c in range(10)]

    n_test = round(TEST_FRACTION * len(labels))
    test_idx = np.sort(balanced_order(labels)[:n_test])
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)

    def split(idx: np.ndarray, subset: int | None) -> SplitArrays:
        chosen = idx[balanced_subset(labels[idx], subset)]
        return SplitArrays(images[chosen], labels[chosen], classes, len(idx))

    # normalisation statistics of the whole training split (grey: the same for the 3 channels)
    train_pixels = images[train_idx, :, :, 0].astype(np.float64) / 255.0
    mean, std = float(train_pixels.mean()), float(train_pixels.std())
    return LoadedSplits(
        split(train_idx, train_subset),
        split(test_idx, test_subset),
        {"root": "sklearn.datasets.load_digits", "layout": "sklearn", "md5": None, "note": "digits demo (not a benchmark)"},
        mean=(mean,) * 3,
        std=(std,) * 3,
    )
