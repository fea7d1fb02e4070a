"""Which samples, in which order: class-balanced subsets, per-epoch permutations, rank shards.

Every random choice here is a pure function of its integer arguments (never the global torch or
numpy RNG), so a run resumed at an epoch boundary replays exactly the same batches.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import DataError

# The subset is a property of the data, not of the run: runs with different seeds that ask for
# the same N train and evaluate on the same images.
SUBSET_SEED = 0

# Independent random streams derived from one run seed.
STREAM_ORDER = 1
STREAM_AUGMENT = 2


def derived_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys (numpy SeedSequence), for ``torch.Generator``."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def generator(*keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``keys`` (see :func:`derived_seed`)."""
    return torch.Generator().manual_seed(derived_seed(*keys))


def balanced_order(labels: np.ndarray, seed: int = SUBSET_SEED) -> np.ndarray:
    """All indices, interleaved class by class: c0, c1, ..., c9, c0, c1, ...

    Within each class the indices are shuffled with ``seed``.  When classes have unequal sizes the
    round-robin continues over the classes that still have samples.  Any prefix of length N is
    therefore as class-balanced as N allows (N=100 over 10 classes gives 10 per class).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    # position of each sample inside its class, then sort by (position, class)
    rank = np.empty(len(labels), dtype=np.int64)
    cls = np.empty(len(labels), dtype=np.int64)
    for c, idx in enumerate(per_class):
        rank[idx] = np.arange(len(idx))
        cls[idx] = c
    return np.lexsort((cls, rank))


def balanced_subset(labels: np.ndarray, n: int | None, seed: int = SUBSET_SEED) -> np.ndarray:
    """Sorted indices of the first ``n`` samples of :func:`balanced_order` (all when ``n`` is None)."""
    labels = np.asarray(labels)
    if n is None:
        return np.arange(len(labels), dtype=np.int64)
    if n <= 0:
        raise DataError(f"subset size must be positive, got {n}")
    if n > len(labels):
        raise DataError(f"subset of {n} asked from a split of only {len(labels)} images")
    return np.sort(balanced_order(labels, seed)[:n])


def readable_subset(labels: np.ndarray, n: int | None, unreadable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kept, dropped): :func:`balanced_subset` of the *whole* split, split into the positions that are
    not in ``unreadable`` and those that are.

    The subset is drawn before the unreadable images are left out, so it is the same whether they are
    known in advance (a decode cache, an FFCV store) or found while decoding.
    """
    chosen = balanced_subset(labels, n)
    bad = np.isin(chosen, unreadable)
    return chosen[~bad], chosen[bad]


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """Positions 0..n-1 in the order of ``epoch``: a permutation seeded by (seed, epoch) or identity."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=generator(seed, epoch, STREAM_ORDER))


def shard(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of ``order`` with ``torch.utils.data.DistributedSampler`` semantics.

    The order is padded by repeating its head until its length divides ``world_size``; rank r
    takes elements r, r + world_size, ...  Every rank gets the same number of samples.
    """
    if world_size == 1:
        return order
    total = -(-len(order) // world_size) * world_size
    padded = torch.cat([order, order.repeat(total // max(len(order), 1) + 1)[: total - len(order)]])
    return padded[rank:total:world_size]


def batch_slices(n: int, batch_size: int, drop_single: bool) -> list[slice]:
    """Contiguous batch slices of ``n`` items; with ``drop_single`` a trailing batch of one item is dropped.

    Training drops a last batch of a single image because BatchNorm cannot normalise one sample.
    """
    if batch_size <= 0:
        raise DataError(f"batch size must be positive, got {batch_size}")
    slices = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if drop_single and len(slices) > 1 and n % batch_size == 1:
        slices.pop()
    return slices


def distributed_rank(distributed: bool) -> tuple[int, int]:
    """(rank, world_size) from ``torch.distributed`` when ``distributed``, else (0, 1)."""
    if not distributed:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise DataError("distributed=True needs an initialised torch.distributed process group (init_process_group)")
    return dist.get_rank(), dist.get_world_size()
