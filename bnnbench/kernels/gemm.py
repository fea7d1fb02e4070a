"""The XNOR-popcount GEMM of a binary convolution, over an implicit im2col of the packed input.

Row m = (image b, output position p) of the GEMM is the receptive field of p:
``kh`` runs of ``kw * words`` consecutive words of the padded, packed input
(B, Hp, Wp, words), one run per kernel row.  The kernel reads those runs in
place (an implicit im2col: no patch matrix is built) and computes

    conv[m, n] = offsets[p, n] - 2 * sum_k popcount(a[m, k] ^ w[n, k])

where ``offsets = K_bits - correction`` (K_bits = C kh kw; the border
correction of :mod:`bnnbench.kernels.conv`), with filters contiguous in the
output, i.e. NHWC.

Micro-kernels.  A :class:`MicroKernel` is a register block of ``rows`` GEMM
rows x ``8 * vectors`` filters.  Filters are stored as panels of that width,
``panels[j, k, l] = w[width * j + l, k]``; one step loads the k-th words of
the panel's filters as ``vectors`` ``<8 x i64>`` vectors, and each row
broadcasts its k-th word (a load) and accumulates ``ctpop(a ^ w)`` per vector.
The last ``scalar_rows`` rows do their XOR-popcounts with scalar POPCNT
instead, which runs on the integer units alongside the vector ones:

* ``4x8-mixed`` (3 vector rows + 1 scalar row, 8 filters), tuned on an AVX2
  Zen 3, where it beat 4 vector rows by about 20%;
* ``4x32`` (4 rows x 32 filters: 16 accumulators, 4 filter vectors and a
  broadcast in 32 zmm registers), for AVX-512 VPOPCNTDQ.  There the scalar row
  is the bottleneck (POPCNT has one port: 8 per step against 1.5 cycles of
  vector work per row) and a wide all-vector block amortises the epilogue;
  measured on a Xeon (family 6, AVX-512 VPOPCNTDQ), 4x32, 5x32, 6x32 and 8x16
  are within noise of each other on 14x14 and larger outputs and 2-3.5x faster
  than ``4x8-mixed``; 4x32 wastes the fewest padding rows on small batch-1
  outputs among the best.

:data:`SELECTED` is chosen at import from the target's popcount ISA
(:func:`~bnnbench.kernels.isa.popcount_isa`); ``BNNBENCH_MICRO_KERNEL=name``
overrides it.  Every variant compiles and is exact on every CPU; the ISA only
changes its speed.

Epilogues (what a block does with its counts), per row and 16 filters (two
count vectors narrowed into one ``<16 x i32>`` by a single VPERMT2D):

* ``"counts"``: ``out = conv`` (float32, one FMA: ``count * -2 + offset``), the
  exact convolution;
* ``"sign"`` / ``"add-sign"``: ``z = conv * scale[n] + shift[n]`` (a folded
  BatchNorm, one FMA), plus ``residual[m, n]`` for ``"add-sign"``;
  ``out = hardtanh(z)`` and the sign bits of ``z`` (bit 1 for z < 0, the
  packing convention) go straight into ``bits``, the next binary layer's padded
  packed input, as one 16-bit mask store.

The micro-kernel is LLVM IR (a numba intrinsic) using the generic ``llvm.ctpop``
intrinsics, which LLVM lowers for the target: VPOPCNTQ with AVX-512 VPOPCNTDQ,
a VPSHUFB nibble table with AVX2, POPCNT for scalars.  Remainders: rows beyond
the last repeat the last receptive field (and rewrite its output with the same
values); filters are padded with zero filters to a multiple of
:data:`FILTER_MULTIPLE` (:func:`filter_panels`); the caller drops them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import NativeValue, intrinsic, models, overload, register_model, typeof_impl, unbox

from .buffers import aligned_zeros, streams
from .packing import pack_rows
from .isa import AVX2, AVX512_VPOPCNTDQ, popcount_isa
from .popcount import I32, I64, LANES, WORDS, splat, vector_popcount

EPILOGUES = ("counts", "sign", "add-sign")
PANELS_PER_JOB = 4  # a parallel job is up to 8 row blocks x up to 4 panels, so that small images still split evenly
BLOCKS_PER_JOB = 8  # ... and a large one pays the job's index arithmetic once per 8 blocks (short dot products feel it)
MIN_JOBS = 64  # row blocks are grouped only while at least this many jobs remain


@dataclass(frozen=True)
class MicroKernel:
    """A register block of the GEMM: ``rows`` rows x ``8 * vectors`` filters, ``scalar_rows`` of the rows on scalar POPCNT."""

    name: str
    rows: int
    vectors: int
    scalar_rows: int
    tuned_for: str

    @property
    def filters(self) -> int:
        """Filters per block (the panel width)."""
        return LANES * self.vectors


MICRO_KERNELS = {
    kernel.name: kernel
    for kernel in (
        MicroKernel("4x8-mixed", rows=4, vectors=1, scalar_rows=1, tuned_for=AVX2),
        MicroKernel("4x32", rows=4, vectors=4, scalar_rows=0, tuned_for=AVX512_VPOPCNTDQ),
    )
}
FILTER_MULTIPLE = 32  # filters are padded to a multiple of every kernel's width, so offsets and outputs are shared


def select_micro_kernel(isa: str | None = None) -> MicroKernel:
    """The micro-kernel for ``isa`` (default: the target's), or the one named by ``BNNBENCH_MICRO_KERNEL``."""
    override = os.environ.get("BNNBENCH_MICRO_KERNEL")
    if override:
        if override not in MICRO_KERNELS:
            raise ValueError(f"BNNBENCH_MICRO_KERNEL={override!r} is not one of {', '.join(MICRO_KERNELS)}")
        return MICRO_KERNELS[override]
    isa = popcount_isa() if isa is None else isa
    tuned = [kernel for kernel in MICRO_KERNELS.values() if kernel.tuned_for == isa]
    return tuned[0] if tuned else MICRO_KERNELS["4x8-mixed"]


SELECTED = select_micro_kernel()


@dataclass(frozen=True)
class GemmVariant:
    """A micro-kernel, an epilogue and the kind of output store: passed to the jitted GEMM, whose compiled
    code it selects (one per variant).  ``stream``: the float output is written with non-temporal stores
    (:mod:`bnnbench.kernels.buffers`; the output must be 64-byte aligned)."""

    kernel: str
    epilogue: str
    stream: bool = False

    def __post_init__(self) -> None:
        # numba reads ``_numba_type_`` without a Python call: 0.6 us less per GEMM call than the typeof_impl lookup
        object.__setattr__(self, "_numba_type_", _variant_type(self.kernel, self.epilogue, self.stream))


class GemmVariantType(types.Type):
    """numba type of a :class:`GemmVariant`: the variant is part of the type, so each one compiles (and caches) apart."""

    def __init__(self, kernel: str, epilogue: str, stream: bool) -> None:
        self.kernel, self.epilogue, self.stream = kernel, epilogue, stream
        super().__init__(name=f"GemmVariant({kernel}, {epilogue}{', stream' if stream else ''})")


@typeof_impl.register(GemmVariant)
def _typeof_variant(value: GemmVariant, context: object) -> GemmVariantType:
    return _variant_type(value.kernel, value.epilogue, value.stream)


@cache
def _variant_type(kernel: str, epilogue: str, stream: bool) -> GemmVariantType:
    return GemmVariantType(kernel, epilogue, stream)


@cache
def gemm_variant(kernel: str, epilogue: str, stream: bool = False) -> GemmVariant:
    """The (one) :class:`GemmVariant` of a micro-kernel, an epilogue (one of :data:`EPILOGUES`) and a store kind."""
    if kernel not in MICRO_KERNELS or epilogue not in EPILOGUES:
        raise ValueError(f"no GEMM variant {kernel!r} / {epilogue!r}: kernels {', '.join(MICRO_KERNELS)}, epilogues {', '.join(EPILOGUES)}")
    return GemmVariant(kernel, epilogue, bool(stream))


register_model(GemmVariantType)(models.OpaqueModel)


@unbox(GemmVariantType)
def _unbox_variant(typ, obj, c):  # type: ignore[no-untyped-def]
    return NativeValue(c.context.get_dummy_value())

def _int(value: int) -> ir.Constant:
    return ir.Constant(I64, value)


def _is_array(ty: types.Type, dtype: types.Type, ndim: int) -> bool:
    return isinstance(ty, types.Array) and ty.dtype == dtype and ty.ndim == ndim and ty.layout == "C"


def _vector_at(builder: ir.IRBuilder, base: ir.Value, offset: ir.Value, vector: ir.VectorType) -> ir.Value:
    """Pointer to a vector at element ``offset`` of ``base``."""
    return builder.bitcast(builder.gep(base, [offset]), vector.as_pointer())


def _fma(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    """IR: ``a * b + c`` rounded once (``llvm.fma``), on float vectors."""
    vector = a.type
    function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector] * 3), f"llvm.fma.v{vector.count}f32")
    return builder.call(function, [a, b, c])


def _narrow(builder: ir.IRBuilder, counts: list[ir.Value]) -> ir.Value:
    """IR: one or two ``<8 x i64>`` count vectors as ``<8|16 x i32>`` (counts are < 2**31).

    Two vectors become one by taking the low halves of their lanes, a single
    two-source permute (VPERMT2D) on AVX-512.
    """
    if len(counts) == 1:
        return builder.trunc(counts[0], ir.VectorType(I32, LANES))
    halves = ir.VectorType(I32, 2 * LANES)
    low, high = (builder.bitcast(vector, halves) for vector in counts)
    return builder.shuffle_vector(low, high, ir.Constant(halves, list(range(0, 4 * LANES, 2))))


# argument order and kinds of the block intrinsic: arrays (dtype, ndim) and integers
_BLOCK_ARGS = (
    ("packed", types.uint64, 1),
    ("tables", types.int64, 2),
    ("block", None, None),
    ("runs", None, None),
    ("run_words", None, None),
    ("pitch", None, None),
    ("panels", types.uint64, 3),
    ("panel", None, None),
    ("offsets", types.float32, 2),
    ("out", types.float32, 2),
    ("scale", types.float32, 1),
    ("shift", types.float32, 1),
    ("residual", types.float32, 2),
    ("bits", types.uint64, 4),
)
START, POSITION, OUT_ROW, TARGET = range(4)  # the rows of the row tables (:func:`row_tables`)


@intrinsic
def _gemm_block(typingctx, packed, tables, block, runs, run_words, pitch, panels, panel, offsets, out, scale, shift, residual, bits, variant):  # type: ignore[no-untyped-def]
    """Row block ``block`` (the variant's ``kernel.rows`` rows) x the filters of ``panel``, then its epilogue.

    Row m = rows * block + i reads ``runs`` runs of ``run_words`` words, run r
    at ``tables[START, m] + r * pitch`` of ``packed``; its output row is
    ``tables[OUT_ROW, m]``, its offsets those of output position
    ``tables[POSITION, m]``, and (sign epilogues) its packed bits start at byte
    ``tables[TARGET, m]`` of ``bits``.
    """
    given = (packed, tables, block, runs, run_words, pitch, panels, panel, offsets, out, scale, shift, residual, bits)
    for (_, dtype, ndim), ty in zip(_BLOCK_ARGS, given):
        if (dtype is None and not isinstance(ty, types.Integer)) or (dtype is not None and not _is_array(ty, dtype, ndim)):
            return None
    if not isinstance(variant, GemmVariantType):
        return None
    block, kind, stream = MICRO_KERNELS[variant.kernel], variant.epilogue, variant.stream
    arg_types = tuple(ty if dtype is not None else types.intp for (_, dtype, _), ty in zip(_BLOCK_ARGS, given))
    signature = types.void(*arg_types, variant)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        named = dict(zip((name for name, _, _ in _BLOCK_ARGS), zip(sig.args, args)))
        arrays = {name: context.make_array(ty)(context, builder, value) for name, (ty, value) in named.items() if isinstance(ty, types.Array)}
        block_, runs_, run_words_, pitch_, panel_ = (named[name][1] for name in ("block", "runs", "run_words", "pitch", "panel"))
        data = {name: array.data for name, array in arrays.items()}
        width = builder.extract_value(arrays["out"].shape, 1)  # = offsets.shape[1] = filters padded to FILTER_MULTIPLE
        steps = builder.mul(runs_, run_words_)
        panel_base = builder.gep(data["panels"], [builder.mul(panel_, builder.mul(steps, _int(block.filters)))])

        table_rows = builder.extract_value(arrays["tables"].shape, 1)
        first_row = builder.mul(block_, _int(block.rows))

        def row_value(table: int, i: int) -> ir.Value:
            return builder.load(builder.gep(data["tables"], [builder.add(builder.mul(_int(table), table_rows), builder.add(first_row, _int(i)))]))

        starts_ = [row_value(START, i) for i in range(block.rows)]
        vector_rows = block.rows - block.scalar_rows
        zero = ir.Constant(WORDS, [0] * LANES)
        vector_sums = [[cgutils.alloca_once_value(builder, zero) for _ in range(block.vectors)] for _ in range(vector_rows)]
        scalar_sums = [[cgutils.alloca_once_value(builder, _int(0)) for _ in range(block.filters)] for _ in range(block.scalar_rows)]
        with cgutils.for_range(builder, runs_) as run:
            run_filters = builder.gep(panel_base, [builder.mul(builder.mul(run.index, run_words_), _int(block.filters))])
            run_rows = [builder.gep(data["packed"], [builder.add(start, builder.mul(run.index, pitch_))]) for start in starts_]
            with cgutils.for_range(builder, run_words_) as step:
                k = step.index
                filter_words = builder.gep(run_filters, [builder.mul(k, _int(block.filters))])
                filters = [builder.load(_vector_at(builder, filter_words, _int(LANES * v), WORDS), align=8) for v in range(block.vectors)]
                for i, row in enumerate(run_rows):
                    word = builder.load(builder.gep(row, [k]))
                    if i < vector_rows:
                        broadcast = splat(builder, word)
                        for total, vector in zip(vector_sums[i], filters):
                            builder.store(builder.add(builder.load(total), vector_popcount(builder, builder.xor(broadcast, vector))), total)
                        continue
                    for lane, total in enumerate(scalar_sums[i - vector_rows]):
                        filter_word = builder.load(builder.gep(filter_words, [_int(lane)]))
                        builder.store(builder.add(builder.load(total), builder.ctpop(builder.xor(word, filter_word))), total)
        counts = [[builder.load(total) for total in row] for row in vector_sums]
        for lanes in scalar_sums:
            row = []
            for v in range(block.vectors):
                vector = ir.Constant(WORDS, ir.Undefined)
                for lane in range(LANES):
                    vector = builder.insert_element(vector, builder.load(lanes[LANES * v + lane]), ir.Constant(I32, lane))
                row.append(vector)
            counts.append(row)
        column = builder.mul(panel_, _int(block.filters))

        def store_out(value: ir.Value, target: ir.Value) -> None:
            if not stream:
                builder.store(value, target, align=4)
                return
            store = builder.store(value, target, align=4 * value.type.count)  # rows are 128-byte multiples of an aligned base
            store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(I32, 1)]))

        bits_bytes = builder.bitcast(data["bits"], ir.IntType(8).as_pointer())
        for i in range(block.rows):
            position, out_row = row_value(POSITION, i), row_value(OUT_ROW, i)
            for first in range(0, block.vectors, 2):  # epilogue on 16 lanes (two count vectors) where it can
                group = counts[i][first : first + 2]
                lanes = LANES * len(group)
                floats = ir.VectorType(ir.FloatType(), lanes)
                n = builder.add(column, _int(LANES * first))
                offset = builder.load(_vector_at(builder, data["offsets"], builder.add(builder.mul(position, width), n), floats), align=4)
                counted = builder.sitofp(_narrow(builder, group), floats)
                conv = _fma(builder, counted, ir.Constant(floats, [-2.0] * lanes), offset)  # exact: small integers
                target = _vector_at(builder, data["out"], builder.add(builder.mul(out_row, width), n), floats)
                if kind == "counts":
                    store_out(conv, target)
                    continue
                scale_, shift_ = (builder.load(_vector_at(builder, data[name], n, floats), align=4) for name in ("scale", "shift"))
                z = _fma(builder, conv, scale_, shift_)
                if kind == "add-sign":
                    residual_at = _vector_at(builder, data["residual"], builder.add(builder.mul(out_row, width), n), floats)
                    z = builder.fadd(z, builder.load(residual_at, align=4))
                low, high = ir.Constant(floats, [-1.0] * lanes), ir.Constant(floats, [1.0] * lanes)
                clamped = builder.select(builder.fcmp_ordered("<", z, low), low, builder.select(builder.fcmp_ordered(">", z, high), high, z))
                store_out(clamped, target)
                negative = builder.bitcast(builder.fcmp_ordered("<", z, ir.Constant(floats, [0.0] * lanes)), ir.IntType(lanes))
                byte = builder.add(row_value(TARGET, i), builder.lshr(n, _int(3)))
                mask_at = builder.bitcast(builder.gep(bits_bytes, [byte]), ir.IntType(lanes).as_pointer())
                builder.store(negative, mask_at, align=1)
        return context.get_dummy_value()

    return signature, codegen


def block_rows(variant: GemmVariant) -> int:
    """Rows of the variant's micro-kernel (a compile-time constant in jitted code)."""
    return MICRO_KERNELS[variant.kernel].rows


@overload(block_rows)
def _block_rows(variant):  # type: ignore[no-untyped-def]
    if isinstance(variant, GemmVariantType):
        rows = MICRO_KERNELS[variant.kernel].rows
        return lambda variant: rows
    return None


@njit(cache=True)
def _job_grid(row_blocks: int, panel_count: int) -> tuple[int, int, int, int]:
    """How the GEMM splits into jobs: (row blocks per job, panels per job, panel chunks, jobs), jobs ordered row group
    major, panel chunk minor (a job reads its chunk of filters once per row block it computes)."""
    chunk = min(panel_count, PANELS_PER_JOB)
    chunks = (panel_count + chunk - 1) // chunk
    group = max(1, min(BLOCKS_PER_JOB, row_blocks * chunks // MIN_JOBS))
    return group, chunk, chunks, (row_blocks + group - 1) // group * chunks


@njit(cache=True)
def _job_blocks(job: int, group: int, chunks: int, row_blocks: int) -> tuple[int, int]:
    """The row blocks [first, end) of job ``job`` of :func:`_job_grid`."""
    first = (job // chunks) * group
    return first, min(first + group, row_blocks)


@njit(parallel=True, cache=True)
def _gemm(packed, tables, kernel_h, kernel_w, stride, panels, offsets, out, scale, shift, residual, bits, variant):  # type: ignore[no-untyped-def]
    """The GEMM of a :class:`GemmVariant` over the row blocks of ``tables``; see :func:`xnor_gemm` and :func:`fused_gemm`."""
    row_blocks = tables.shape[1] // block_rows(variant)
    group, chunk, chunks, jobs = _job_grid(row_blocks, panels.shape[0])
    flat = packed.reshape(-1)
    run_words = kernel_w * packed.shape[3]
    pitch = packed.shape[2] * packed.shape[3]
    for job in prange(jobs):
        first_block, end_block = _job_blocks(job, group, chunks, row_blocks)
        first_panel = (job % chunks) * chunk
        for block in range(first_block, end_block):  # inline: through a called function the loop ran 3.5% slower
            for panel in range(first_panel, min(first_panel + chunk, panels.shape[0])):
                _gemm_block(flat, tables, block, kernel_h, run_words, pitch, panels, panel, offsets, out, scale, shift, residual, bits, variant)


@lru_cache(maxsize=256)
def row_tables(packed_shape: tuple[int, ...], kernel_size: tuple[int, int], stride: int, bits_shape: tuple[int, ...], rows: int) -> np.ndarray:
    """Per GEMM row m: where its receptive field starts, its output position, output row and packed-output byte.

    (4, M') int64 (rows :data:`START`, :data:`POSITION`, :data:`OUT_ROW`,
    :data:`TARGET`) for M = B OH OW rows padded to a multiple of ``rows`` with
    copies of the last row.  ``bits_shape``: the (B, OH + 2q, OW + 2q, words)
    packed output of the sign epilogues.  Cached: a network asks for the same
    few geometries on every call.
    """
    batch, height, width, words = packed_shape
    (kh, kw), (_, bits_h, bits_w, bits_words) = kernel_size, bits_shape
    out_h, out_w = (height - kh) // stride + 1, (width - kw) // stride + 1
    last = batch * out_h * out_w - 1
    m = np.minimum(np.arange(-(-(last + 1) // rows) * rows), last)
    b, position = np.divmod(m, out_h * out_w)
    oh, ow = np.divmod(position, out_w)
    pad = (bits_h - out_h) // 2
    tables = np.stack(
        [
            ((b * height + oh * stride) * width + ow * stride) * words,
            position,
            m,
            ((b * bits_h + oh + pad) * bits_w + ow + pad) * bits_words * 8,
        ]
    )
    tables.setflags(write=False)
    return tables


_NO_VECTOR = np.zeros(0, dtype=np.float32)
_NO_MATRIX = np.zeros((0, 0), dtype=np.float32)
_NO_BITS = np.zeros((1, 1, 1, 1), dtype=np.uint64)


def xnor_gemm(
    packed: np.ndarray, kernel_size: tuple[int, int], stride: int, panels: np.ndarray, offsets: np.ndarray, out: np.ndarray, kernel: MicroKernel = SELECTED
) -> None:
    """Binary conv of the padded packed input (B, Hp, Wp, words) into ``out`` (B OH OW, N') float32, exact.

    ``panels`` from :func:`filter_panels` for ``kernel`` (kh kw words per
    filter); ``offsets`` (OH OW, N') float32 (integers); N' = filters padded to
    :data:`FILTER_MULTIPLE`.
    """
    tables = row_tables(packed.shape, kernel_size, stride, _NO_BITS.shape, kernel.rows)
    variant = gemm_variant(kernel.name, "counts", streams(out))
    _gemm(packed, tables, *kernel_size, stride, panels, offsets, out, _NO_VECTOR, _NO_VECTOR, _NO_MATRIX, _NO_BITS, variant)


@njit(parallel=True, cache=True)
def pack_and_gemm(x, channels_last, padding, packed_shape, tables, kernel_h, kernel_w, stride, panels, offsets, out, variant, bands):  # type: ignore[no-untyped-def]
    """A whole binary conv in one parallel region: ``bands`` bands, each packing the input rows that its share of
    the GEMM's jobs (:func:`_job_grid`, a contiguous range) reads, then running those jobs.

    ``x`` as :func:`~bnnbench.kernels.packing.in_memory_order` returns it (C-contiguous NCHW, or NHWC when
    ``channels_last``); ``packed_shape``: its packed, padded form; ``tables`` from :func:`row_tables` for it; the
    rest as :func:`xnor_gemm` (epilogue ``"counts"``).  Each band packs into a buffer of its own (the rows two bands
    share, kh - stride per boundary, are packed twice), so no band waits for another: a batch-1 conv on two threads
    pays one parallel region, not one for the packing and one for the GEMM, and packs in parallel.  ``bands``:
    numba's thread count (any count gives the same result).
    """
    rows = block_rows(variant)
    row_blocks = tables.shape[1] // rows
    group, chunk, chunks, jobs = _job_grid(row_blocks, panels.shape[0])
    batch, padded_h, padded_w, words = packed_shape
    height = padded_h - 2 * padding
    out_h, out_w = (padded_h - kernel_h) // stride + 1, (padded_w - kernel_w) // stride + 1
    positions = out_h * out_w
    run_words, pitch = kernel_w * words, padded_w * words
    # the bands' buffers are allocated out here: a buffer made inside the parallel loop costs the GEMM loop
    # numba's no-alias marking of the loop's arguments (25% on 64-channel convs at batch 16)
    buffers = np.empty((bands, batch * padded_h * padded_w * words), dtype=np.uint64)
    for band in prange(bands):
        first_job, end_job = band * jobs // bands, (band + 1) * jobs // bands
        if first_job < end_job:
            packed = buffers[band].reshape(packed_shape)
            first_row = rows * _job_blocks(first_job, group, chunks, row_blocks)[0]
            end_row = min(rows * _job_blocks(end_job - 1, group, chunks, row_blocks)[1] - 1, batch * positions - 1)
            for b in range(first_row // positions, end_row // positions + 1):
                top = (first_row - b * positions) // out_w if b == first_row // positions else 0
                bottom = (end_row - b * positions) // out_w if b == end_row // positions else out_h - 1
                low, high = top * stride, bottom * stride + kernel_h  # padded input rows [low, high) feed output rows top..bottom
                packed[b, low:high] = 0
                pack_rows(x, channels_last, padding, b, max(low - padding, 0), min(high - padding, height), packed)
            flat = buffers[band]
            for job in range(first_job, end_job):
                first_block, end_block = _job_blocks(job, group, chunks, row_blocks)
                first_panel = (job % chunks) * chunk
                for block in range(first_block, end_block):
                    for panel in range(first_panel, min(first_panel + chunk, panels.shape[0])):
                        _gemm_block(flat, tables, block, kernel_h, run_words, pitch, panels, panel, offsets, out, _NO_VECTOR, _NO_VECTOR, _NO_MATRIX, _NO_BITS, variant)


def fused_gemm(
    packed: np.ndarray,
    kernel_size: tuple[int, int],
    stride: int,
    panels: np.ndarray,
    offsets: np.ndarray,
    scale: np.ndarray,
    shift: np.ndarray,
    residual: np.ndarray | None,
    out: np.ndarray,
    bits: np.ndarray,
    kernel: MicroKernel = SELECTED,
) -> None:
    """The GEMM with a folded-BatchNorm, residual and hardtanh epilogue that also packs the output's signs.

    ``z = conv * scale + shift (+ residual)`` (each step rounded once, conv
    exact), ``out = hardtanh(z)`` (B OH OW,
    N') float32, and ``bits`` (B, OH + 2q, OW + 2q, words) uint64, zeroed,
    receives sign(z) packed, its border q left at +1: the next binary layer's
    input for padding q.  ``scale``, ``shift`` (N',) float32; ``residual`` like
    ``out`` or None.  Padded filters need ``scale = 0``, ``shift = 1`` (bit 0).
    """
    tables = row_tables(packed.shape, kernel_size, stride, bits.shape, kernel.rows)
    variant = gemm_variant(kernel.name, "sign" if residual is None else "add-sign", streams(out))
    residual = _NO_MATRIX if residual is None else residual
    _gemm(packed, tables, *kernel_size, stride, panels, offsets, out, scale, shift, residual, bits, variant)


def filter_panels(bits: np.ndarray, kernel: MicroKernel = SELECTED) -> np.ndarray:
    """(N, K) packed filters -> (N' / width, K, width) panels of ``kernel``'s width, zero-padded to N' filters."""
    filters, words = bits.shape
    padded = np.zeros((padded_filters(filters), words), dtype=np.uint64)
    padded[:filters] = bits
    panels = aligned_zeros((padded.shape[0] // kernel.filters, words, kernel.filters), np.uint64)
    panels[...] = padded.reshape(-1, kernel.filters, words).transpose(0, 2, 1)
    return panels


def padded_filters(filters: int) -> int:
    """Filter count rounded up to :data:`FILTER_MULTIPLE`."""
    return -(-filters // FILTER_MULTIPLE) * FILTER_MULTIPLE
