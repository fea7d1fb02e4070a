"""Bit-packed binary inference: XNOR-popcount convolution on the CPU (numba).

Public API::

    binary_conv2d(x, w, stride=1, padding=0)             +-1 float tensors in, float32 out
    pack_weights(w) -> PackedWeights                     pack once (unpack_weights inverts it)
    binary_conv2d_packed(x, packed, stride=1, padding=0)  conv with pre-packed weights
    pack_channels, xnor_gemm                              the two stages, for benchmarks
    popcount_peak_gops(), measure_peak()                  the machine's measured popcount peak
    SELECTED, MICRO_KERNELS                               the GEMM micro-kernel chosen for this CPU, and all of them
    kernels.fused                                         binary convs chained in bits (sign epilogue)

Kernels compile on first use and are cached by numba next to this package
(``__pycache__``, ignored by git).  When that folder is not writable (an
installed, read-only package) the cache goes to ``$XDG_CACHE_HOME/bnnbench/numba``
(default ``~/.cache``) or, failing that, a per-user folder in the temporary
directory; ``NUMBA_CACHE_DIR`` overrides all of them.

Threads: ``numba.set_num_threads(n)``.  numba's OpenMP threading layer is
preferred over TBB (numba's default order): next to torch's own OpenMP pool it
scaled to 2 threads here (0.21 ms vs 0.39 ms for the 256@14x14 conv) where TBB
did not.  ``NUMBA_THREADING_LAYER`` or ``NUMBA_THREADING_LAYER_PRIORITY`` set
by the user take precedence.
"""

import os
import tempfile
from pathlib import Path

import numba


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


def _choose_cache_dir() -> None:
    """Point numba's cache at a writable folder when the package's own ``__pycache__`` is not."""
    if os.environ.get("NUMBA_CACHE_DIR") or _writable(Path(__file__).parent / "__pycache__"):
        return
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bnnbench" / "numba"
    for folder in (user_cache, Path(tempfile.gettempdir()) / f"bnnbench-numba-{os.getuid()}"):
        if _writable(folder):
            numba.config.CACHE_DIR = str(folder)
            return


_choose_cache_dir()  # before the kernel modules below create their cached dispatchers
if not {"NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY"} & set(os.environ):
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

from .conv import PackedWeights, binary_conv2d, binary_conv2d_packed, border_correction, pack_weights, unpack_weights
from .gemm import FILTER_MULTIPLE, MICRO_KERNELS, SELECTED, MicroKernel, filter_panels, fused_gemm, padded_filters, select_micro_kernel, xnor_gemm
from .isa import popcount_isa, target_features
from .packing import output_size, pack_channels, words_for
from .popcount import LANES, OPS_PER_WORD, PeakLoop, measure_peak, popcount, popcount_peak_gops

__all__ = [
    "FILTER_MULTIPLE",
    "LANES",
    "MICRO_KERNELS",
    "MicroKernel",
    "OPS_PER_WORD",
    "PackedWeights",
    "PeakLoop",
    "SELECTED",
    "binary_conv2d",
    "binary_conv2d_packed",
    "border_correction",
    "filter_panels",
    "fused_gemm",
    "output_size",
    "measure_peak",
    "pack_channels",
    "pack_weights",
    "padded_filters",
    "popcount",
    "popcount_isa",
    "popcount_peak_gops",
    "select_micro_kernel",
    "target_features",
    "unpack_weights",
    "words_for",
    "xnor_gemm",
]
