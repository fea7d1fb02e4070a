"""What the kernels are compiled for: the CPU features LLVM targets, read at run time.

numba compiles for the host CPU unless ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``
say otherwise, so the features that matter for speed are LLVM's view of the
target, not a guess: :func:`target_features` reads ``NUMBA_CPU_FEATURES`` when
set and otherwise llvmlite's host CPU features (CPUID).  :func:`popcount_isa`
names the widest popcount the generated code can use.
"""

from __future__ import annotations

from functools import cache

import llvmlite.binding as llvm
import numba

AVX512_VPOPCNTDQ = "avx512-vpopcntdq"  # VPOPCNTQ on 512-bit registers
AVX2 = "avx2"  # 256-bit VPSHUFB nibble-table popcount, scalar POPCNT alongside
GENERIC = "generic"  # whatever LLVM makes of it (scalar POPCNT or bit tricks)


@cache
def target_features() -> frozenset[str]:
    """Features (``avx2``, ``avx512vpopcntdq``, ...) enabled for the code numba generates."""
    spec = llvm.get_host_cpu_features().flatten() if numba.config.CPU_FEATURES is None else numba.config.CPU_FEATURES
    return frozenset(flag[1:] for flag in spec.split(",") if flag.startswith("+"))


def popcount_isa(features: frozenset[str] | None = None) -> str:
    """The popcount instruction class of the target: :data:`AVX512_VPOPCNTDQ`, :data:`AVX2` or :data:`GENERIC`."""
    features = target_features() if features is None else features
    if {"avx512f", "avx512vpopcntdq"} <= features:
        return AVX512_VPOPCNTDQ
    if "avx2" in features:
        return AVX2
    return GENERIC
