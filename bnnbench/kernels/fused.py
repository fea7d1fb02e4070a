"""Binary convs chained in bits: each one's epilogue emits the next one's packed input.

A :class:`BitActivation` is an activation held twice: as float32 values
(B H W rows x padded channels, channels last: what a residual add and the
real-valued layers read) and as its sign bits, packed and padded for the next
binary conv.  :class:`SignConv` is a binary conv whose GEMM epilogue applies
the folded per-channel affine map of the layer and its BatchNorm, adds the
residual, clamps with hardtanh and packs the signs
(:func:`~bnnbench.kernels.gemm.fused_gemm`), so consecutive binary layers
never go through float -> sign -> pack.  The conv itself stays integer-exact;
only the affine map is rounded (once per FMA, as float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .buffers import aligned_empty
from .conv import PackedWeights
from .gemm import SELECTED, MicroKernel, fused_gemm, padded_filters
from .packing import output_size, pack_channels, words_for


@dataclass
class BitActivation:
    """An activation (B, C, H, W) as float32 rows ``values`` (B H W, padded C) and packed ``bits`` (B, H + 2q, W + 2q, words).

    ``padding`` is the border q of ``bits``: the next conv's zero padding, held as +1 bits.
    """

    values: np.ndarray
    bits: np.ndarray
    shape: tuple[int, int, int, int]
    padding: int

    @classmethod
    def from_tensor(cls, x: Tensor, padding: int) -> BitActivation:
        """Pack a real (B, C, H, W) tensor (its signs) and keep its values, channels last (no copy when they already are)."""
        batch, channels, height, width = x.shape
        values = rows_of(x, padded_filters(channels))
        bits = pack_channels(values[:, :channels].reshape(batch, height, width, channels).transpose(0, 3, 1, 2), padding)
        return cls(values, bits, (batch, channels, height, width), padding)

    def tensor(self) -> Tensor:
        """The values as a (B, C, H, W) float32 tensor (channels-last memory, no copy)."""
        batch, channels, height, width = self.shape
        nhwc = torch.from_numpy(self.values).view(batch, height, width, -1)[..., :channels]
        return nhwc.permute(0, 3, 1, 2)


def rows_of(x: Tensor, padded: int) -> np.ndarray:
    """A real (B, C, H, W) tensor as float32 rows (B H W, ``padded``), channels last and zero-padded (a view when it can be)."""
    batch, channels, height, width = x.shape
    nhwc = x.detach().float().permute(0, 2, 3, 1)
    if channels == padded and nhwc.is_contiguous():
        return nhwc.reshape(-1, channels).numpy()
    rows = np.zeros((batch * height * width, padded), dtype=np.float32)
    rows[:, :channels] = nhwc.reshape(-1, channels).numpy()
    return rows


@dataclass
class SignConv:
    """A binary conv followed by ``z = conv * scale + shift (+ residual)``, emitting hardtanh(z) and sign(z) in bits.

    ``scale``, ``shift``: (out_channels,) float64 per-channel factors (a bias,
    scale and BatchNorm folded together); padded filters get scale 0 and shift
    1, so their bits stay 0 (+1) as the packing convention needs.
    """

    weights: PackedWeights
    stride: int
    padding: int
    scale: np.ndarray
    shift: np.ndarray
    kernel: MicroKernel = SELECTED

    def __post_init__(self) -> None:
        padded = padded_filters(self.weights.out_channels)
        scale, shift = np.zeros(padded, dtype=np.float32), np.ones(padded, dtype=np.float32)
        scale[: self.weights.out_channels], shift[: self.weights.out_channels] = self.scale, self.shift
        self._scale, self._shift = scale, shift

    def __call__(self, x: BitActivation, residual: np.ndarray | None, next_padding: int) -> BitActivation:
        """The conv of ``x`` (whose bits must be padded by this conv's padding); output bits padded by ``next_padding``."""
        batch, channels, height, width = x.shape
        if x.padding != self.padding or channels != self.weights.in_channels:
            raise ValueError(
                f"this conv takes {self.weights.in_channels} channels packed with padding {self.padding}, "
                f"got {channels} with padding {x.padding}"
            )
        kh, kw = self.weights.kernel_size
        out_h, out_w = output_size(height, kh, self.stride, self.padding), output_size(width, kw, self.stride, self.padding)
        offsets = self.weights.offsets(height, width, self.stride, self.padding)
        values = aligned_empty((batch * out_h * out_w, offsets.shape[1]), np.float32)
        if residual is not None and residual.shape != values.shape:
            raise ValueError(f"the residual must be (B OH OW, padded channels) = {values.shape}, got {residual.shape}")
        bits = np.zeros((batch, out_h + 2 * next_padding, out_w + 2 * next_padding, words_for(self.weights.out_channels)), dtype=np.uint64)
        panels = self.weights.panels(self.kernel)
        fused_gemm(x.bits, (kh, kw), self.stride, panels, offsets, self._scale, self._shift, residual, values, bits, self.kernel)
        return BitActivation(values, bits, (batch, self.weights.out_channels, out_h, out_w), next_padding)
