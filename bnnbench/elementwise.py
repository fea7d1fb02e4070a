"""One-pass CPU kernels (numba) for the binary layer's element-wise math, bit for bit what torch's ops give.

Eager torch runs a formula such as ``max(0, 2 - 2|x|)`` as one pass per operator, each
allocating its result; the kernels here read the input once and write the result once.
They are exact, not approximations: each is compiled without ``fastmath`` (no reassociation,
no contraction into FMA) and evaluates the formula in float32, as torch's float32 and
bfloat16 kernels do, rounding a bfloat16 result to nearest-even once per torch operator
that would round (for the formulas here: once, see :data:`APPROX_SIGN_DERIVATIVE`).  The tests
compare every kernel with the torch formula it replaces, bit for bit, on edge values
(signed zeros, NaN, infinities, subnormals), odd shapes and both memory formats.

:func:`unary` applies a kernel where it covers the input (a CPU float32 or bfloat16 tensor,
dense in its memory format, that autograd does not track) and returns None otherwise,
so the caller runs its torch formula; :func:`per_sample_variance` is torch's
``x.var(dims 1..)`` (Welford in float64, one pass per sample in memory order, as torch's
CPU reduction runs it) over all samples at once; :func:`pack_signs` keeps a +-1 tensor in
1 bit per element and :func:`unpack_signs` widens it again (the binary conv's saved input).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic
from torch import Tensor

# torch's CPU reductions split one output's elements across threads from this many on
# (at::internal::GRAIN_SIZE); below it, or on one thread, each output is one sequential pass.
REDUCTION_GRAIN = 32768

_ONE, _TWO, _ZERO = np.float32(1.0), np.float32(2.0), np.float32(0.0)


@intrinsic
def _bits_of(typingctx, value):
    """The 32 bits of a float32, as uint32 (a bit cast)."""
    return types.uint32(types.float32), lambda context, builder, signature, args: builder.bitcast(args[0], ir.IntType(32))


@intrinsic
def _float_of(typingctx, bits):
    """The float32 whose 32 bits are ``bits`` (a bit cast)."""
    return types.float32(types.uint32), lambda context, builder, signature, args: builder.bitcast(args[0], ir.FloatType())


@njit(cache=True)
def _widen(bits: np.uint16) -> np.float32:
    """A bfloat16 (its 16 bits) as float32: exact."""
    return _float_of(np.uint32(bits) << np.uint32(16))


@njit(cache=True)
def _round_bf16(value: np.float32) -> np.uint16:
    """float32 to bfloat16 bits, rounded to nearest-even (c10's round_to_nearest_even; NaN to 0x7FC0)."""
    if value != value:
        return np.uint16(0x7FC0)
    u = _bits_of(value)
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(cache=True)
def _sign(v: np.float32) -> np.float32:
    return _ONE if v >= _ZERO else -_ONE


@njit(cache=True)
def _approx_sign_derivative(v: np.float32) -> np.float32:
    r = _TWO - _TWO * abs(v)
    return _ZERO if r < _ZERO else r


@njit(cache=True)
def _clip_derivative(v: np.float32) -> np.float32:
    return _ONE if abs(v) <= _ONE else _ZERO


class Kernel:
    """A float32 formula (an njit function) compiled twice: over float32 arrays, and over bfloat16 bits (widened, rounded
    back once).  Compiled on first use in each process, not cached on disk: numba's cache cannot key a loop on the
    formula it closes over, and would add entries on every run."""

    def __init__(self, name: str, formula: Callable[[np.float32], np.float32]) -> None:
        self.name = name

        @njit(nogil=True)
        def float32(src, out):  # pragma: no cover - compiled
            for i in range(src.size):
                out[i] = formula(src[i])

        @njit(nogil=True)
        def bfloat16(src, out):  # pragma: no cover - compiled
            for i in range(src.size):
                out[i] = _round_bf16(formula(_widen(src[i])))

        self._loops = {torch.float32: (float32, np.float32), torch.bfloat16: (bfloat16, np.uint16)}

    def run(self, x: Tensor, out: Tensor) -> None:
        """out = formula(x) element-wise, both dense with the same strides (float32 or bfloat16)."""
        loop, dtype = self._loops[x.dtype]
        loop(_flat(x, dtype), _flat(out, dtype))

    def __repr__(self) -> str:
        return f"Kernel({self.name!r})"


SIGN = Kernel("sign", _sign)
"""sign(x) with sign(0) = +1: +1 where x >= 0 (-0.0 included), -1 elsewhere (NaN included)."""
APPROX_SIGN_DERIVATIVE = Kernel("approx_sign_derivative", _approx_sign_derivative)
"""max(0, 2 - 2|x|): torch rounds a bfloat16 ``2 - 2|x|`` once (2|x| is exact, the clamp too)."""
CLIP_DERIVATIVE = Kernel("clip_derivative", _clip_derivative)
"""1{|x| <= 1} (0 at NaN)."""


def _flat(x: Tensor, dtype: np.dtype) -> np.ndarray:
    """The elements of a dense tensor in memory order, as a 1-D numpy view of the given dtype."""
    flat = torch.as_strided(x.detach(), (x.numel(),), (1,), x.storage_offset())
    return (flat.view(torch.int16) if x.dtype == torch.bfloat16 else flat).numpy().view(dtype)


def _dense(x: Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def covered(x: Tensor) -> bool:
    """True when the kernels take ``x``: a CPU float32/bfloat16 tensor, dense in its memory format, untracked by autograd."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and _dense(x)
        and not (x.requires_grad and torch.is_grad_enabled())
        and not torch.compiler.is_compiling()
    )


def unary(kernel: Kernel, x: Tensor) -> Tensor | None:
    """``kernel`` applied to every element of ``x`` (same shape, dtype and strides), or None where it does not cover x."""
    if not covered(x):
        return None
    out = torch.empty_like(x)
    if out.stride() != x.stride():
        return None
    if x.numel():
        kernel.run(x, out)
    return out


_SIGN_BIT = {torch.float32: (np.uint32, 31, 0x3F800000), torch.bfloat16: (np.uint16, 15, 0x3F80)}  # bits, shift, +1


@njit(nogil=True, cache=True)
def _pack_sign_bits(src, shift, out):  # pragma: no cover - compiled
    """Bit k of byte j: the sign bit of element 8 j + k (1 for -1); the last byte's missing elements as +1."""
    n, full = src.size, src.size // 8
    for j in range(full):
        byte = np.uint8(0)
        for k in range(8):
            byte |= np.uint8((src[8 * j + k] >> shift) & 1) << np.uint8(k)
        out[j] = byte
    if n > 8 * full:
        byte = np.uint8(0)
        for k in range(n - 8 * full):
            byte |= np.uint8((src[8 * full + k] >> shift) & 1) << np.uint8(k)
        out[full] = byte


@njit(nogil=True, cache=True)
def _unpack_sign_bits(bits, shift, one, out):  # pragma: no cover - compiled
    """+1 (``one``'s bits) or -1 (the sign bit set) per element, from :func:`_pack_sign_bits`'s bytes."""
    n, full = out.size, out.size // 8
    for j in range(full):
        byte = bits[j]
        for k in range(8):
            out[8 * j + k] = one | (out.dtype.type((byte >> np.uint8(k)) & np.uint8(1)) << shift)
    for i in range(8 * full, n):
        out[i] = one | (out.dtype.type((bits[full] >> np.uint8(i - 8 * full)) & np.uint8(1)) << shift)


def pack_signs(a: Tensor) -> Tensor | None:
    """A tensor of +-1 values in 1 bit each (uint8, elements in memory order), or None where the kernels do not cover it."""
    if not covered(a):
        return None
    bits, shift, _ = _SIGN_BIT[a.dtype]
    out = torch.empty((a.numel() + 7) // 8, dtype=torch.uint8)
    if a.numel():
        _pack_sign_bits(_flat(a, bits), shift, out.numpy())
    return out


def unpack_signs(packed: Tensor, shape: torch.Size, stride: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """The +-1 tensor :func:`pack_signs` packed, as a float32 or bfloat16 ``dtype`` tensor of the packed one's shape
    and (dense) strides."""
    out = torch.empty_strided(shape, stride, dtype=dtype)
    bits, shift, one = _SIGN_BIT[dtype]
    if out.numel():
        _unpack_sign_bits(packed.numpy(), shift, bits(one), _flat(out, bits))
    return out


@njit(nogil=True, cache=True)
def _welford_rows(rows: np.ndarray, bf16: bool, correction: int, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """Per row, torch's WelfordOps over the row in order (float64), the rows advanced together (independent chains)."""
    count, n = rows.shape
    mean, m2 = np.zeros(count), np.zeros(count)
    for i in range(n):
        nf = np.float64(i + 1)
        for r in range(count):
            v = np.float64(_widen(rows[r, i])) if bf16 else np.float64(rows[r, i])
            delta = v - mean[r]
            new_mean = mean[r] + delta / nf
            m2[r] = m2[r] + delta * (v - new_mean)
            mean[r] = new_mean
    divisor = np.float64(max(n - correction, 0))
    for r in range(count):
        out[r] = m2[r] / divisor


def per_sample_variance(x: Tensor) -> Tensor | None:
    """``x.var(dim=(1, ..., x.dim() - 1), keepdim=True)`` (unbiased), bit for bit, or None where the kernel does not cover x.

    torch reduces each sample with Welford's update in float64, sequentially in memory order
    when a sample has fewer than :data:`REDUCTION_GRAIN` elements or torch runs one thread
    (otherwise in per-thread chunks it then combines: not covered), then rounds to x's dtype
    through float32."""
    if not (covered(x) and x.is_contiguous() and x.dim() >= 2 and x.shape[0] > 0):
        return None
    per_sample = x[0].numel()
    if per_sample < 2 or (per_sample >= REDUCTION_GRAIN and torch.get_num_threads() > 1):
        return None
    rows = x.reshape(x.shape[0], per_sample)
    rows = rows.view(torch.int16).numpy().view(np.uint16) if x.dtype == torch.bfloat16 else rows.numpy()
    out = np.empty(x.shape[0])
    _welford_rows(rows, x.dtype == torch.bfloat16, 1, out)
    return torch.from_numpy(out).to(torch.float32).to(x.dtype).view(x.shape[0], *([1] * (x.dim() - 1)))


__all__ = [
    "APPROX_SIGN_DERIVATIVE",
    "CLIP_DERIVATIVE",
    "EXCEPTION_SHARE",
    "Kernel",
    "REDUCTION_GRAIN",
    "SIGN",
    "covered",
    "pack_signs",
    "per_sample_variance",
    "scale_channels",
    "scale_channels_backward",
    "unary",
    "unpack_signs",
]


# ------------------------------------------------------------------------------------------------------------
# y * alpha per channel, kept for the backward as its product (bnnbench.functional.scale_channels)
#
# out = y * alpha_c rounds once (to float32, or to bfloat16 from float32).  A binary layer's y is an integer
# (a convolution of +-1 by +-1, rounded to the dtype), recovered from out as the integer nearest to
# out (1 / alpha_c) (float32; the nearest integer v found as (v + 1.5 2^23) - 1.5 2^23): exactly whenever
# |y| < 2^20 in float32 and |y| < 128 in bfloat16 (the roundings move it by less than |y| (2^-8 + 2^-22) < 1/2).  Where that misses y (a larger bfloat16 y, a
# y that is no integer, alpha_c zero or not finite) the element is an exception, kept as (index, y); a
# layer with more than 1 in EXCEPTION_SHARE exceptions keeps y itself.

EXCEPTION_SHARE = 16
_NEAREST_INTEGER = np.float32(1.5 * 2**23)  # (v + this) - this: v rounded to an integer, half to even, for |v| < 2^22


def _scaling(bf16: bool):
    """The forward and backward loops of ``y * alpha`` over float32 arrays or bfloat16 bits (compiled per dtype,
    not cached on disk: numba keys no closure), dividing as IEEE 754 does (by zero too)."""

    @njit(nogil=True, error_model="numpy")
    def value(bits):  # pragma: no cover - compiled
        return _widen(bits) if bf16 else bits

    @njit(nogil=True, error_model="numpy")
    def rounded(v):  # pragma: no cover - compiled
        return _round_bf16(v) if bf16 else v

    @njit(nogil=True, error_model="numpy")
    def recovered(o, inverse):  # pragma: no cover - compiled
        return (value(o) * inverse + _NEAREST_INTEGER) - _NEAREST_INTEGER

    @njit(nogil=True, error_model="numpy")
    def forward(y, alpha, inner, out, indices, values):  # pragma: no cover - compiled
        """out = y * alpha[channel] (rows of ``inner`` elements, channels cycling); the exceptions' indices and
        elements go to ``indices``/``values`` when they fit.  Returns the exceptions' count."""
        count, channels = 0, alpha.size
        for row in range(y.size // inner):
            a = alpha[row % channels]
            inverse = np.float32(1.0) / a
            src, dst = y[row * inner : row * inner + inner], out[row * inner : row * inner + inner]
            for j in range(inner):  # (over a row's view: indices known non-negative, the loop vectorises)
                o = rounded(value(src[j]) * a)
                dst[j] = o
                count += _bits_of(recovered(o, inverse)) != _bits_of(value(src[j]))
        if 0 < count <= indices.size:  # a second sweep collects them
            e = 0
            for row in range(y.size // inner):
                inverse = np.float32(1.0) / alpha[row % channels]
                for j in range(inner):
                    i = row * inner + j
                    if _bits_of(recovered(out[i], inverse)) != _bits_of(value(y[i])):
                        indices[e], values[e] = i, y[i]
                        e += 1
        return count

    @njit(nogil=True, error_model="numpy")
    def backward(out, grad, alpha, inner, indices, values, grad_y, product):  # pragma: no cover - compiled
        """grad_y = grad * alpha[channel] and product = grad * y, y recovered from out, the exceptions patched in."""
        channels = alpha.size
        for row in range(out.size // inner):
            a = alpha[row % channels]
            inverse = np.float32(1.0) / a
            span = slice(row * inner, row * inner + inner)
            o, g, gy, p = out[span], grad[span], grad_y[span], product[span]
            for j in range(inner):
                gj = value(g[j])
                gy[j] = rounded(gj * a)
                p[j] = rounded(gj * recovered(o[j], inverse))
        for e in range(indices.size):  # the exceptions' products, from their kept y
            i = indices[e]
            product[i] = rounded(value(grad[i]) * value(values[e]))

    return forward, backward


_SCALING = {torch.float32: (_scaling(False), np.float32), torch.bfloat16: (_scaling(True), np.uint16)}


def _channel_layout(y: Tensor, alpha: Tensor) -> int | None:
    """Elements per (sample, channel) row when the kernels take ``y * alpha``: y dense and contiguous, alpha
    one value per channel of y's dtype, shaped to broadcast along dim 1; None otherwise."""
    if not (covered(y) and y.is_contiguous() and y.dim() >= 2 and alpha.dtype == y.dtype and alpha.device == y.device):
        return None
    if tuple(alpha.shape) != (y.shape[1], *([1] * (y.dim() - 2))):
        return None
    return y[0, 0].numel()


def scale_channels(y: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """(y * alpha, exception indices, exception values) when y can be recovered from the product, or None
    where the kernel does not cover y or too many elements would be exceptions (1 in EXCEPTION_SHARE)."""
    inner = _channel_layout(y, alpha)
    if inner is None or not y.numel():
        return None
    (forward, _), bits = _SCALING[y.dtype]
    out = torch.empty_like(y)
    a = alpha.detach().reshape(-1).float().numpy()
    indices = np.empty(y.numel() // EXCEPTION_SHARE, dtype=np.int64)
    values = np.empty(indices.size, dtype=bits)
    count = forward(_flat(y, bits), a, inner, _flat(out, bits), indices, values)
    if count > indices.size:
        return None
    kept = torch.from_numpy(values[:count].copy())
    return out, torch.from_numpy(indices[:count].copy()), kept.view(torch.bfloat16) if y.dtype == torch.bfloat16 else kept


def scale_channels_backward(out: Tensor, alpha: Tensor, indices: Tensor, values: Tensor, grad: Tensor) -> tuple[Tensor, Tensor] | None:
    """(grad * alpha, grad * y) for ``out = y * alpha`` from :func:`scale_channels`, or None where the kernel
    does not cover grad (same layout as out)."""
    inner = _channel_layout(grad, alpha)
    if inner is None or grad.shape != out.shape or grad.dtype != out.dtype:
        return None
    (_, backward), bits = _SCALING[out.dtype]
    grad_y, product = torch.empty_like(out), torch.empty_like(out)
    kept = values.view(torch.int16).numpy().view(np.uint16) if out.dtype == torch.bfloat16 else values.numpy()
    a = alpha.detach().reshape(-1).float().numpy()
    backward(_flat(out, bits), _flat(grad, bits), a, inner, indices.numpy(), kept, _flat(grad_y, bits), _flat(product, bits))
    return grad_y, product
