"""Cache-line-aligned arrays for the kernels, and when the GEMM streams its output past the caches.

numpy aligns allocations to 16 bytes, so a 64-byte vector load of a filter
panel or store of an output row straddles two cache lines in three cases out
of four.  Filter panels and the GEMM's float outputs are therefore allocated on
64-byte boundaries (:func:`aligned_empty`, :func:`aligned_zeros`; torch's CPU
allocator already aligns to 64 bytes, so :func:`~bnnbench.kernels.conv.binary_conv2d_packed` writes
into a ``torch.empty`` tensor); rows of the output are multiples of 128 bytes
(filters padded to 32), so every 16-float group of a row starts a cache line
too.  The packed input is read by 8-byte broadcasts, where alignment does not
matter.

Streaming stores.  An output larger than one core's L2 cache cannot stay in
it until the next layer reads it, so writing it through the caches costs a
read of every line before it is overwritten (read-for-ownership) and evicts
the inputs and filters the GEMM still needs.  Above :func:`stream_threshold`
the GEMM writes it with non-temporal stores instead (``VMOVNTPS``; aligned
64-byte stores only, hence :func:`is_aligned`); measured on a Xeon with
AVX-512 VPOPCNTDQ (2 MiB L2), this lifted the 64-channel ResNet-18 convs at
batch 16, whose short dot products leave the output's write traffic a large
share of the work, from about 80-85% to 88% of the popcount peak.
"""

from __future__ import annotations

import math
import os
from functools import cache
from pathlib import Path

import numpy as np

CACHE_LINE = 64  # bytes
DEFAULT_L2_BYTES = 1 << 20  # when the OS does not say


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a :data:`CACHE_LINE` boundary."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize  # math.prod: np.prod costs microseconds, which a batch-1 conv feels
    raw = np.empty(nbytes + CACHE_LINE, dtype=np.uint8)
    start = -raw.ctypes.data % CACHE_LINE
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def aligned_zeros(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """:func:`aligned_empty`, zero-filled."""
    out = aligned_empty(shape, dtype)
    out.fill(0)
    return out


def is_aligned(a: np.ndarray) -> bool:
    """Whether ``a``'s data starts on a :data:`CACHE_LINE` boundary."""
    return a.ctypes.data % CACHE_LINE == 0


@cache
def l2_bytes() -> int:
    """The L2 cache of CPU 0 in bytes (Linux sysfs), or :data:`DEFAULT_L2_BYTES` when it cannot be read."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() != "2" or (index / "type").read_text().strip() == "Instruction":
                continue
            size = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return DEFAULT_L2_BYTES


def stream_threshold() -> int:
    """Output size in bytes above which the GEMM uses streaming stores: one core's L2
    (``BNNBENCH_STREAM_BYTES`` overrides it; 0 streams every aligned output)."""
    override = os.environ.get("BNNBENCH_STREAM_BYTES")
    if override is not None:
        try:
            value = int(override)
        except ValueError:
            raise ValueError(f"BNNBENCH_STREAM_BYTES={override!r} is not a number of bytes") from None
        if value < 0:
            raise ValueError(f"BNNBENCH_STREAM_BYTES={override!r} must be >= 0")
        return value
    return l2_bytes()


def streams(out: np.ndarray) -> bool:
    """Whether the GEMM writes ``out`` with streaming stores: aligned and larger than :func:`stream_threshold`."""
    return out.nbytes > stream_threshold() and is_aligned(out)
