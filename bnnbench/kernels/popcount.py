"""Population count for numba: LLVM ``ctpop`` on scalars and vectors, and the machine's measured peak.

numba 0.68 does not compile ``np.bitwise_count`` in nopython mode, so
:func:`popcount` emits ``llvm.ctpop.i64`` directly, and :func:`vector_popcount`
the vector form ``llvm.ctpop.v8i64`` for kernels written in LLVM IR.  LLVM
lowers them for the host CPU: POPCNT, VPOPCNTQ (AVX-512 VPOPCNTDQ) or a
VPSHUFB nibble table (AVX2).

Throughput convention (SPEC section 6): one 64-bit word of ``a XOR w``
followed by a popcount is 64 binary multiply-accumulates, i.e. 128 binary
operations, so a binary GEMM of M x N x K bits performs ``2 M N K`` operations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

OPS_PER_WORD = 2 * 64  # a 64-bit XOR + popcount = 64 binary MACs = 128 binary ops
LANES = 8  # 64-bit lanes of the vector kernels: one AVX-512 register, two AVX2 registers
KEY_WORDS = 256  # the peak loops read their keys cyclically from the first KEY_WORDS words

I32 = ir.IntType(32)
I64 = ir.IntType(64)
WORDS = ir.VectorType(I64, LANES)


@intrinsic
def popcount(typingctx, word):  # type: ignore[no-untyped-def]
    """Number of set bits of a 64-bit integer, as int64 (``llvm.ctpop.i64``)."""
    if not isinstance(word, types.Integer) or word.bitwidth != 64:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.ctpop(args[0])

    return types.int64(word), codegen


# numba keys the on-disk cache of a jitted function on its own file only: after editing the IR
# helpers below, delete bnnbench/kernels/__pycache__ so that gemm.xnor_gemm is recompiled.


def vector_popcount(builder: ir.IRBuilder, value: ir.Value) -> ir.Value:
    """IR: per-lane popcount of a ``<LANES x i64>`` value."""
    function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(WORDS, [WORDS]), f"llvm.ctpop.v{LANES}i64")
    return builder.call(function, [value])


def splat(builder: ir.IRBuilder, word: ir.Value) -> ir.Value:
    """IR: a ``<LANES x i64>`` vector with ``word`` in every lane."""
    single = builder.insert_element(ir.Constant(WORDS, ir.Undefined), word, ir.Constant(I32, 0))
    return builder.shuffle_vector(single, ir.Constant(WORDS, ir.Undefined), ir.Constant(ir.VectorType(I32, LANES), [0] * LANES))


def _chains(vector_chains: int, scalar_chains: int) -> Callable[[np.ndarray, int], int]:
    """A loop of independent ``acc += popcount(x ^ k)`` chains on registers: vector and/or scalar ones."""

    @intrinsic
    def chains(typingctx, words, repeats):  # type: ignore[no-untyped-def]
        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            vectors = [
                builder.load(builder.bitcast(builder.gep(data, [ir.Constant(I64, LANES * c)]), WORDS.as_pointer()), align=8)
                for c in range(vector_chains)
            ]
            scalars = [builder.load(builder.gep(data, [ir.Constant(I64, LANES * vector_chains + c)])) for c in range(scalar_chains)]
            vector_sums = [cgutils.alloca_once_value(builder, ir.Constant(WORDS, [0] * LANES)) for _ in vectors]
            scalar_sums = [cgutils.alloca_once_value(builder, ir.Constant(I64, 0)) for _ in scalars]
            with cgutils.for_range(builder, args[1]) as loop:
                # the key comes from memory, as the GEMM's broadcast row words do (a load, not a vector-port shuffle)
                key = builder.load(builder.gep(data, [builder.and_(loop.index, ir.Constant(I64, KEY_WORDS - 1))]))
                keys = splat(builder, key)
                for x, acc in zip(vectors, vector_sums):
                    builder.store(builder.add(builder.load(acc), vector_popcount(builder, builder.xor(x, keys))), acc)
                for x, acc in zip(scalars, scalar_sums):
                    builder.store(builder.add(builder.load(acc), builder.ctpop(builder.xor(x, key))), acc)
            total = ir.Constant(I64, 0)
            for acc in vector_sums:
                lanes = builder.load(acc)
                for lane in range(LANES):
                    total = builder.add(total, builder.extract_element(lanes, ir.Constant(I32, lane)))
            for acc in scalar_sums:
                total = builder.add(total, builder.load(acc))
            return total

        return types.int64(words, types.intp), codegen

    @njit
    def run(words: np.ndarray, repeats: int) -> int:
        return chains(words, repeats)

    return run


# (vector chains, scalar chains) of the peak loops, by kind; the best of each kind counts
PEAK_LOOPS = {
    "scalar": ((0, 8), (0, 12)),
    "vector": ((4, 0), (8, 0), (12, 0), (14, 0)),
    "mixed": ((2, 4), (4, 8), (8, 2), (12, 2)),
}


@dataclass(frozen=True)
class PeakLoop:
    """One peak loop: ``vector_chains`` ``<8 x i64>`` and ``scalar_chains`` 64-bit XOR-popcount-accumulate chains."""

    vector_chains: int
    scalar_chains: int
    repeats: int = 1024  # iterations per call: about 0.1 ms, short enough to dodge the scheduler on a shared machine

    @property
    def ops_per_call(self) -> int:
        """Binary operations of one call."""
        return OPS_PER_WORD * self.repeats * (LANES * self.vector_chains + self.scalar_chains)

    def call(self) -> Callable[[], int]:
        """A compiled zero-argument call of the loop (warmed up), for timing it alongside a kernel."""
        words = np.random.default_rng(0).integers(0, np.iinfo(np.int64).max, KEY_WORDS, dtype=np.int64).view(np.uint64)
        run = _chains(self.vector_chains, self.scalar_chains)
        run(words, 1)
        return lambda: run(words, self.repeats)


@dataclass
class PeakMeasurement:
    """Best single-thread binary GOPS per kind of loop (and "peak", their maximum) and the fastest loop."""

    rates: dict[str, float]
    fastest: PeakLoop


def measure_peak(seconds: float = 1.0) -> PeakMeasurement:
    """Time every loop of :data:`PEAK_LOOPS` for about ``seconds`` in all (best call of each)."""
    budget = seconds / sum(len(loops) for loops in PEAK_LOOPS.values())
    rates: dict[str, float] = {}
    fastest, best = PeakLoop(*PEAK_LOOPS["vector"][0]), 0.0
    for kind, loops in PEAK_LOOPS.items():
        rates[kind] = 0.0
        for vector_chains, scalar_chains in loops:
            loop = PeakLoop(vector_chains, scalar_chains)
            rate = loop.ops_per_call / _best_time(loop.call(), budget) / 1e9
            rates[kind] = max(rates[kind], rate)
            if rate > best:
                fastest, best = loop, rate
    rates["peak"] = best
    return PeakMeasurement(rates, fastest)


def popcount_peak_gops(seconds: float = 1.0) -> dict[str, float]:
    """Single-thread binary GOPS of tiny XOR-popcount-accumulate loops on registers, and their maximum ("peak").

    ``scalar``: chains of 64-bit POPCNT; ``vector``: chains of ``<8 x i64>``
    ctpop (as in the GEMM's micro-kernel); ``mixed``: both in one loop, which
    keeps the integer and vector units busy together.  Each kind tries a few
    chain counts (:data:`PEAK_LOOPS`) and reports its best.  Every loop reads
    its key words from memory, as the GEMM does, so LLVM cannot vectorise the
    scalar chains across iterations.  See :func:`measure_peak`.
    """
    return measure_peak(seconds).rates


def _best_time(call: Callable[[], object], budget: float) -> float:
    """Best seconds per call over repeated calls within ``budget`` seconds (at least 20 calls)."""
    best = float("inf")
    start = time.perf_counter()
    calls = 0
    while calls < 20 or time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return best
