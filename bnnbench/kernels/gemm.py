"""The XNOR-popcount GEMM of a binary convolution, over an implicit im2col of the packed input.

Row m = (image b, output position p) of the GEMM is the receptive field of p:
``kh`` runs of ``kw * words`` consecutive words of the padded, packed input
(B, Hp, Wp, words), one run per kernel row.  The kernel reads those runs in
place (an implicit im2col: no patch matrix is built) and writes

    out[m, n] = offsets[p, n] - 2 * sum_k popcount(a[m, k] ^ w[n, k])

where ``offsets = K_bits - correction`` (K_bits = C kh kw; the border
correction of :mod:`bnnbench.kernels.conv`): the convolution output with
filters contiguous, i.e. NHWC.

Register blocking: filters are stored as panels of ``LANES`` = 8,
``panels[j, k, l] = w[8 j + l, k]``, and a block is ``ROWS`` = 4 rows x 8
filters.  One step loads the k-th words of the 8 filters as one ``<8 x i64>``
vector; each of the first ``VECTOR_ROWS`` = 3 rows broadcasts its k-th word and
accumulates ``ctpop(a ^ w)`` in a vector register, and the last row does the
same 8 XOR-popcounts with scalar POPCNT, so the integer units work alongside
the vector units (on an AVX2 Zen 3 this runs about 20% faster than 4 vector
rows; compare the ``vector`` and ``mixed`` peaks of
:func:`~bnnbench.kernels.popcount.popcount_peak_gops`).  The epilogue turns each
row's 8 counts into 8 float32 outputs with one subtraction and one conversion.

The micro-kernel is LLVM IR (a numba intrinsic) using the generic
``llvm.ctpop`` intrinsics, which LLVM lowers for the host CPU: VPOPCNTQ with
AVX-512 VPOPCNTDQ, a VPSHUFB nibble table with AVX2, POPCNT for scalars.
Remainders: the output has its rows padded to a multiple of 4 (padding rows
repeat the last receptive field) and its filters to a multiple of 8 (zero
filters from :func:`filter_panels`); the caller drops the padding.
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
def _gemm_block(typingctx, packed, starts, runs, run_words, pitch, panels, panel, offsets, positions, out, first_row):  # type: ignore[no-untyped-def]
    """One block: ROWS rows (receptive fields starting at packed[starts[i]]) x the 8 filters of ``panel``.

    Row i reads ``runs`` runs of ``run_words`` words, run r at
    ``starts[i] + r * pitch``; it is written to ``out[first_row + i]``
    with the offsets of output position ``positions[i]``.
    """
    arrays_ok = (
        _is_array(packed, types.uint64, 1)
        and _is_array(starts, types.int64, 1)
        and _is_array(panels, types.uint64, 3)
        and _is_array(offsets, types.int32, 2)
        and _is_array(positions, types.int64, 1)
        and _is_array(out, types.float32, 2)
    )
    if not arrays_ok:
        return None
    signature = types.void(packed, starts, types.intp, types.intp, types.intp, panels, types.intp, offsets, positions, out, types.intp)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        packed_a, starts_a, panels_a, offsets_a, positions_a, out_a = (
            context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 1, 5, 7, 8, 9)
        )
        runs, run_words, pitch, panel, first_row = args[2], args[3], args[4], args[6], args[10]
        width = builder.extract_value(out_a.shape, 1)  # = offsets.shape[1] = LANES * panels.shape[0]
        panel_base = builder.gep(panels_a.data, [builder.mul(panel, builder.mul(builder.mul(runs, run_words), _int(LANES)))])
        starts = [builder.load(builder.gep(starts_a.data, [_int(i)])) for i in range(ROWS)]
        vector_sums = [cgutils.alloca_once_value(builder, ir.Constant(WORDS, [0] * LANES)) for _ in range(VECTOR_ROWS)]
        scalar_sums = [[cgutils.alloca_once_value(builder, _int(0)) for _ in range(LANES)] for _ in range(VECTOR_ROWS, ROWS)]
        with cgutils.for_range(builder, runs) as run:
            run_filters = builder.gep(panel_base, [builder.mul(builder.mul(run.index, run_words), _int(LANES))])
            run_rows = [builder.gep(packed_a.data, [builder.add(start, builder.mul(run.index, pitch))]) for start in starts]
            with cgutils.for_range(builder, run_words) as step:
                k = step.index
                filter_words = builder.gep(run_filters, [builder.mul(k, _int(LANES))])
                filters = builder.load(builder.bitcast(filter_words, WORDS.as_pointer()), align=8)
                for i, row in enumerate(run_rows):
                    word = builder.load(builder.gep(row, [k]))
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
def xnor_gemm(packed: np.ndarray, kernel_size: tuple, stride: int, panels: np.ndarray, offsets: np.ndarray, out: np.ndarray) -> None:
    """Binary conv of the padded packed input (B, Hp, Wp, words) into ``out`` (M', 8 J) float32.

    ``kernel_size`` = (kh, kw); ``panels`` (J, kh kw words, 8) from
    :func:`filter_panels`; ``offsets`` (OH OW, 8 J) int32; M' = B OH OW
    rounded up to a multiple of ``ROWS``.
    """
    batch, height, width, words = packed.shape
    kernel_h, kernel_w = kernel_size
    out_h = (height - kernel_h) // stride + 1
    out_w = (width - kernel_w) // stride + 1
    positions_per_image = out_h * out_w
    last_row = batch * positions_per_image - 1
    flat = packed.reshape(-1)
    pitch = width * words
    for block in prange(out.shape[0] // ROWS):
        first = block * ROWS
        starts = np.empty(ROWS, dtype=np.int64)
        positions = np.empty(ROWS, dtype=np.int64)
        for i in range(ROWS):
            m = min(first + i, last_row)
            b = m // positions_per_image
            p = m - b * positions_per_image
            oh = p // out_w
            ow = p - oh * out_w
            starts[i] = ((b * height + oh * stride) * width + ow * stride) * words
            positions[i] = p
        for panel in range(panels.shape[0]):
            _gemm_block(flat, starts, kernel_h, kernel_w * words, pitch, panels, panel, offsets, positions, out, first)


def output_rows(batch: int, out_h: int, out_w: int) -> int:
    """Rows of the GEMM output: B OH OW rounded up to a multiple of ``ROWS``."""
    return -(-(batch * out_h * out_w) // ROWS) * ROWS


def filter_panels(bits: np.ndarray) -> np.ndarray:
    """(N, K) packed filters -> (ceil(N / LANES), K, LANES) panels, zero-padded."""
    filters, words = bits.shape
    padded = np.zeros((padded_filters(filters), words), dtype=np.uint64)
    padded[:filters] = bits
    return np.ascontiguousarray(padded.reshape(-1, LANES, words).transpose(0, 2, 1))


def padded_filters(filters: int) -> int:
    """Filter count rounded up to whole panels."""
    return -(-filters // LANES) * LANES
