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

import numba
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


@njit(cache=True)
def _pack_plane_word(planes: np.ndarray, b: int, word: int, first: int, end: int, padding: int, out: np.ndarray) -> None:
    """Word ``word`` (channels 64 word ..) of pixels ``first .. end - 1`` (row-major) of image ``b`` of NCHW ``planes``
    (B, C, H W), into ``out`` (B, H + 2p, W + 2p, words).

    Each channel's run is read contiguously and ORed, as one bit, into a byte
    plane of 8 channels (a loop that vectorises); the 8 byte planes then
    interleave into one word per pixel, stored once.
    """
    channels = planes.shape[1]
    width = out.shape[2] - 2 * padding
    bytes_ = np.zeros((8, end - first), dtype=np.uint8)
    start = np.uint64(first)  # unsigned indices: no negative-index test in the loop, which then vectorises
    for c in range(WORD_BITS * word, min(channels, WORD_BITS * (word + 1))):
        values = planes[b, c]
        target = bytes_[(c % WORD_BITS) // 8]
        bit = np.uint8(1 << (c % 8))
        for j in range(np.uint64(end - first)):
            target[j] |= bit if not (values[start + j] >= 0) else np.uint8(0)
    for h in range(first // width, (end - 1) // width + 1):
        row = out[b, h + padding]
        for j in range(max(first, h * width), min(end, (h + 1) * width)):
            bits = np.uint64(0)
            for group in range(8):
                bits |= np.uint64(bytes_[group, j - first]) << np.uint64(8 * group)
            row[j - h * width + padding, word] = bits


@njit(cache=True)
def _pack_pixel_row(flat: np.ndarray, shape: tuple[int, int, int, int], b: int, h: int, padding: int, out: np.ndarray) -> None:
    """Row ``h`` of image ``b`` of a channels-last array (``flat``, its (B, H, W, C) ``shape``) into ``out``.

    A pixel's channels are contiguous: 16 at a time become 16 bits with one
    vector compare (:func:`negative_mask`), the last C % 16 one by one; each
    word is stored once, complete.
    """
    _, height, width, channels = shape
    for j in range(width):
        base = ((b * height + h) * width + j) * channels
        for word in range(out.shape[3]):
            low, high = WORD_BITS * word, min(channels, WORD_BITS * (word + 1))
            bits = np.uint64(0)
            c = low
            while c + MASK_BITS <= high:
                bits |= negative_mask(flat, base + c) << np.uint64(c - low)
                c += MASK_BITS
            while c < high:
                bits |= np.uint64(not (flat[base + c] >= 0)) << np.uint64(c - low)
                c += 1
            out[b, h + padding, j + padding, word] = bits


MIN_PIXELS = 64  # an image is split between threads in runs of at least this many pixels


def runs_per_image(batch: int, height: int, width: int) -> int:
    """Runs of pixels each image of an NCHW batch is packed in by :func:`pack_channels`: enough for one per thread of
    numba's pool when the batch has fewer images than threads, each at least :data:`MIN_PIXELS` long."""
    return max(1, min(height * width // MIN_PIXELS, -(-numba.config.NUMBA_NUM_THREADS // batch)))


@njit(parallel=True, cache=True)
def _pack_channel_planes(x: np.ndarray, padding: int, runs: int, out: np.ndarray) -> None:
    """Pack a C-contiguous (B, C, H, W) array: one job is one word of one of an image's ``runs`` runs of pixels.

    Jobs are ordered image, run, word, so the threads' contiguous shares of
    them own whole pixels: no two threads write into one pixel's words (a split
    by words alone made them share every cache line of the output).
    """
    batch, channels, height, width = x.shape
    n_words = out.shape[3]
    plane = height * width
    run = -(-plane // runs)
    planes = x.reshape(batch, channels, plane)  # once: a reshape per channel costs more than a 7x7 plane's work
    for job in prange(batch * runs * n_words):
        b = job // (runs * n_words)
        first = (job // n_words - b * runs) * run
        _pack_plane_word(planes, b, job % n_words, first, min(plane, first + run), padding, out)


@njit(parallel=True, cache=True)
def _pack_pixels(x: np.ndarray, padding: int, out: np.ndarray) -> None:
    """Pack a C-contiguous (B, H, W, C) array (channels last): one job is one image row."""
    batch, height = x.shape[0], x.shape[1]
    flat = x.reshape(-1)
    for job in prange(batch * height):
        b = job // height
        _pack_pixel_row(flat, x.shape, b, job - b * height, padding, out)


@njit(cache=True)
def pack_rows(x: np.ndarray, channels_last: bool, padding: int, b: int, first: int, end: int, out: np.ndarray) -> None:
    """Rows ``first .. end - 1`` of image ``b`` of :func:`in_memory_order`'s array into ``out``, on the calling thread."""
    if channels_last:
        flat = x.reshape(-1)
        for h in range(first, end):
            _pack_pixel_row(flat, x.shape, b, h, padding, out)
        return
    width = x.shape[3]
    planes = x.reshape(x.shape[0], x.shape[1], x.shape[2] * width)
    for word in range(out.shape[3]):
        _pack_plane_word(planes, b, word, first * width, end * width, padding, out)


def in_memory_order(x: np.ndarray) -> tuple[np.ndarray, bool]:
    """``x`` (B, C, H, W) as the C-contiguous array the packing loops read, and whether it is channels last.

    A channels-last view (a transposed C-contiguous (B, H, W, C) array) comes back as that (B, H, W, C) array,
    anything else as a C-contiguous (B, C, H, W) array (copied only when it is neither)."""
    if x.flags.c_contiguous:
        return x, False
    channels_last = x.transpose(0, 2, 3, 1)
    return (channels_last, True) if channels_last.flags.c_contiguous else (np.ascontiguousarray(x), False)


@njit(cache=True)
def pack_into(x: np.ndarray, channels_last: bool, padding: int, runs: int, out: np.ndarray) -> None:
    """Pack :func:`in_memory_order`'s array into the zeroed ``out`` (B, H + 2p, W + 2p, words), with its layout's loop
    (``runs``: :func:`runs_per_image`, for NCHW)."""
    if channels_last:
        _pack_pixels(x, padding, out)
    else:
        _pack_channel_planes(x, padding, runs, out)


def packed_shape(batch: int, channels: int, height: int, width: int, padding: int) -> tuple[int, int, int, int]:
    """Shape of the packed, padded input: (B, H + 2p, W + 2p, ceil(C / 64))."""
    return batch, height + 2 * padding, width + 2 * padding, words_for(channels)


def pack_channels(x: np.ndarray, padding: int = 0) -> np.ndarray:
    """Pack a (B, C, H, W) float array into (B, H + 2p, W + 2p, ceil(C / 64)) uint64 words.

    ``x`` may be laid out NCHW or channels last (a transposed view of a
    C-contiguous (B, H, W, C) array); each layout has its own loop order.  The
    padded border holds +1 (bit 0).
    """
    if x.ndim != 4:
        raise ValueError(f"pack_channels expects a (B, C, H, W) array, got shape {x.shape}")
    batch, _, height, width = x.shape
    out = np.zeros(packed_shape(*x.shape, padding), dtype=np.uint64)  # read by 8-byte broadcasts: alignment does not matter
    pack_into(*in_memory_order(x), padding, runs_per_image(batch, height, width), out)
    return out


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial output size of a convolution (as ``F.conv2d``)."""
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ValueError(f"input size {size} with padding {padding} is smaller than the kernel ({kernel})")
    return out
