"""The XNOR-popcount GEMM: register blocks of 4 rows x 8 filters on the vector and integer units at once.

For packed rows ``a[m]`` (receptive fields, from :func:`~bnnbench.kernels.packing.im2col`)
and filters ``w[n]`` of K words each, the GEMM writes

    out[m, n] = offsets[m mod P, n] - 2 * sum_k popcount(a[m, k] ^ w[n, k])

where ``offsets = K_bits - correction`` (the border correction of
:mod:`bnnbench.kernels.conv`; P output positions per image), i.e. the
convolution output with rows m = (image, position) and filters contiguous: NHWC.

Filters are stored as panels of ``LANES`` = 8: ``panels[j, k, l] = w[8 j + l, k]``.
One step of the micro-kernel loads the k-th words of 8 filters as one
``<8 x i64>`` vector; each of the first ``VECTOR_ROWS`` = 3 rows broadcasts its
k-th word and accumulates ``ctpop(a ^ w)`` in a vector register, and the last
row of the block does the same 8 XOR-popcounts with scalar POPCNT, so the
integer units work alongside the vector units (on an AVX2 Zen 3 this mix runs
about 20% faster than 4 vector rows; compare the ``vector`` and ``mixed``
peaks of :func:`~bnnbench.kernels.popcount.popcount_peak_gops`).  The epilogue
turns each row's 8 counts into 8 float32 outputs with one subtraction and one
conversion.  The micro-kernel is LLVM IR (a numba intrinsic) with the generic
``llvm.ctpop`` intrinsics, which LLVM lowers for the host CPU: VPOPCNTQ with
AVX-512 VPOPCNTDQ, a VPSHUFB nibble table with AVX2, POPCNT for scalars.
Remainders: ``im2col`` zero-pads the rows to a multiple of 4 and
``filter_panels`` the filters to a multiple of 8; the GEMM computes the padded
block in full and the caller drops the padding.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .popcount import I32, I64, LANES, WORDS, splat, vector_popcount

ROWS = 4
VECTOR_ROWS = 3  # the other ROWS - VECTOR_ROWS rows use scalar POPCNT

_INTS = ir.VectorType(I32, LANES)
_FLOATS = ir.VectorType(ir.FloatType(), LANES)


def _is_array(ty: types.Type, dtype: types.Type, ndim: int) -> bool:
    return isinstance(ty, types.Array) and ty.dtype == dtype and ty.ndim == ndim and ty.layout == "C"


def _int(value: int) -> ir.Constant:
    return ir.Constant(I64, value)


def _vector_pointer(builder: ir.IRBuilder, base: ir.Value, offset: ir.Value, vector: ir.VectorType) -> ir.Value:
    return builder.bitcast(builder.gep(base, [offset]), vector.as_pointer())


@intrinsic
def _gemm_block(typingctx, rows, first_row, panels, panel, offsets, positions, out):  # type: ignore[no-untyped-def]
    """out[first_row + i, 8 panel + l] = offsets[positions[i], 8 panel + l] - 2 sum_k popcount(rows[first_row + i, k] ^ panels[panel, k, l])."""
    arrays_ok = (
        _is_array(rows, types.uint64, 2)
        and _is_array(panels, types.uint64, 3)
        and _is_array(offsets, types.int32, 2)
        and _is_array(positions, types.int64, 1)
        and _is_array(out, types.float32, 2)
    )
    if not arrays_ok:
        return None
    signature = types.void(rows, types.intp, panels, types.intp, offsets, positions, out)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        rows_a, panels_a, offsets_a, positions_a, out_a = (
            context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 2, 4, 5, 6)
        )
        first_row, panel = args[1], args[3]
        words = builder.extract_value(rows_a.shape, 1)
        width = builder.extract_value(out_a.shape, 1)  # = offsets.shape[1] = LANES * panels.shape[0]
        row_base = builder.gep(rows_a.data, [builder.mul(first_row, words)])
        panel_base = builder.gep(panels_a.data, [builder.mul(panel, builder.mul(words, _int(LANES)))])
        vector_sums = [cgutils.alloca_once_value(builder, ir.Constant(WORDS, [0] * LANES)) for _ in range(VECTOR_ROWS)]
        scalar_sums = [[cgutils.alloca_once_value(builder, _int(0)) for _ in range(LANES)] for _ in range(VECTOR_ROWS, ROWS)]
        with cgutils.for_range(builder, words) as loop:
            k = loop.index
            filter_words = builder.gep(panel_base, [builder.mul(k, _int(LANES))])
            filters = builder.load(builder.bitcast(filter_words, WORDS.as_pointer()), align=8)
            for i in range(ROWS):
                word = builder.load(builder.gep(row_base, [builder.add(builder.mul(_int(i), words), k)]))
                if i < VECTOR_ROWS:
                    disagreements = vector_popcount(builder, builder.xor(splat(builder, word), filters))
                    builder.store(builder.add(builder.load(vector_sums[i]), disagreements), vector_sums[i])
                    continue
                for lane, total in enumerate(scalar_sums[i - VECTOR_ROWS]):
                    filter_word = builder.load(builder.gep(filter_words, [_int(lane)]))
                    builder.store(builder.add(builder.load(total), builder.ctpop(builder.xor(word, filter_word))), total)
        counts = [builder.load(total) for total in vector_sums]
        for lanes in scalar_sums:
            vector = ir.Constant(WORDS, ir.Undefined)
            for lane, total in enumerate(lanes):
                vector = builder.insert_element(vector, builder.load(total), ir.Constant(I32, lane))
            counts.append(vector)
        column = builder.mul(panel, _int(LANES))
        for i in range(ROWS):
            position = builder.load(builder.gep(positions_a.data, [_int(i)]))
            offset = builder.load(_vector_pointer(builder, offsets_a.data, builder.add(builder.mul(position, width), column), _INTS), align=4)
            twice = builder.shl(builder.trunc(counts[i], _INTS), ir.Constant(_INTS, [1] * LANES))
            values = builder.sitofp(builder.sub(offset, twice), _FLOATS)
            target = builder.add(builder.mul(builder.add(first_row, _int(i)), width), column)
            builder.store(values, _vector_pointer(builder, out_a.data, target, _FLOATS), align=4)
        return context.get_dummy_value()

    return signature, codegen


@njit(parallel=True, cache=True)
def xnor_gemm(rows: np.ndarray, panels: np.ndarray, offsets: np.ndarray, out: np.ndarray) -> None:
    """Fill ``out`` (M', 8 J) float32 from packed ``rows`` (M', K) and filter ``panels`` (J, K, 8).

    M' is a multiple of ``ROWS``; ``offsets`` is (P, 8 J) int32 = K_bits - correction,
    and row m uses ``offsets[m % P]``.
    """
    positions_per_image = offsets.shape[0]
    for block in prange(rows.shape[0] // ROWS):
        first = block * ROWS
        positions = np.empty(ROWS, dtype=np.int64)
        for i in range(ROWS):
            positions[i] = (first + i) % positions_per_image
        for panel in range(panels.shape[0]):
            _gemm_block(rows, first, panels, panel, offsets, positions, out)


def filter_panels(bits: np.ndarray) -> np.ndarray:
    """(N, K) packed filters -> (ceil(N / LANES), K, LANES) panels, zero-padded."""
    filters, words = bits.shape
    padded = np.zeros((padded_filters(filters), words), dtype=np.uint64)
    padded[:filters] = bits
    return np.ascontiguousarray(padded.reshape(-1, LANES, words).transpose(0, 2, 1))


def padded_filters(filters: int) -> int:
    """Filter count rounded up to whole panels."""
    return -(-filters // LANES) * LANES
