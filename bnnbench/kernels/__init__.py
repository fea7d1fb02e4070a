"""Bit-packed binary inference: XNOR-popcount convolution on the CPU (numba).

Public API::

    binary_conv2d(x, w, stride=1, padding=0)             +-1 float tensors in, float32 out
    pack_weights(w) -> PackedWeights                     pack once
    binary_conv2d_packed(x, packed, stride=1, padding=0)  conv with pre-packed weights
    pack_channels, im2col, xnor_gemm                          the three stages, for benchmarks
    popcount_peak_gops()                                  the machine's measured popcount peak

Kernels compile on first use and are cached by numba next to this package
(``__pycache__``) or, when that folder is not writable, in numba's user-wide
cache (``NUMBA_CACHE_DIR`` overrides both).
"""

from .conv import PackedWeights, binary_conv2d, binary_conv2d_packed, border_correction, pack_weights
from .gemm import LANES, ROWS, filter_panels, padded_filters, xnor_gemm
from .packing import im2col, output_size, pack_channels, words_for
from .popcount import OPS_PER_WORD, popcount, popcount_peak_gops

__all__ = [
    "LANES",
    "OPS_PER_WORD",
    "PackedWeights",
    "ROWS",
    "binary_conv2d",
    "binary_conv2d_packed",
    "border_correction",
    "filter_panels",
    "im2col",
    "output_size",
    "pack_channels",
    "pack_weights",
    "padded_filters",
    "popcount",
    "popcount_peak_gops",
    "words_for",
    "xnor_gemm",
]
