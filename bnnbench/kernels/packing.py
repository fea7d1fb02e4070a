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
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

WORD_BITS = 64


def words_for(channels: int) -> int:
    """Number of uint64 words holding ``channels`` bits."""
    return (channels + WORD_BITS - 1) // WORD_BITS


MASK_BITS = 16  # values compared per sign-mask intrinsic call


@intrinsic
def negative_mask(typingctx, values, start):  # type: ignore[no-untyped-def]
    """Bit k set where ``not (values[start + k] >= 0)``, k < 16, as uint64: one vector compare (``fcmp ult``)."""
    if not (isinstance(values, types.Array) and isinstance(values.dtype, types.Float) and values.ndim == 1 and values.layout == "C"):
        return None
    if not isinstance(start, types.Integer):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        element = data.type.pointee
        vector = ir.VectorType(element, MASK_BITS)
        loaded = builder.load(builder.bitcast(builder.gep(data, [args[1]]), vector.as_pointer()), align=1)
        negative = builder.fcmp_unordered("<", loaded, ir.Constant(vector, [0.0] * MASK_BITS))  # true for x < 0 and NaN
        return builder.zext(builder.bitcast(negative, ir.IntType(MASK_BITS)), ir.IntType(64))

    return types.uint64(values, types.intp), codegen


@njit(parallel=True, cache=True)
def _pack_channel_planes(x: np.ndarray, padding: int, out: np.ndarray) -> None:
    """Pack a C-contiguous (B, C, H, W) array: one job is one image's word of up to 64 channels.

    Each channel's plane is read contiguously and ORed, as one bit, into a
    byte plane of 8 channels (a loop over H W bytes that vectorises); the 8
    byte planes then interleave into one word per pixel.  ``out``
    (B, H + 2p, W + 2p, words) must be zero-initialised.
    """
    batch, channels, height, width = x.shape
    n_words = out.shape[3]
    plane = height * width
    planes = x.reshape(batch, channels, plane)  # once: a reshape per channel costs more than a 7x7 plane's work
    for job in prange(batch * n_words):
        b = job // n_words
        word = job - b * n_words
        first = word * WORD_BITS
        bytes_ = np.zeros((WORD_BITS // 8, plane), dtype=np.uint8)
        for c in range(first, min(channels, first + WORD_BITS)):
            values = planes[b, c]
            target = bytes_[(c - first) // 8]
            bit = np.uint8(1 << ((c - first) % 8))
            for j in range(plane):
                target[j] |= bit if not (values[j] >= 0) else np.uint8(0)
        for h in range(height):
            for w in range(width):
                j = h * width + w
                bits = np.uint64(0)
                for group in range(WORD_BITS // 8):
                    bits |= np.uint64(bytes_[group, j]) << np.uint64(8 * group)
                out[b, h + padding, w + padding, word] = bits


@njit(parallel=True, cache=True)
def _pack_pixels(x: np.ndarray, padding: int, out: np.ndarray) -> None:
    """Pack a C-contiguous (B, H, W, C) array (channels last): one job is one image row.

    A pixel's channels are contiguous: 16 at a time become 16 bits with one
    vector compare (:func:`negative_mask`); the last C % 16 one by one.
    """
    batch, height, width, channels = x.shape
    flat = x.reshape(-1)
    whole = channels - channels % MASK_BITS
    for job in prange(batch * height):
        b = job // height
        h = job - b * height
        for j in range(width):
            base = ((b * height + h) * width + j) * channels
            words = out[b, h + padding, j + padding]
            for c in range(0, whole, MASK_BITS):
                words[c // WORD_BITS] |= negative_mask(flat, base + c) << np.uint64(c % WORD_BITS)
            for c in range(whole, channels):
                words[c // WORD_BITS] |= np.uint64(not (flat[base + c] >= 0)) << np.uint64(c % WORD_BITS)


def pack_channels(x: np.ndarray, padding: int = 0) -> np.ndarray:
    """Pack a (B, C, H, W) float array into (B, H + 2p, W + 2p, ceil(C / 64)) uint64 words.

    ``x`` may be laid out NCHW or channels last (a transposed view of a
    C-contiguous (B, H, W, C) array); each layout has its own loop order.  The
    padded border holds +1 (bit 0).
    """
    if x.ndim != 4:
        raise ValueError(f"pack_channels expects a (B, C, H, W) array, got shape {x.shape}")
    batch, channels, height, width = x.shape
    out = np.zeros((batch, height + 2 * padding, width + 2 * padding, words_for(channels)), dtype=np.uint64)  # read by 8-byte broadcasts: alignment does not matter
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
