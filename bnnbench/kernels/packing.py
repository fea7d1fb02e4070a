"""Bit packing of +-1 tensors along channels.

Bit convention: bit 1 encodes -1 and bit 0 encodes +1, so for two packed
words ``popcount(a ^ w)`` counts the positions where the signs differ and

    sum_c a_c w_c = K - 2 popcount(a XOR w)          (SPEC section 6)

over K real channels.  A value is -1 exactly when ``not (x >= 0)``, the same
test as :func:`bnnbench.functional.sign` (sign(0) = +1), so real inputs are
binarised by the packing itself.  Channel bits beyond C in the last word are 0
in both operands and never count.  Spatial padding is written as bit 0, i.e.
as +1; :mod:`bnnbench.kernels.conv` corrects the border to zero padding.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

WORD_BITS = 64


def words_for(channels: int) -> int:
    """Number of uint64 words holding ``channels`` bits."""
    return (channels + WORD_BITS - 1) // WORD_BITS


@njit(parallel=True, cache=True)
def _pack_channel_planes(x: np.ndarray, padding: int, out: np.ndarray) -> None:
    """Pack a C-contiguous (B, C, H, W) array: one job is one image row of up to 64 channels.

    ``out`` (B, H + 2p, W + 2p, words) must be zero-initialised.
    """
    batch, channels, height, width = x.shape
    n_words = out.shape[3]
    for job in prange(batch * n_words * height):
        b = job // (n_words * height)
        word = (job // height) % n_words
        h = job % height
        bits = np.zeros(width, dtype=np.uint64)  # contiguous, so the channel loop vectorises
        first = word * WORD_BITS
        for c in range(first, min(channels, first + WORD_BITS)):
            shift = np.uint64(c - first)
            values = x[b, c, h]
            for j in range(width):
                bits[j] |= np.uint64(not (values[j] >= 0)) << shift
        out[b, h + padding, padding : padding + width, word] = bits


@njit(parallel=True, cache=True)
def _pack_pixels(x: np.ndarray, padding: int, out: np.ndarray) -> None:
    """Pack a C-contiguous (B, H, W, C) array (channels last): one job is one image row."""
    batch, height, width, channels = x.shape
    n_words = out.shape[3]
    for job in prange(batch * height):
        b = job // height
        h = job % height
        for j in range(width):
            pixel = x[b, h, j]
            for word in range(n_words):
                first = word * WORD_BITS
                bits = np.uint64(0)
                for c in range(first, min(channels, first + WORD_BITS)):
                    bits |= np.uint64(not (pixel[c] >= 0)) << np.uint64(c - first)
                out[b, h + padding, j + padding, word] = bits


def pack_channels(x: np.ndarray, padding: int = 0) -> np.ndarray:
    """Pack a (B, C, H, W) float array into (B, H + 2p, W + 2p, ceil(C / 64)) uint64 words.

    ``x`` may be laid out NCHW or channels last (a transposed view of a
    C-contiguous (B, H, W, C) array); each layout has its own loop order.  The
    padded border holds +1 (bit 0).
    """
    if x.ndim != 4:
        raise ValueError(f"pack_channels expects a (B, C, H, W) array, got shape {x.shape}")
    batch, channels, height, width = x.shape
    out = np.zeros((batch, height + 2 * padding, width + 2 * padding, words_for(channels)), dtype=np.uint64)
    channels_last = x.transpose(0, 2, 3, 1)
    if channels_last.flags.c_contiguous and not x.flags.c_contiguous:
        _pack_pixels(channels_last, padding, out)
    else:
        _pack_channel_planes(np.ascontiguousarray(x), padding, out)
    return out


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial output size of a convolution (as ``F.conv2d``)."""
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ValueError(f"input size {size} with padding {padding} is smaller than the kernel ({kernel})")
    return out
