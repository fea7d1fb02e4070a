"""Loaders: re-iterable, ``len()`` in batches, ``set_epoch``; they yield normalised batches on a device.

All loaders share :class:`EpochLoader`, which decides which sample positions form each batch of an
epoch: a permutation seeded by (seed, epoch) for training, the identity for evaluation, then this
rank's shard (DistributedSampler semantics).  Nothing here reads the global torch or numpy RNG.

- :class:`ArrayLoader`: images held in memory as uint8 (CIFAR-10, digits); crop/flip per batch as
  one tensor gather with a CPU generator seeded by (seed, epoch, rank).  ``resident=True`` (the
  ``gpu`` loader) keeps the array on the target device: the epoch's plan (positions, crop
  offsets, flips: drawn on the CPU exactly as before) goes there in one pinned, non-blocking
  copy, and every batch is gathered, cropped, flipped and normalised there, with no host
  round trip per batch.  ``resident=False`` (the ``torch`` loader) builds each uint8 batch on
  the host and copies it (pinned, non-blocking) to the device, where it is normalised.  Both
  give the same batches, bit for bit, on any device.
- :class:`FolderLoader`: images decoded from files by a torch ``DataLoader`` with workers
  (ImageNet); each image's crop and flip come from a generator seeded by (seed, epoch, image).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import BadImageError
from .images import decode_rgb
from .sampling import STREAM_AUGMENT, batch_slices, epoch_order, generator, shard
from .sources import FolderSource, SplitIndex
from .transforms import (
    CIFAR_PADDING,
    crop_flip_nhwc,
    draw_crop_flip,
    imagenet_eval_view,
    imagenet_train_view,
    normalize_nhwc,
    pad_nhwc,
)

Batch = tuple[torch.Tensor, torch.Tensor]


class EpochLoader:
    """The batch plan of an epoch over ``num_samples`` positions; subclasses turn positions into tensors."""

    def __init__(self, num_samples: int, batch_size: int, *, train: bool, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skipped_images: set[str] = set()  # unreadable files left out (skip_bad_images=True)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration replays."""
        self.epoch = int(epoch)

    def position_batches(self, epoch: int | None = None) -> list[torch.Tensor]:
        """This rank's batches of sample positions for ``epoch`` (default: the current epoch)."""
        epoch = self.epoch if epoch is None else epoch
        order = shard(epoch_order(self.num_samples, self.seed, epoch, shuffle=self.train), self.rank, self.world_size)
        return [order[s] for s in batch_slices(len(order), self.batch_size, drop_single=self.train)]

    def __len__(self) -> int:
        per_rank = -(-self.num_samples // self.world_size)
        return len(batch_slices(per_rank, self.batch_size, drop_single=self.train))


PLAN_COLUMNS = 4  # position, crop row offset, crop column offset, flip


class ArrayLoader(EpochLoader):
    """Batches from in-memory uint8 (N, H, W, 3) images, on ``device``.

    ``resident``: the array lives on ``device`` (a GPU-resident data set) instead of in host
    memory.  With augmentation it is stored zero-padded once (CIFAR-10: 240 MB instead of
    150 MB), so that gathering, cropping and flipping a batch is a single index plus a mirror.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        *,
        train: bool,
        augment: bool,
        seed: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        resident: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(len(labels), batch_size, train=train, seed=seed, rank=rank, world_size=world_size)
        self.augment = augment and train
        self.device = device
        self.storage = device if resident else torch.device("cpu")
        self.pinned = device.type == "cuda"  # host->device copies from page-locked memory, asynchronous
        self.images = torch.from_numpy(images).to(self.storage)
        if self.augment:
            self.images = pad_nhwc(self.images, CIFAR_PADDING)
        self.labels = torch.from_numpy(labels).to(self.storage)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)

    def epoch_plan(self) -> tuple[torch.Tensor, list[int]]:
        """This epoch's (n, 4) int64 plan on the CPU (position, crop row, crop column, flip per
        image, batch after batch) and the batch sizes.

        The crop offsets and flips are drawn batch by batch from the (seed, epoch, rank) generator,
        in the order the per-batch loop has always drawn them, so the batches do not depend on
        where they are assembled.
        """
        batches = self.position_batches()
        rng = generator(self.seed, self.epoch, STREAM_AUGMENT, self.rank)
        rows = []
        for positions in batches:
            if self.augment:
                offsets, flips = draw_crop_flip(len(positions), CIFAR_PADDING, rng)
            else:
                offsets, flips = torch.zeros(len(positions), 2, dtype=torch.int64), torch.zeros(len(positions), dtype=torch.bool)
            rows.append(torch.cat([positions[:, None], offsets, flips[:, None].long()], dim=1))
        plan = torch.cat(rows) if rows else torch.zeros(0, PLAN_COLUMNS, dtype=torch.int64)
        return plan, [len(positions) for positions in batches]

    def _move(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``tensor`` on ``device``: from pinned host memory without blocking when that is a GPU."""
        if tensor.device == device:
            return tensor
        if self.pinned and tensor.device.type == "cpu":
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=self.pinned)

    def __iter__(self) -> Iterator[Batch]:
        plan, sizes = self.epoch_plan()
        plan = self._move(plan, self.storage)  # one copy per epoch when the array is resident on a GPU
        start = 0
        for size in sizes:
            rows = plan[start : start + size]
            start += size
            positions = rows[:, 0]
            if self.augment:
                images = crop_flip_nhwc(self.images, positions, rows[:, 1:3], rows[:, 3].bool(), CIFAR_PADDING)
            else:
                images = self.images[positions]
            images, labels = self._move(images, self.device), self._move(self.labels[positions], self.device)
            yield normalize_nhwc(images, self.mean, self.std), labels


class FolderDataset(Dataset):
    """Image ``i`` of a split as a (size, size, 3) uint8 view; the epoch and ``i`` seed its augmentation.

    An unreadable file yields ``None`` plus (path, reason) so that the main process, not a worker,
    decides whether to raise or skip.
    """

    def __init__(self, source: FolderSource, index: SplitIndex, *, augment: bool, seed: int, size: int, resize: int) -> None:
        self.source = source
        self.names = index.names
        self.labels = index.labels
        self.augment = augment
        self.seed = seed
        self.size = size
        self.resize = resize
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, tuple[str, str] | None]:
        name = self.names[i]
        try:
            image = torch.from_numpy(decode_rgb(self.source.read(name), self.source.display(name))).permute(2, 0, 1)
        except BadImageError as exc:
            return None, int(self.labels[i]), (exc.path, exc.reason)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, STREAM_AUGMENT, i])
            view = imagenet_train_view(image, rng, self.size)
        else:
            view = imagenet_eval_view(image, self.size, self.resize)
        return view, int(self.labels[i]), None


def collate_views(
    items: list[tuple[torch.Tensor | None, int, tuple[str, str] | None]],
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """Stack the readable images of a batch; return the unreadable ones as (path, reason)."""
    good = [(view, label) for view, label, bad in items if bad is None]
    bad = [bad for _, _, bad in items if bad is not None]
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), bad
    return torch.stack([v for v, _ in good]), torch.tensor([label for _, label in good], dtype=torch.int64), bad


class FolderLoader(EpochLoader):
    """Batches decoded from image files by a torch ``DataLoader`` with ``workers`` processes.

    ``positions`` selects the split's images (a subset); with ``skip_bad_images`` unreadable images are
    dropped from their batch and listed in ``skipped_images``, else :class:`BadImageError` names
    the first one.  A batch whose images are all unreadable is not yielded.
    """

    def __init__(
        self,
        dataset: FolderDataset,
        positions: np.ndarray,
        batch_size: int,
        *,
        train: bool,
        seed: int,
        workers: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        skip_bad_images: bool,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(len(positions), batch_size, train=train, seed=seed, rank=rank, world_size=world_size)
        self.dataset = dataset
        self.positions = torch.from_numpy(np.asarray(positions, dtype=np.int64))
        self.workers = workers
        self.device = device
        self.skip_bad_images = skip_bad_images
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)

    def __iter__(self) -> Iterator[Batch]:
        self.dataset.epoch = self.epoch  # workers start after this line, with this epoch
        batches = [self.positions[p].tolist() for p in self.position_batches()]
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.workers,
            collate_fn=collate_views,
            pin_memory=self.device.type == "cuda",
        )
        for views, labels, bad in loader:
            if bad:
                if not self.skip_bad_images:
                    raise BadImageError(*bad[0])
                self.skipped_images.update(path for path, _ in bad)
            if len(labels):
                views = views.to(self.device, non_blocking=True)
                yield normalize_nhwc(views, self.mean, self.std), labels.to(self.device, non_blocking=True)
