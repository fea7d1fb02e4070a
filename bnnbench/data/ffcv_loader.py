"""Batches from FFCV .beton files, in the same order as the torch loaders.

FFCV decodes (and on CUDA moves) the images; the batch plan is ours: the FFCV loader is given a
traversal order that returns :meth:`EpochLoader.position_batches`, so for the same (seed, epoch)
it visits exactly the samples, in exactly the order, the torch loaders do.

Determinism: the order is a pure function of (seed, epoch) (FFCV's own RANDOM order is too:
``numpy.random.default_rng(seed + epoch)``, but it differs from ours).  CIFAR crop/flip run
here, after FFCV, with the same seeded generator as :class:`ArrayLoader`: batches are
bit-identical to the torch path.  ImageNet's RandomResizedCrop runs inside FFCV's decoder and its
flip in FFCV's ``RandomHorizontalFlip``; both draw from numba's per-thread RNG, which FFCV does
not seed, so ImageNet augmentation through FFCV is not reproducible (the order is).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import (
    CenterCropRGBImageDecoder,
    RandomResizedCropRGBImageDecoder,
    SimpleRGBImageDecoder,
)
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import (
    NormalizeImage,
    RandomHorizontalFlip,
    Squeeze,
    ToDevice,
    ToTensor,
    ToTorchImage,
)
from ffcv.traversal_order.base import TraversalOrder

from .errors import DataError
from .loaders import Batch, EpochLoader
from .sampling import STREAM_AUGMENT, generator
from .transforms import (
    CIFAR_PADDING,
    crop_flip_nhwc,
    draw_crop_flip,
    normalize_nhwc,
    pad_nhwc,
)


class _PlannedOrder(TraversalOrder):
    """FFCV traversal order that replays a :class:`EpochLoader`'s batch plan over .beton sample ids."""

    def __init__(self, loader: Loader, plan: EpochLoader, sample_ids: np.ndarray) -> None:
        super().__init__(loader)
        self.plan = plan
        self.sample_ids = sample_ids

    def sample_order(self, epoch: int) -> np.ndarray:
        batches = self.plan.position_batches(epoch)
        positions = torch.cat(batches).numpy() if batches else np.zeros(0, dtype=np.int64)
        return self.sample_ids[positions]


class FFCVLoader(EpochLoader):
    """An :class:`EpochLoader` reading ``beton`` (sample ids ``sample_ids``) through ``ffcv.loader.Loader``.

    On CPU the pipeline ends on the CPU and we normalise; on CUDA FFCV copies the uint8 batch to the
    GPU (``ToDevice``).  ImageNet on CUDA is normalised there by FFCV's ``NormalizeImage`` (which
    needs CuPy) and comes out channels_last; CIFAR is cropped/flipped and normalised by us on the GPU.
    """

    def __init__(
        self,
        beton: Path,
        sample_ids: np.ndarray,
        batch_size: int,
        *,
        family: str,
        train: bool,
        augment: bool,
        seed: int,
        workers: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        image_size: int,
        eval_resize: int | None,
        distributed: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(len(sample_ids), batch_size, train=train, seed=seed, rank=rank, world_size=world_size)
        self.family = family
        self.augment = augment and train
        self.device = device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)
        self.normalized_by_ffcv = family == "imagenet" and device.type == "cuda"
        if self.normalized_by_ffcv and importlib.util.find_spec("cupy") is None:
            raise DataError(
                "FFCV normalises ImageNet batches on the GPU with CuPy: pip install cupy-cuda12x (or use loader='torch')"
            )
        on_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
        pipelines = {
            "image": self._image_pipeline(image_size, eval_resize, mean, std, on_device),
            "label": [IntDecoder(), ToTensor(), Squeeze(), *on_device],
        }
        sample_ids = np.asarray(sample_ids, dtype=np.uint64)
        self.loader = Loader(
            str(beton),
            batch_size=batch_size,
            num_workers=max(1, workers),
            order=OrderOption.SEQUENTIAL,
            distributed=distributed,
            seed=seed,
            indices=sample_ids,
            pipelines=pipelines,
            drop_last=False,
        )
        self.loader.traversal_order = _PlannedOrder(self.loader, self, sample_ids)
        self.loader.first_traversal_order = self.loader.traversal_order.sample_order(0)

    def _image_pipeline(self, size: int, eval_resize: int | None, mean, std, on_device: list) -> list:
        if self.family == "cifar":
            return [SimpleRGBImageDecoder(), ToTensor(), *on_device]
        if self.augment:
            head = [RandomResizedCropRGBImageDecoder((size, size)), RandomHorizontalFlip()]
        else:
            head = [CenterCropRGBImageDecoder((size, size), ratio=size / eval_resize)]
        tail = (
            [ToTorchImage(), NormalizeImage(np.array(mean) * 255, np.array(std) * 255, np.float32)]
            if self.normalized_by_ffcv
            else []
        )
        return [*head, ToTensor(), *on_device, *tail]

    def __iter__(self) -> Iterator[Batch]:
        augment_rng = generator(self.seed, self.epoch, STREAM_AUGMENT, self.rank)
        self.loader.next_epoch = self.epoch
        for images, labels in self.loader:
            labels = labels.clone()  # FFCV reuses its output buffers a few batches later
            if self.normalized_by_ffcv:
                yield images, labels
                continue
            if self.augment and self.family == "cifar":
                offsets, flips = draw_crop_flip(len(labels), CIFAR_PADDING, augment_rng)
                index = torch.arange(len(labels), device=images.device)
                images = crop_flip_nhwc(pad_nhwc(images, CIFAR_PADDING), index, offsets, flips, CIFAR_PADDING)
            yield normalize_nhwc(images, self.mean, self.std), labels
