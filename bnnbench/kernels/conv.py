"""Binary conv2d on packed bits, exact against ``F.conv2d`` of the same +-1 tensors.

Zero padding (what our backbones use: ``F.conv2d`` pads sign(a) with 0) is not
representable in one bit.  The kernel pads with +1 (bit 0) and removes what
the padded taps added: for output position p and filter n,

    correction[n, p] = sum over taps (i, j) of p that fall in the padding of S[n, i, j],
    S[n, i, j] = sum_c w[n, c, i, j]

computed once per weight and input size (it is a 1-channel convolution of the
padding mask with S) and cached on the :class:`PackedWeights`.  The result is

    y[b, n, p] = K - 2 popcount(a XOR w) - correction[n, p],   K = C kh kw,

integers well inside float32's exact range, hence equal to ``F.conv2d``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .buffers import stream_threshold
from .gemm import _NO_BITS, SELECTED, GemmVariant, MicroKernel, filter_panels, gemm_variant, pack_and_gemm, padded_filters, row_tables
from .packing import in_memory_order, output_size, pack_channels, packed_shape, words_for


@dataclass(frozen=True)
class ConvPlan:
    """What a conv of one input geometry needs on every call, worked out once (:meth:`PackedWeights.plan`).

    ``packed_shape`` and ``tables``: the packed input and the GEMM's row tables; ``rows``: the shape of the
    GEMM's float output (B OH OW, padded filters), of which ``size`` / ``strides`` view the valid filters as
    (B, O, OH, OW), channels last; ``variant``: the GEMM variant (streaming stores when the output is larger
    than :func:`~bnnbench.kernels.buffers.stream_threshold`; torch's allocations are 64-byte aligned).
    """

    packed_shape: tuple[int, int, int, int]
    tables: np.ndarray
    panels: np.ndarray
    offsets: np.ndarray
    variant: GemmVariant
    rows: tuple[int, int]
    size: tuple[int, int, int, int]
    strides: tuple[int, int, int, int]


@dataclass
class PackedWeights:
    """Filters of a binary conv as bits, with what the GEMM and the border correction need.

    ``bits``: (out_channels, kh * kw * words) uint64, tap-major (kernel row, column, word)
    (the stored form); :meth:`panels`: the same bits in a micro-kernel's filter
    panels; ``tap_sums``: (out_channels, kh, kw) int32, S[n, i, j] = sum_c w[n, c, i, j].
    """

    bits: np.ndarray
    in_channels: int
    kernel_size: tuple[int, int]
    tap_sums: np.ndarray = field(init=False, repr=False)
    _panels: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)
    _offsets: dict[tuple[int, int, int, int], np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)
    _plans: dict[tuple, ConvPlan] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kh, kw = self.kernel_size
        expected = kh * kw * words_for(self.in_channels)
        if self.bits.dtype != np.uint64 or self.bits.ndim != 2 or self.bits.shape[1] != expected:
            raise ValueError(
                f"packed filters must be a uint64 array (out_channels, {expected}) for {self.in_channels} channels and a "
                f"{kh}x{kw} kernel, got {self.bits.dtype} {self.bits.shape}"
            )
        self.bits = np.ascontiguousarray(self.bits)
        negatives = np.unpackbits(self.bits.view(np.uint8), axis=1, bitorder="little").reshape(len(self.bits), kh, kw, -1).sum(axis=3)
        self.tap_sums = (self.in_channels - 2 * negatives).astype(np.int32)

    @property
    def out_channels(self) -> int:
        return self.bits.shape[0]

    @property
    def k_bits(self) -> int:
        """Binary MACs per output value: in_channels * kh * kw."""
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def panels(self, kernel: MicroKernel = SELECTED) -> np.ndarray:
        """The filters as ``kernel``'s panels (:func:`~bnnbench.kernels.gemm.filter_panels`), cached per kernel."""
        if kernel.name not in self._panels:
            self._panels[kernel.name] = filter_panels(self.bits, kernel)
        return self._panels[kernel.name]

    def offsets(self, height: int, width: int, stride: int, padding: int) -> np.ndarray:
        """GEMM offsets K - correction, (OH * OW, padded filters) float32 (integers), cached per input size."""
        key = (height, width, stride, padding)
        if key not in self._offsets:
            correction = border_correction(self.tap_sums, height, width, stride, padding)
            offsets = np.zeros((correction.shape[1], padded_filters(self.out_channels)), dtype=np.float32)
            offsets[:, : self.out_channels] = self.k_bits - correction.T
            self._offsets[key] = offsets
        return self._offsets[key]

    def plan(self, shape: tuple[int, int, int, int], stride: int, padding: int, kernel: MicroKernel = SELECTED) -> ConvPlan:
        """The :class:`ConvPlan` of a (B, C, H, W) input ``shape``, made on the first call and cached; the arguments are
        checked when a plan is made (a key that fails never enters the cache), and ``BNNBENCH_STREAM_BYTES`` read."""
        key = (shape, stride, padding, kernel.name)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._new_plan(shape, stride, padding, kernel, stream_threshold())
        return plan

    def _new_plan(self, shape: tuple[int, int, int, int], stride: int, padding: int, kernel: MicroKernel, threshold: int) -> ConvPlan:
        _check_int("stride", stride, minimum=1)
        _check_int("padding", padding, minimum=0)
        if len(shape) != 4:
            raise ValueError(f"binary_conv2d expects a (B, C, H, W) input, got shape {tuple(shape)}")
        batch, channels, height, width = shape
        if channels != self.in_channels:
            raise ValueError(f"input has {channels} channels but the weights expect {self.in_channels}")
        kh, kw = self.kernel_size
        out_h, out_w = output_size(height, kh, stride, padding), output_size(width, kw, stride, padding)
        offsets = self.offsets(height, width, stride, padding)
        rows = (batch * out_h * out_w, offsets.shape[1])
        packed = packed_shape(batch, channels, height, width, padding)
        return ConvPlan(
            packed_shape=packed,
            tables=row_tables(packed, self.kernel_size, stride, _NO_BITS.shape, kernel.rows),
            panels=self.panels(kernel),
            offsets=offsets,
            variant=gemm_variant(kernel.name, "counts", 4 * rows[0] * rows[1] > threshold),
            rows=rows,
            size=(batch, self.out_channels, out_h, out_w),
            strides=(out_h * out_w * rows[1], 1, out_w * rows[1], rows[1]),
        )


def pack_weights(w: Tensor) -> PackedWeights:
    """Pack (O, C, kh, kw) weights; values are binarised with sign (sign(0) = +1)."""
    if w.dim() != 4:
        raise ValueError(f"binary conv weights must be (out, in, kh, kw), got shape {tuple(w.shape)}")
    array = _as_array(w, "weights")
    out_channels, in_channels, kh, kw = array.shape
    return PackedWeights(bits=pack_channels(array).reshape(out_channels, -1), in_channels=in_channels, kernel_size=(kh, kw))


def unpack_weights(packed: PackedWeights) -> Tensor:
    """The +-1 float32 filters (O, C, kh, kw) that ``packed`` holds (inverse of :func:`pack_weights`)."""
    kh, kw = packed.kernel_size
    bits = np.unpackbits(packed.bits.view(np.uint8), axis=1, bitorder="little")
    negative = bits.reshape(packed.out_channels, kh, kw, -1)[..., : packed.in_channels]
    return torch.from_numpy(1.0 - 2.0 * negative.astype(np.float32)).permute(0, 3, 1, 2).contiguous()


def border_correction(tap_sums: np.ndarray, height: int, width: int, stride: int, padding: int) -> np.ndarray:
    """What +1 padding adds over zero padding, per filter and output position: (O, OH * OW) int32."""
    out_channels, kh, kw = tap_sums.shape
    out_h, out_w = output_size(height, kh, stride, padding), output_size(width, kw, stride, padding)
    if padding == 0:
        return np.zeros((out_channels, out_h * out_w), dtype=np.int32)
    outside = torch.ones(1, 1, height + 2 * padding, width + 2 * padding, dtype=torch.float64)
    outside[..., padding : padding + height, padding : padding + width] = 0
    sums = torch.from_numpy(tap_sums.astype(np.float64)).unsqueeze(1)
    correction = F.conv2d(outside, sums, stride=stride)
    return correction.reshape(out_channels, out_h * out_w).round().numpy().astype(np.int32)


def binary_conv2d_packed(x: Tensor, weights: PackedWeights, stride: int = 1, padding: int = 0, kernel: MicroKernel = SELECTED) -> Tensor:
    """``F.conv2d(sign(x), sign(w), stride=stride, padding=padding)`` from packed weights.

    ``x`` is (B, C, H, W), real or +-1 (binarised while packing, sign(0) = +1),
    on the CPU, contiguous or channels last.  The result is a float32
    (B, O, OH, OW) tensor in channels-last memory format (the GEMM writes
    NHWC; call ``.contiguous()`` for NCHW memory).  ``kernel``: the GEMM's
    micro-kernel (default: the one selected for this CPU).
    """
    _check_int("stride", stride, minimum=1)  # here as well as in the plan: True == 1 as a dictionary key
    _check_int("padding", padding, minimum=0)
    plan = weights.plan(x.shape, stride, padding, kernel)
    out = torch.empty(plan.rows)
    kh, kw = weights.kernel_size
    array, channels_last = in_memory_order(_as_array(x, "input"))
    pack_and_gemm(array, channels_last, padding, plan.packed_shape, plan.tables, kh, kw, stride, plan.panels, plan.offsets, out.numpy(), plan.variant, numba.get_num_threads())
    return out.as_strided(plan.size, plan.strides)


def binary_conv2d(x: Tensor, w: Tensor, stride: int = 1, padding: int = 0, kernel: MicroKernel = SELECTED) -> Tensor:
    """Binary convolution of +-1 tensors by XNOR-popcount; equals ``F.conv2d(x, w, ...)`` exactly.

    Both tensors are packed here (values binarised with sign, sign(0) = +1);
    use :func:`pack_weights` and :func:`binary_conv2d_packed` to pack the
    weights once.
    """
    return binary_conv2d_packed(x, pack_weights(w), stride=stride, padding=padding, kernel=kernel)


def _as_array(t: Tensor, what: str) -> np.ndarray:
    if t.dtype is torch.float32 and t.is_cpu:  # the common case, in the fewest tensor calls (a batch-1 conv feels each)
        return (t.detach() if t.requires_grad else t).numpy()
    if not t.is_cpu:
        raise ValueError(f"the packed binary conv runs on the CPU; move the {what} there with .cpu() (got device {t.device})")
    if not t.is_floating_point():
        raise TypeError(f"binary conv {what} must be a floating-point tensor of +-1 values, got {t.dtype}")
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t.detach().numpy()  # any strides: pack_channels reads NCHW and channels-last in place


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} (the same value for height and width), got {value!r}")
