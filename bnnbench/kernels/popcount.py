"""Population count for numba: an LLVM ``ctpop`` intrinsic and the machine's measured peak.

numba 0.68 does not compile ``np.bitwise_count`` in nopython mode, so
:func:`popcount` emits ``llvm.ctpop.i64`` directly; LLVM lowers it to the
``popcnt`` instruction (or AVX2/AVX-512 sequences when it vectorises a loop).

Throughput convention (SPEC section 6): one 64-bit word of ``a XOR w``
followed by a popcount is 64 binary multiply-accumulates, i.e. 128 binary
operations, so a binary GEMM of M x N x K bits performs ``2 M N K`` operations.
"""

from __future__ import annotations

import time

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

OPS_PER_WORD = 2 * 64  # a 64-bit XOR + popcount = 64 binary MACs = 128 binary ops


@intrinsic
def popcount(typingctx, word):  # type: ignore[no-untyped-def]
    """Number of set bits of an integer, as int64 (``llvm.ctpop``)."""
    if not isinstance(word, types.Integer) or word.bitwidth != 64:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.ctpop(args[0])

    return types.int64(word), codegen


@njit(cache=True)
def _popcount_chains(words: np.ndarray, repeats: int) -> int:
    """Eight independent XOR-popcount-accumulate chains on registers (no memory traffic)."""
    x0, x1, x2, x3 = words[0], words[1], words[2], words[3]
    x4, x5, x6, x7 = words[4], words[5], words[6], words[7]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0
    for r in range(repeats):
        key = np.uint64(r)
        s0 += popcount(x0 ^ key)
        s1 += popcount(x1 ^ key)
        s2 += popcount(x2 ^ key)
        s3 += popcount(x3 ^ key)
        s4 += popcount(x4 ^ key)
        s5 += popcount(x5 ^ key)
        s6 += popcount(x6 ^ key)
        s7 += popcount(x7 ^ key)
    return s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7


@njit(cache=True)
def _popcount_stream(a: np.ndarray, b: np.ndarray, repeats: int) -> int:
    """sum popcount(a ^ b) over L1-resident arrays (LLVM vectorises this loop)."""
    total = 0
    for _ in range(repeats):
        for i in range(a.shape[0]):
            total += popcount(a[i] ^ b[i])
    return total


def popcount_peak_gops(seconds: float = 0.3) -> dict[str, float]:
    """Single-thread binary GOPS of two tiny popcount loops and their maximum ("peak").

    ``registers``: eight independent chains of xor/popcnt/add, no loads;
    ``stream``: a reduction over two 4 KiB arrays, as LLVM vectorises it.
    Each is timed as the best of several runs of about ``seconds / 6``.
    """
    rng = np.random.default_rng(0)
    words = rng.integers(0, np.iinfo(np.int64).max, 512, dtype=np.int64).view(np.uint64)
    other = words[::-1].copy()
    chain_repeats, stream_repeats = 1 << 20, 1 << 10
    _popcount_chains(words, 1)
    _popcount_stream(words, other, 1)
    results = {
        "registers": _best_rate(lambda: _popcount_chains(words, chain_repeats), 8 * chain_repeats, seconds / 2),
        "stream": _best_rate(lambda: _popcount_stream(words, other, stream_repeats), words.size * stream_repeats, seconds / 2),
    }
    results["peak"] = max(results.values())
    return results


def _best_rate(call, words: int, budget: float) -> float:  # type: ignore[no-untyped-def]
    """Best GOPS over repeated calls within ``budget`` seconds (at least 3 calls)."""
    best = float("inf")
    start = time.perf_counter()
    calls = 0
    while calls < 3 or time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return OPS_PER_WORD * words / best / 1e9
