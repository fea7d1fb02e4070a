"""Augmentation and normalisation.

Batches travel as uint8 NHWC (the layout images decode to, and what FFCV yields); they become
float32 NCHW only at the end, in :func:`normalize_nhwc`, on the target device.

- CIFAR: random crop 32 with 4-pixel zero padding + horizontal flip, done for a whole batch at
  once as one gather (:func:`crop_flip_nhwc`), with offsets drawn from a seeded generator.
- ImageNet: RandomResizedCrop (scale 0.08-1, aspect 3/4-4/3, Inception-style sampling) to 224 +
  flip per image; eval: resize the shorter side to 256, centre crop 224.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

CIFAR_PADDING = 4
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)


def draw_crop_flip(batch_size: int, padding: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image crop offsets (B, 2) in [0, 2*padding] and flip flags (B,) from ``generator``."""
    offsets = torch.randint(0, 2 * padding + 1, (batch_size, 2), generator=generator)
    flips = torch.randint(0, 2, (batch_size,), generator=generator).bool()
    return offsets, flips


def pad_nhwc(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad the height and width of (N, H, W, C) images by ``padding`` on each side."""
    return F.pad(images, (0, 0, padding, padding, padding, padding))


def crop_flip_nhwc(
    padded: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int
) -> torch.Tensor:
    """Crops of images ``index`` of a zero-padded (N, H+2p, W+2p, C) tensor at ``offsets`` (row, col), mirrored where ``flips``.

    Image by image this is torchvision's ``RandomCrop(H, padding=p)`` then ``RandomHorizontalFlip``.
    Here it is one index into the (N, 2p+1, 2p+1, C, H, W) window view of ``padded`` (which also
    gathers the batch) and one masked mirror: few tensor ops per batch, so little time waiting for
    intra-op threads on a busy machine.  Returns (B, H, W, C) (a view of contiguous (B, C, H, W)).
    """
    device = padded.device
    index, offsets, flips = index.to(device), offsets.to(device), flips.to(device)
    h, w = padded.shape[1] - 2 * padding, padded.shape[2] - 2 * padding
    crops = padded.unfold(1, h, 1).unfold(2, w, 1)[index, offsets[:, 0], offsets[:, 1]]  # (B, C, H, W)
    crops = torch.where(flips[:, None, None, None], crops.flip(-1), crops)
    return crops.permute(0, 2, 3, 1)


def normalize_nhwc(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) contiguous, ``(x / 255 - mean) / std`` per channel.

    ``mean`` and ``std`` are float32 tensors of shape (C,) in [0, 1] units on the images' device;
    computed as ``x * (1 / (255 std)) - mean / std`` in one fused op after the conversion.
    """
    out = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
    shift = (-mean / std).view(1, -1, 1, 1)
    return torch.addcmul(shift, out, scale, out=out)


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering 8-100% of the area with aspect ratio in [3/4, 4/3].

    Ten tries at a random (area, log-uniform aspect) that fits; otherwise the largest centred crop
    with the aspect ratio clamped into range (the Inception / torchvision RandomResizedCrop rule).
    """
    area = height * width
    log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*RRC_SCALE)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height
    if ratio < RRC_RATIO[0]:
        w, h = width, round(width / RRC_RATIO[0])
    elif ratio > RRC_RATIO[1]:
        w, h = round(height * RRC_RATIO[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def imagenet_train_view(image: torch.Tensor, rng: np.random.Generator, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (size, size, 3) uint8: random resized crop, then a horizontal flip half the time."""
    top, left, h, w = random_resized_crop_box(rng, image.shape[1], image.shape[2])
    view = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    if rng.random() < 0.5:
        view = TF.horizontal_flip(view)
    return view.permute(1, 2, 0).contiguous()


def imagenet_eval_view(image: torch.Tensor, size: int, resize: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (size, size, 3) uint8: shorter side to ``resize``, centre crop ``size``."""
    view = TF.center_crop(TF.resize(image, [resize], antialias=True), [size, size])
    return view.permute(1, 2, 0).contiguous()
