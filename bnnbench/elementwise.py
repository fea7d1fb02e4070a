"""One-pass CPU kernels (numba) for the binary layer's element-wise math, bit for bit what torch's ops give.

Eager torch runs a formula such as ``max(0, 2 - 2|x|)`` as one pass per operator, each
allocating its result; the kernels here read the inputs once and write the results once.
They are exact, not approximations: each is compiled without ``fastmath`` (no reassociation,
no contraction into FMA; :func:`fma` where torch's own kernel fuses one) and evaluates the
formula in float32, as torch's float32 and bfloat16 kernels do, rounding a bfloat16 result to
nearest-even once per torch operator that rounds: a :class:`Kernel`'s formula is a plain Python
function over float32 scalars that writes ``r(...)`` around each such operator, compiled twice
(``r`` the identity, ``r`` the bfloat16 rounding), with any number of input tensors, outputs,
scalar parameters (:func:`operand`: the value torch gives a 0-dim tensor or Python scalar in
each operator) and per-row values (a per-channel tensor).  A transcendental (tanh, cos, cosh,
pow) stays one torch pass around which the kernels run: numba cannot reproduce torch's SLEEF
vectorised functions bit for bit.  In bfloat16 a formula of x alone whose torch operators give
each element a value that depends on that value only is a table of the 65,536 bfloat16 values
that torch computes once (:func:`bf16_table`, :func:`tabulated`: one lookup pass).  The tests
compare every kernel with the torch formula it replaces, bit for bit, on edge values (signed
zeros, NaN, infinities, subnormals), every bfloat16 pattern, odd shapes and both memory formats.

:func:`unary` and :func:`apply` run a kernel where it covers the inputs (CPU float32 or bfloat16
tensors, dense in their memory format, that autograd does not track, outside torch.compile) and
return None otherwise, so the caller runs its torch formula; :func:`per_sample_variance` is torch's
``x.var(dims 1..)`` (Welford in float64, one pass per sample in memory order, as torch's
CPU reduction runs it) over all samples at once; :func:`pack_signs` keeps a +-1 tensor in
1 bit per element and :func:`unpack_signs` widens it again (the binary conv's saved input);
within :func:`multiplying`, a :func:`tabulated` formula of the given x, or a kernel applied with ``final=True``,
returns its product with a gradient in its pass (a surrogate's backward).  On several torch threads every kernel's elements (rows, samples) are split between torch's own
OpenMP threads (:mod:`bnnbench.omp`), into ranges whose results do not depend on the split.
"""

from __future__ import annotations

import contextlib
import math
import threading
import types as types_module
from typing import Callable, Iterator

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload
from torch import Tensor

from . import omp

# torch's CPU reductions split one output's elements across threads from this many on
# (at::internal::GRAIN_SIZE), as its element-wise loops split a pass; below it, or on one thread, one sequential pass.
REDUCTION_GRAIN = 32768

_ONE, _TWO, _ZERO = np.float32(1.0), np.float32(2.0), np.float32(0.0)


@intrinsic
def _bits_of(typingctx, value):
    """The 32 bits of a float32, as uint32 (a bit cast)."""
    return types.uint32(types.float32), lambda context, builder, signature, args: builder.bitcast(args[0], ir.IntType(32))


@intrinsic
def _float_of(typingctx, bits):
    """The float32 whose 32 bits are ``bits`` (a bit cast)."""
    return types.float32(types.uint32), lambda context, builder, signature, args: builder.bitcast(args[0], ir.FloatType())


@intrinsic
def fma(typingctx, a, b, c):
    """a b + c rounded once (LLVM's fma, as the FMA instructions torch's vectorised kernels use), in float32 for
    formulas, or in float64."""
    kind = types.float64 if a == types.float64 else types.float32

    def codegen(context, builder, signature, args):
        value = ir.DoubleType() if kind == types.float64 else ir.FloatType()
        return builder.call(builder.module.declare_intrinsic("llvm.fma", [value], ir.FunctionType(value, [value] * 3)), args)

    return kind(kind, kind, kind), codegen


@njit(cache=True)
def _widen(bits: np.uint16) -> np.float32:
    """A bfloat16 (its 16 bits) as float32: exact."""
    return _float_of(np.uint32(bits) << np.uint32(16))


@njit(cache=True)
def _round_bf16(value: np.float32) -> np.uint16:
    """float32 to bfloat16 bits, rounded to nearest-even (c10's round_to_nearest_even; NaN to 0x7FC0)."""
    u = _bits_of(value)
    rounded = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    return np.uint16(0x7FC0) if value != value else rounded  # a select, not a branch: loops stay vectorised


def r(value: np.float32) -> np.float32:
    """The rounding of one torch operator's result, as formulas write it: the identity in a formula's float32
    loops; in its bfloat16 loops (where :class:`Kernel` rebinds ``r``) to the nearest bfloat16, kept widened."""
    return value


@njit(cache=True)
def _keep(value: np.float32) -> np.float32:
    return value


@njit(cache=True)
def _to_bf16(value: np.float32) -> np.float32:
    return _widen(_round_bf16(value))


def _sign(v: np.float32) -> np.float32:
    return _ONE if v >= _ZERO else -_ONE


def _approx_sign_derivative(v: np.float32) -> np.float32:
    t = r(_TWO - _TWO * abs(v))
    return _ZERO if t < _ZERO else t


def _clip_derivative(v: np.float32) -> np.float32:
    return _ONE if abs(v) <= _ONE else _ZERO


def _clamp_and_sign(v: np.float32) -> tuple[np.float32, np.float32]:
    """``clamp(v, -1, 1)`` (NaN stays NaN, -0.0 stays -0.0, as torch's) and ``sign(v)``, which is the sign of the
    clamped value too."""
    clamped = _ONE if v > _ONE else v
    return (-_ONE if clamped < -_ONE else clamped), _sign(v)


def _load(element):
    """An input element as float32: bfloat16 bits widened, float32 as is."""


@overload(_load)
def _load_typed(element):  # pragma: no cover - compiled
    if isinstance(element, types.Integer):
        return lambda element: _widen(element)
    return lambda element: element


def _store(value, out):
    """``value`` as an element of ``out``: rounded to bfloat16 bits, or the float32 itself."""


@overload(_store)
def _store_typed(value, out):  # pragma: no cover - compiled
    if isinstance(out.dtype, types.Integer):
        return lambda value, out: _round_bf16(value)
    return lambda value, out: value


def _with_rounding(formula: Callable, rounding, compiled: dict | None = None) -> Callable:
    """``formula`` compiled with its global ``r`` bound to ``rounding``; the plain Python functions it calls (other
    formulas) compiled the same way, its other globals as they are."""
    compiled = {} if compiled is None else compiled
    if formula not in compiled:
        scope = dict(formula.__globals__, r=rounding)
        for name in formula.__code__.co_names:
            called = scope.get(name)
            if isinstance(called, types_module.FunctionType) and name != "r":
                scope[name] = _with_rounding(called, rounding, compiled)
        code = types_module.FunctionType(formula.__code__, scope, formula.__name__, formula.__defaults__, formula.__closure__)
        # IEEE division (inf, NaN), as torch's; inlined into the loop, where the reference counting of a table
        # passed down to a called formula cancels out (a call per element would count it per element)
        compiled[formula] = njit(error_model="numpy", inline="always")(code)
    return compiled[formula]


def _loop(formula: Callable, inputs: int, outputs: tuple[int | None, ...], params: int, rows: int = 0, columns: bool = False) -> Callable:
    """The one-pass loop of ``formula`` over ``inputs`` arrays into one array per entry of ``outputs`` (an input's
    index where the output is that input, written in place: the same array, so that the vectoriser sees element i
    read and then written, not two arrays that might overlap, which would keep the loop scalar), with ``params``
    scalars (or tables) unpacked once, outside the loop (an array taken from the tuple per element would be
    reference-counted per element), and ``rows`` arrays of one value per row (the elements split into as many rows
    of equal length as those have values: a per-channel tensor against a contiguous NC... one), passed after the
    elements; with ``columns``, of one value per column instead (rows as long as those have values: a per-channel
    tensor against a channels_last one, whose channels are innermost).  Each row's elements are a slice indexed from
    0, so that the inner loop needs no negative-index check."""
    a, p, q = ([f"{c}{j}" for j in range(n)] for c, n in (("a", inputs), ("p", params), ("q", rows)))
    o = [f"a{alias}" if alias is not None else f"o{j}" for j, alias in enumerate(outputs)]
    at = "i" if columns else "row"  # a value per column (element of the row) or per row
    call = f"formula({', '.join([f'_load(row_{n}[i])' for n in a] + [f'_load({n}[{at}])' for n in q] + p)})"
    store = f"row_{o[0]}[i] = _store({call}, row_{o[0]})" if len(o) == 1 else (
        f"v = {call}; " + "; ".join(f"row_{n}[i] = _store(v[{j}], row_{n})" for j, n in enumerate(o))
    )
    own = [n for n in o if n.startswith("o")]
    size = f"{a[0]}.size"
    source = [f"def loop({', '.join(a + own + q)}, params):"]
    source += [f"    {', '.join(p)}, = params"] if p else []
    if columns:
        source += ["    length = q0.size", f"    for row in range({size} // length):", "        start = row * length"]
    else:
        count = "q0.size" if q else "1"
        source += [f"    length = {size} // {count}", f"    for row in range({count}):", "        start = row * length"]
    source += [f"        row_{n} = {n}[start:start + length]" for n in a + own]
    source += ["        for i in range(length):", f"            {store}"]
    scope = {"formula": formula, "_load": _load, "_store": _store}
    exec("\n".join(source) + "\n", scope)  # noqa: S102
    return njit(nogil=True, error_model="numpy")(scope["loop"])


class Kernel:
    """An element-wise formula in float32, compiled into one-pass loops: a float32 one, and a bfloat16 one in which
    the formula's ``r(...)`` rounds to bfloat16 (once per torch operator the formula writes it for).

    ``formula(*elements, *params) -> value`` (or a tuple of ``outputs`` values) is a plain Python function over
    float32 scalars, the input tensors' elements first (bfloat16 ones widened), then the kernel's scalar parameters
    (float32 values, or :func:`bf16_table` arrays); a result stored into a bfloat16 tensor is rounded there.
    Compiled on first use in each process, not cached on disk: numba's cache cannot key a loop on the formula it
    closes over, and would add entries on every run."""

    def __init__(self, name: str, formula: Callable, outputs: int = 1) -> None:
        self.name, self.outputs, self._formula = name, outputs, formula
        self._formulas = {torch.float32: _with_rounding(formula, _keep), torch.bfloat16: _with_rounding(formula, _to_bf16)}
        self._loops: dict[tuple, Callable] = {}
        self._product: Kernel | None = None  # times_gradient's, made on first use

    def run(self, x: Tensor, out: Tensor) -> None:
        """out = formula(x) element-wise, both dense with the same strides (float32 or bfloat16)."""
        self(x.dtype, (x,), (out,))

    def __call__(
        self,
        mode: torch.dtype,
        inputs: tuple[Tensor, ...],
        outputs: tuple[Tensor, ...],
        params: tuple = (),
        rows: tuple[Tensor, ...] = (),
        columns: bool = False,
    ) -> None:
        """The formula over dense tensors of one shape and strides (and contiguous ``rows``, one value per row or,
        with ``columns``, per column: see :func:`_loop`), rounding as torch does in ``mode``."""
        aliases = tuple(next((j for j, t in enumerate(inputs) if _same(t, out)), None) for out in outputs)
        key = (mode, len(inputs), aliases, len(params), len(rows), columns)
        if key not in self._loops:
            self._loops[key] = _loop(self._formulas[mode], len(inputs), aliases, len(params), len(rows), columns)
        own = [out for out, alias in zip(outputs, aliases) if alias is None]
        arrays = [omp.Split(_flat(t, _NUMPY[t.dtype])) for t in (*inputs, *own)]
        values = [_flat(q, _NUMPY[q.dtype]) for q in rows]
        if columns:  # each thread a range of rows, every column's value
            items, split = inputs[0].numel() // rows[0].numel(), values
        else:  # rows or elements, each thread a range of them (and of the rows' values)
            items, split = (rows[0].numel() if rows else inputs[0].numel()), [omp.Split(v) for v in values]
        omp.run(self._loops[key], items, *arrays, *split, tuple(params), work=inputs[0].numel(), grain=1 if rows else _ALIGN)
        _written(*outputs)

    def times_gradient(self) -> Kernel:
        """The kernel of ``grad * formula(...)``, the gradient its first input: torch's product of a gradient with
        the formula's value (rounded to the value's dtype first), in the formula's pass."""
        if self._product is None:
            formula = self._formula
            arguments = ", ".join(f"v{j}" for j in range(formula.__code__.co_argcount))
            scope = {"formula": formula, "r": r}
            exec(f"def times_gradient(grad, {arguments}):\n    return r(grad * r(formula({arguments})))\n", scope)  # noqa: S102
            self._product = Kernel(f"{self.name}_times_gradient", scope["times_gradient"])
        return self._product

    def __repr__(self) -> str:
        return f"Kernel({self.name!r})"


# tanh(z) = z P(z^2) / Q(z^2) on |z| <= 7.905 (+-1 in float32 beyond): the rational approximation of Eigen's float
# tanh (its published coefficients), within 8 float32 ulps (tests/test_dsq_bf16.py), in arithmetic a vector loop
# keeps in its lanes, for the fused bf16 formulas (numba's tanh is a scalar libm call)
_TANH_CLAMP = np.float32(7.90531110763549805)
_P13, _P11, _P9, _P7, _P5, _P3, _P1 = (np.float32(c) for c in (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
                                                                5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
                                                                4.89352455891786e-03))
_Q6, _Q4, _Q2, _Q0 = (np.float32(c) for c in (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03))


@njit(inline="always", fastmath={"contract"}, error_model="numpy")  # IEEE division: no zero check, vectorised
def tanh_float32(z: np.float32) -> np.float32:  # pragma: no cover - compiled
    """tanh in float32 arithmetic that vectorises (see above); NaN at NaN."""
    z = _TANH_CLAMP if z > _TANH_CLAMP else (-_TANH_CLAMP if z < -_TANH_CLAMP else z)  # selects, not min/max calls
    z2 = z * z
    p = ((((((_P13 * z2 + _P11) * z2 + _P9) * z2 + _P7) * z2 + _P5) * z2 + _P3) * z2 + _P1) * z
    q = ((_Q6 * z2 + _Q4) * z2 + _Q2) * z2 + _Q0
    return p / q


# exp and pow in float32 arithmetic that vectorises, for the fused fp32 formulas (numba's are scalar libm calls)
_LOG2E = np.float32(1.4426950408889634)
_LN2_HIGH, _LN2_LOW = np.float32(0.693359375), np.float32(-2.12194440e-4)  # ln 2 in two parts (Cody and Waite)
_EXP_TERMS = np.array([1.0 / math.factorial(k) for k in range(7, -1, -1)], dtype=np.float32)  # 1/7! .. 1/0!
_EXP2_TERMS = np.array([math.log(2) ** k / math.factorial(k) for k in range(7, -1, -1)], dtype=np.float32)  # 2^f's
_LOG2_TERMS = np.array([2.0 / ((2 * k + 1) * math.log(2)) for k in range(4, -1, -1)], dtype=np.float32)  # log2 m / s's
_SQRT2 = np.float32(1.4142135623730951)


@njit(inline="always", fastmath={"contract"}, error_model="numpy")
def exp_float32(z: np.float32) -> np.float32:  # pragma: no cover - compiled
    """exp(z): z = k ln 2 + t with |t| <= ln 2 / 2, exp(t) by its Taylor series to t^7 (relative error below 6e-9),
    times 2^k from its exponent bits; 0 below z = -87 (under 2^-125), infinity above 88.3 (where k would leave the
    exponent's range: the largest float32 is e^88.72, so e^88.3 to e^88.72 come out infinite too), NaN at NaN."""
    k = np.floor(z * _LOG2E + np.float32(0.5))
    t = (z - k * _LN2_HIGH) - k * _LN2_LOW
    value = _EXP_TERMS[0]
    for j in range(1, _EXP_TERMS.size):
        value = value * t + _EXP_TERMS[j]
    clamped = max(min(k, np.float32(127.0)), np.float32(-126.0))
    power = _float_of(np.uint32(np.int32(clamped) + np.int32(127)) << np.uint32(23))
    value = value * power
    return np.float32(0.0) if z < np.float32(-87.0) else (np.float32(np.inf) if z > np.float32(88.3) else value)


@njit(inline="always", error_model="numpy")
def pow_float32(a: np.float32, q: np.float32) -> np.float32:  # pragma: no cover - compiled
    """a^q = 2^(q log2 a) for a positive normal float32 a and |q log2 a| below 126: a = m 2^e with m in
    [sqrt(2)/2, sqrt(2)), log2 m = s P(s^2) with s = (m - 1) / (m + 1), |s| <= 0.172 (atanh's series to s^9),
    then 2^w = 2^k 2^f with |f| <= 1/2 (exp's Taylor series to (f ln 2)^7) and 2^k from its exponent bits: within
    4 + |w| float32 ulps (w's own rounding carries into the power; tests/test_fused_surrogates.py); other inputs give finite values of no meaning (a caller selects
    those away).  Fewer constants than exp(q log a), which spills the vector registers of a 256-bit loop."""
    bits = _bits_of(a)
    exponent = np.float32(np.int32((bits >> np.uint32(23)) & np.uint32(0xFF)) - np.int32(127))
    m = _float_of((bits & np.uint32(0x7FFFFF)) | np.uint32(0x3F800000))
    high = m > _SQRT2
    m = m * np.float32(0.5) if high else m
    exponent = exponent + np.float32(1.0) if high else exponent
    s = (m - np.float32(1.0)) / (m + np.float32(1.0))
    s2 = s * s
    value = _LOG2_TERMS[0]
    for j in range(1, _LOG2_TERMS.size):
        value = value * s2 + _LOG2_TERMS[j]
    w = q * (exponent + s * value)
    k = np.floor(w + np.float32(0.5))
    f = w - k
    power = _EXP2_TERMS[0]
    for j in range(1, _EXP2_TERMS.size):
        power = power * f + _EXP2_TERMS[j]
    clamped = max(min(k, np.float32(127.0)), np.float32(-126.0))
    return power * _float_of(np.uint32(np.int32(clamped) + np.int32(127)) << np.uint32(23))


SIGN = Kernel("sign", _sign)
"""sign(x) with sign(0) = +1: +1 where x >= 0 (-0.0 included), -1 elsewhere (NaN included)."""
APPROX_SIGN_DERIVATIVE = Kernel("approx_sign_derivative", _approx_sign_derivative)
"""max(0, 2 - 2|x|): torch rounds a bfloat16 ``2 - 2|x|`` once (2|x| is exact, the clamp too)."""
CLIP_DERIVATIVE = Kernel("clip_derivative", _clip_derivative)
"""1{|x| <= 1} (0 at NaN)."""
CLAMP_AND_SIGN = Kernel("clamp_and_sign", _clamp_and_sign, outputs=2)
"""clamp(x, -1, 1) (in place) and sign(x) in one pass, float32 (:func:`clamp_and_sign`)."""


def _approx_sign_gradient(x: np.float32, grad: np.float32) -> np.float32:
    return r(grad * _approx_sign_derivative(x))


def _clip_gradient(x: np.float32, grad: np.float32) -> np.float32:
    return r(grad * _clip_derivative(x))


APPROX_SIGN_GRADIENT = Kernel("approx_sign_gradient", _approx_sign_gradient)
"""grad * max(0, 2 - 2|x|): the surrogate rounded, then the product (two torch operators)."""
CLIP_GRADIENT = Kernel("clip_gradient", _clip_gradient)
"""grad * 1{|x| <= 1}."""

_NUMPY = {torch.float32: np.float32, torch.bfloat16: np.uint16}
_ALIGN = 512  # elements per unit of a thread's share (whole cache lines, whole bytes of packed signs)


def _written(*tensors: Tensor) -> None:
    """Count a kernel's write into each tensor as torch counts an in-place operator's (through numpy, the tensor's
    version would not change): autograd then refuses a saved tensor a kernel overwrote, and a :class:`Product`
    one that changed after it was written."""
    for t in tensors:
        if not t.is_inference():
            torch.autograd.graph.increment_version(t)


def _same(a: Tensor, b: Tensor) -> bool:
    """The same elements (an output written in place over an input)."""
    return a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.stride() == b.stride() and a.shape == b.shape


def _shifted_sign(x: np.float32, shift: np.float32) -> np.float32:
    return _sign(r(x + shift))


def _shifted_approx_sign_grad(x: np.float32, grad: np.float32, shift: np.float32) -> tuple[np.float32, np.float32]:
    """``grad * max(0, 2 - 2|x + shift|)``, twice (stored in the sum's dtype and in x's)."""
    g = r(grad * _approx_sign_derivative(r(x + shift)))
    return g, g


SHIFTED_SIGN = Kernel("shifted_sign", _shifted_sign)
"""sign(x + shift), the shift one value per row (ReActNet's per-channel threshold)."""
SHIFTED_APPROX_SIGN_GRAD = Kernel("shifted_approx_sign_grad", _shifted_approx_sign_grad, outputs=2)
"""grad * max(0, 2 - 2|x + shift|), the shift one value per row."""


def _flat(x: Tensor, dtype: np.dtype) -> np.ndarray:
    """The elements of a dense tensor in memory order, as a 1-D numpy view of the given dtype."""
    flat = torch.as_strided(x.detach(), (x.numel(),), (1,), x.storage_offset())
    return (flat.view(torch.int16) if x.dtype == torch.bfloat16 else flat).numpy().view(dtype)


def memory_order(x: Tensor) -> np.ndarray:
    """A dense float32 tensor's elements in memory order, as a 1-D numpy view (no copy): for a loop over tensors of
    one layout whose element i is the same element of each."""
    return _flat(x, np.dtype(np.float32))


def bf16_bits(x: Tensor, *shape: int) -> np.ndarray:
    """A contiguous bfloat16 tensor's 16-bit patterns as a numpy uint16 view of ``shape`` (its memory, no copy):
    what the compiled loops read with :func:`_widen` and write with :func:`_round_bf16`."""
    return x.detach().reshape(shape).view(torch.int16).numpy().view(np.uint16)


def stored(x: Tensor, *shape: int) -> np.ndarray:
    """A contiguous bfloat16 or float32 tensor's memory as a numpy view of ``shape`` (no copy): bfloat16's bits
    (:func:`bf16_bits`) or the float32 values, what the compiled loops read with :func:`_load` and write with
    :func:`_store`."""
    return bf16_bits(x, *shape) if x.dtype == torch.bfloat16 else x.detach().reshape(shape).numpy()


def memory_rows(x: Tensor, rows: int) -> np.ndarray:
    """A dense tensor's memory as ``rows`` equal rows, each in memory order (:func:`stored`'s arrays, no copy): one row
    per sample for ``rows`` = N of a contiguous or a channels_last tensor alike, whose samples lie one after another
    (their elements in another order within each)."""
    length = x.numel() // rows if rows else 0
    flat = torch.as_strided(x.detach(), (rows, length), (length, 1), x.storage_offset())
    return stored(flat, rows, -1)


def in_layout_of(t: Tensor, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``t`` (x's shape) in ``dtype`` (default x's) with x's strides, copied where it has others (a gradient in another
    memory format): for a loop reading both in memory order."""
    dtype = x.dtype if dtype is None else dtype
    if t.dtype == dtype and t.stride() == x.stride():
        return t
    return torch.empty_like(x, dtype=dtype).copy_(t)


def channels_last(x: Tensor) -> bool:
    """True where x is 4-D channels_last and not also contiguous: one sample after another, its channels innermost."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _dense(x: Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def covered(x: Tensor) -> bool:
    """True when the kernels take ``x``: a CPU float32/bfloat16 tensor, dense in its memory format, untracked by autograd."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and _dense(x)
        and not (x.requires_grad and torch.is_grad_enabled())
        and not torch.compiler.is_compiling()
    )


def unary(kernel: Kernel, x: Tensor) -> Tensor | None:
    """``kernel`` applied to every element of ``x`` (same shape, dtype and strides), or None where it does not cover x."""
    if not covered(x):
        return None
    out = torch.empty_like(x)
    if out.stride() != x.stride():
        return None
    if x.numel():
        kernel.run(x, out)
    return out


def apply(
    kernel: Kernel,
    *inputs: Tensor,
    params: tuple = (),
    mode: torch.dtype | None = None,
    out: tuple[Tensor, ...] | None = None,
    rows: tuple[Tensor, ...] = (),
    channels: tuple[Tensor, ...] = (),
    dtypes: tuple[torch.dtype, ...] | None = None,
    final: bool = False,
) -> Tensor | tuple[Tensor, ...] | None:
    """``kernel``'s formula over ``inputs`` (each covered, one shape and strides), rounding as torch does in ``mode``
    (default: the first input's dtype), into ``out`` (default: new tensors like the first input, of ``dtypes``,
    default all ``mode``; an input may be an output too: element i is read before it is written), with ``rows``
    (contiguous, one value per row of a contiguous first input, see :func:`_loop`) or ``channels`` (one value per
    channel, dim 1, of a contiguous first input, which takes them as rows, or of a channels_last one, as columns),
    or None where it does not cover them.  ``final``: the value is what the formula calling it returns (a
    derivative's last pass), which within :func:`multiplying` is written as its product with the waiting gradient
    instead (checked there)."""
    first = inputs[0]
    mode = first.dtype if mode is None else mode
    if not all(covered(t) and t.shape == first.shape and t.stride() == first.stride() for t in inputs):
        return None
    columns = False
    if channels:
        if first.dim() < 2 or not all(covered(v) and v.numel() == first.shape[1] for v in channels):
            return None
        columns = channels_last(first)
        flat = [v.detach().reshape(-1).contiguous() for v in channels]
        rows = tuple(flat if columns else (v.reshape(1, -1).expand(first.shape[0], -1).contiguous() for v in flat))
    if rows and not ((columns or first.is_contiguous()) and all(covered(q) and q.is_contiguous() and q.numel() == rows[0].numel() for q in rows)):
        return None
    if rows and (rows[0].numel() == 0 or first.numel() % rows[0].numel()):
        return None
    if out is None:
        out = tuple(torch.empty_like(first, dtype=dtype) for dtype in (dtypes or (mode,) * kernel.outputs))
        if out[0].stride() != first.stride():
            return None
    elif not all(covered(t) and t.shape == first.shape and t.stride() == first.stride() for t in out):
        return None
    waiting = getattr(_WAITING, "product", None) if final and kernel.outputs == 1 and out[0].dtype == mode else None
    grad = None if waiting is None else waiting.gradient_for(out[0])
    if grad is not None:
        if first.numel():
            kernel.times_gradient()(mode, (grad, *inputs), out, params, rows, columns)
        return waiting.finish(out[0])
    if first.numel():
        kernel(mode, inputs, out, params, rows, columns)
    return out[0] if kernel.outputs == 1 else out


def operand(value: float | Tensor, mode: torch.dtype, opmath: bool) -> np.float32:
    """The float32 value a scalar operand has in a torch operator on a ``mode`` tensor (measured over every
    bfloat16 pattern and 200 scalars, tests/test_fused_surrogates.py): float32(value) in float32, and in bfloat16
    where torch computes with the scalar in float32 ("opmath", ``opmath=True``: ``tensor * s``, ``tensor / s``,
    ``float * tensor``), else the scalar rounded to bfloat16 first (``tensor0d * tensor``, every ``+``/``-``), via
    float32 as c10's BFloat16 takes a double."""
    single = np.float32(float(value))
    if mode == torch.bfloat16 and not opmath:
        return _widen(_round_bf16(single))
    return single


_EVERY_BF16 = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # element i: the bits i
_TABLES: dict[tuple, np.ndarray] = {}


def _scalar_key(value: float | Tensor | None) -> tuple:
    """What a formula's scalar changes in torch's arithmetic: its value, and whether (and which) 0-dim tensor it is."""
    return (value.dtype if isinstance(value, Tensor) else type(value), None if value is None else float(value))


def bf16_table(formula: Callable[..., Tensor], *scalars: float | Tensor | None) -> np.ndarray:
    """torch's ``formula(x, *scalars)`` at every bfloat16 value x, as the bfloat16 bits indexed by x's bits, computed
    by torch once per formula and scalars and kept (the last 64)."""
    key = (formula, *map(_scalar_key, scalars))
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= 64:
            _TABLES.clear()
        table = _TABLES[key] = formula(_EVERY_BF16, *scalars).view(torch.int16).numpy().view(np.uint16)
    return table


@njit(nogil=True, cache=True)
def _gather(bits: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    for i in range(bits.size):
        out[i] = table[bits[i]]


def look_up(table: np.ndarray, x: Tensor, out: Tensor | None = None) -> Tensor | None:
    """``table`` (a :func:`bf16_table`) at each element of a bfloat16 ``x`` the kernels cover, into ``out`` (default
    new, like x; x itself for in place), or None: a gather over the bits, a pass of its own (a gather in a formula's
    loop would keep that loop scalar)."""
    if x.dtype != torch.bfloat16 or not covered(x):
        return None
    out = torch.empty_like(x) if out is None else out
    if out.stride() != x.stride() or out.dtype != x.dtype:
        return None
    if x.numel():
        omp.run(_gather, x.numel(), omp.Split(_flat(x, np.uint16)), table, omp.Split(_flat(out, np.uint16)), grain=_ALIGN)
        _written(out)
    return out


_CHUNK = 512  # elements gathered into a buffer at a time, then multiplied in a loop that vectorises


@njit(nogil=True, cache=True)
def _gather_product(bits: np.ndarray, table: np.ndarray, grad: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """out = grad * table[bits] in bfloat16 (the product in float32, rounded once): each chunk's lookups (scalar
    loads) first, then its products (over views indexed from 0, so that the loop vectorises)."""
    looked_up = np.empty(_CHUNK, dtype=np.uint16)
    for start in range(0, bits.size, _CHUNK):
        stop = min(bits.size, start + _CHUNK)
        b, g, o = bits[start:stop], grad[start:stop], out[start:stop]
        for i in range(stop - start):
            looked_up[i] = table[b[i]]
        for i in range(stop - start):
            o[i] = _round_bf16(_widen(g[i]) * _widen(looked_up[i]))


class Product:
    """A gradient waiting, in :func:`multiplying`, to be multiplied into the pass that makes the value of a formula
    of ``x``: its :func:`tabulated` lookup of x, or its last kernel (``apply(..., final=True)``)."""

    def __init__(self, x: Tensor, grad: Tensor) -> None:
        self.x, self.grad = x, grad
        self.result: Tensor | None = None
        self._version = -1

    def gradient_for(self, value: Tensor) -> Tensor | None:
        """The gradient, if the product is still waiting and the gradient has ``value``'s dtype, shape and strides
        (torch's product of the two then has the same); None otherwise."""
        grad = self.grad
        if self.result is not None or not covered(grad) or grad.dtype != value.dtype:
            return None
        return grad if grad.shape == value.shape and grad.stride() == value.stride() else None

    def take(self, x: Tensor) -> Tensor | None:
        """A new tensor like x for the product of a lookup of this very ``x``, if it is still waiting for it; None
        otherwise."""
        if x is not self.x or self.gradient_for(x) is None:
            return None
        result = torch.empty_like(x)
        if result.stride() != x.stride():
            return None
        self.result = result
        return result

    def finish(self, result: Tensor | None = None) -> Tensor:
        """The product, written (into ``result``, or the tensor :meth:`take` gave): its version now is the one
        :meth:`is_result` expects."""
        self.result = self.result if result is None else result
        assert self.result is not None
        self._version = self.result._version
        return self.result

    def is_result(self, value: Tensor) -> bool:
        """True when ``value`` is the product itself, unchanged since: the formula's value was the lookup."""
        return value is self.result and value._version == self._version


_WAITING = threading.local()


def waiting_product(x: Tensor, value: Tensor) -> tuple[Tensor, Product] | None:
    """(grad, product) where, within :func:`multiplying` for this ``x``, the gradient still waits to be multiplied
    into a formula's ``value`` (a new tensor of grad's dtype and layout): a formula's own kernel then writes
    ``grad * value`` into ``value`` and returns ``product.finish(value)``.  None otherwise."""
    product = getattr(_WAITING, "product", None)
    if product is None or product.x is not x:
        return None
    grad = product.gradient_for(value)
    return None if grad is None else (grad, product)


@contextlib.contextmanager
def multiplying(x: Tensor, grad: Tensor) -> Iterator[Product]:
    """Within it, the first :func:`tabulated` formula of ``x`` itself, or the first kernel applied with
    ``final=True`` to tensors of grad's dtype and layout, returns ``grad * value`` (torch's product of the two,
    bit for bit) in its pass instead of the value: a surrogate's backward (``grad * derivative(x)``) where the
    derivative ends in a table lookup or a kernel.  The caller checks :meth:`Product.is_result` on what the
    derivative returned, and computes the derivative again, plainly, where the product went into anything else."""
    previous = getattr(_WAITING, "product", None)
    _WAITING.product = product = Product(x, grad)
    try:
        yield product
    finally:
        _WAITING.product = previous


# bfloat16 elements per step of torch's vectorised CPU loops (two Vectorized<BFloat16>, AVX-512 or AVX2): of one
# pass over n elements on one thread, the last n % step run through its scalar code instead
_STEP = {"AVX512": 64, "AVX2": 32}.get(torch.backends.cpu.get_cpu_capability())
_SCALAR_ROWS = 31  # elements no vectorised loop step covers (< 32)
_TAILS: dict[tuple, np.ndarray | None] = {}


def bf16_tail_table(formula: Callable[..., Tensor], *scalars: float | Tensor | None) -> np.ndarray | None:
    """:func:`bf16_table` as torch's scalar code computes it (the formula on every bfloat16 value, in tensors too
    short for one vectorised step, so that each of its operators runs its scalar code), or None where that is the
    vectorised body's table: every operator of the formula gives each element a value that depends on that value
    alone (the arithmetic, tanh and cos here, but for the payload of a NaN, which the tests do not compare; not
    bfloat16 cosh and pow, whose vectorised and scalar code round some values differently)."""
    key = (formula, *map(_scalar_key, scalars))
    if key not in _TAILS:
        if len(_TAILS) >= 64:
            _TAILS.clear()
        tail = torch.cat([formula(chunk.clone(), *scalars) for chunk in _EVERY_BF16.split(_SCALAR_ROWS)])
        tail = tail.view(torch.int16).numpy().view(np.uint16)
        nan = lambda bits: (bits & np.uint16(0x7FFF)) > np.uint16(0x7F80)  # noqa: E731
        body = bf16_table(formula, *scalars)
        _TAILS[key] = None if np.all((tail == body) | (nan(tail) & nan(body))) else tail  # a NaN's payload aside
    return _TAILS[key]


def _scalar_tails(n: int) -> list[tuple[int, int]]:
    """The (start, stop) ranges of a contiguous n-element pass that torch's scalar code computes: torch splits the
    pass between its threads as ``at::parallel_for`` does (from :data:`REDUCTION_GRAIN` elements on, one range
    of ceil(n / t) elements per thread, t = min(threads, ceil(n / grain))), and the last ``len % _STEP`` of each
    range run through its scalar code."""
    threads = torch.get_num_threads()
    ranges = [(0, n)]
    if n >= REDUCTION_GRAIN and threads > 1:
        size = -(-n // min(threads, -(-n // REDUCTION_GRAIN)))
        ranges = [(start, min(n, start + size)) for start in range(0, n, size)]
    return [(stop - (stop - start) % _STEP, stop) for start, stop in ranges if (stop - start) % _STEP]


def tabulated(formula: Callable[..., Tensor], x: Tensor, *scalars: float | Tensor | None) -> Tensor | None:
    """``formula(x, *scalars)`` for a bfloat16 x the kernels cover, looked up in its :func:`bf16_table` in one pass;
    None otherwise.

    Bit for bit torch's formula: each of its torch operators gives an element a value that depends on the
    element's value and on whether torch's vectorised body or its scalar tail computes it, nothing else.  The
    tails are the last n % ``_STEP`` elements of each thread's range (:func:`_scalar_tails`), computed by the
    torch formula on those few elements alone (all scalar code).  Where torch's vectorised step is unknown,
    only a formula whose tail rounds as its body (:func:`bf16_tail_table`) is covered."""
    if x.dtype != torch.bfloat16 or not covered(x):
        return None
    body = bf16_table(formula, *scalars)
    if _STEP is None and bf16_tail_table(formula, *scalars) is not None:
        return None
    waiting = getattr(_WAITING, "product", None)
    product = None if waiting is None else waiting.take(x)  # grad * formula(x) instead: torch's product of them
    n = x.numel()
    if product is None:
        out = look_up(body, x)
        if out is None:
            return None
    else:
        out = product
        if n:
            bits, grad, result = (omp.Split(_flat(t, np.uint16)) for t in (x, waiting.grad, product))
            omp.run(_gather_product, n, bits, body, grad, result, grain=_ALIGN)
    if _STEP is not None:
        flat_x, flat_out = (torch.as_strided(t, (n,), (1,), t.storage_offset()) for t in (x, out))
        flat_grad = None if product is None else torch.as_strided(waiting.grad, (n,), (1,), waiting.grad.storage_offset())
        for start, stop in _scalar_tails(n):
            tail = formula(flat_x[start:stop], *scalars)
            flat_out[start:stop] = tail if flat_grad is None else flat_grad[start:stop] * tail
    return out if product is None else waiting.finish()


_SIGN_BIT = {torch.float32: (np.uint32, 31, 0x3F800000), torch.bfloat16: (np.uint16, 15, 0x3F80)}  # bits, shift, +1


@njit(nogil=True, cache=True)
def _pack_sign_bits(src, shift, out):  # pragma: no cover - compiled
    """Bit k of byte j: the sign bit of element 8 j + k (1 for -1); the last byte's missing elements as +1."""
    n, full = src.size, src.size // 8
    for j in range(full):
        byte = np.uint8(0)
        for k in range(8):
            byte |= np.uint8((src[8 * j + k] >> shift) & 1) << np.uint8(k)
        out[j] = byte
    if n > 8 * full:
        byte = np.uint8(0)
        for k in range(n - 8 * full):
            byte |= np.uint8((src[8 * full + k] >> shift) & 1) << np.uint8(k)
        out[full] = byte


@njit(nogil=True, cache=True)
def _unpack_sign_bits(bits, shift, one, out):  # pragma: no cover - compiled
    """+1 (``one``'s bits) or -1 (the sign bit set) per element, from :func:`_pack_sign_bits`'s bytes."""
    n, full = out.size, out.size // 8
    for j in range(full):
        byte = bits[j]
        for k in range(8):
            out[8 * j + k] = one | (out.dtype.type((byte >> np.uint8(k)) & np.uint8(1)) << shift)
    for i in range(8 * full, n):
        out[i] = one | (out.dtype.type((bits[full] >> np.uint8(i - 8 * full)) & np.uint8(1)) << shift)


@njit(nogil=True, cache=True)
def _clamp_and_sign_bf16(bits: np.ndarray, signs: np.ndarray) -> None:  # pragma: no cover - compiled
    """clamp(x, -1, 1) in place and sign(x) on bfloat16 bits: |x| > 1 (its magnitude bits above 1's, infinity
    included) becomes +-1, a NaN 0xFFFF (torch's vectorised clamp writes that), every other value stays; the sign
    is -1 for a set sign bit (but -0.0) and NaN, else +1."""
    for i in range(bits.size):
        b = bits[i]
        magnitude, negative = b & np.uint16(0x7FFF), b >> np.uint16(15)
        nan = magnitude > np.uint16(0x7F80)
        beyond = np.uint16(0xBF80) if negative else np.uint16(0x3F80)
        bits[i] = np.uint16(0xFFFF) if nan else (beyond if magnitude > np.uint16(0x3F80) else b)
        signs[i] = np.uint16(0xBF80) if nan or (negative and magnitude != np.uint16(0)) else np.uint16(0x3F80)


def clamp_and_sign(x: Tensor) -> Tensor | None:
    """``x.clamp_(-1, 1)`` and ``sign(x)`` (:data:`SIGN`'s values) in one pass, bit for bit torch's clamp (a NaN's bits
    too: 0xFFFF in bfloat16 where torch's vectorised loop computes it, the input's in its scalar tails, which torch's
    clamp computes here on those few elements), or None where the kernels do not cover x (or torch's vector step is
    unknown, for bfloat16).  Counts as an in-place write of x."""
    if not covered(x) or (x.dtype == torch.bfloat16 and _STEP is None):
        return None
    signs = torch.empty_like(x)
    if signs.stride() != x.stride():
        return None
    n = x.numel()
    if x.dtype == torch.float32:
        if n:
            CLAMP_AND_SIGN(torch.float32, (x,), (x, signs))
        return signs
    flat = torch.as_strided(x.detach(), (n,), (1,), x.storage_offset())
    tails = [(start, stop, flat[start:stop].clone()) for start, stop in _scalar_tails(n)]
    if n:
        omp.run(_clamp_and_sign_bf16, n, omp.Split(_flat(x, np.uint16)), omp.Split(_flat(signs, np.uint16)), grain=_ALIGN)
    for start, stop, original in tails:
        flat[start:stop] = original.clamp_(-1.0, 1.0)
    _written(x, signs)
    return signs


def pack_signs(a: Tensor) -> Tensor | None:
    """A tensor of +-1 values in 1 bit each (uint8, elements in memory order), or None where the kernels do not cover it."""
    if not covered(a):
        return None
    bits, shift, _ = _SIGN_BIT[a.dtype]
    out = torch.empty((a.numel() + 7) // 8, dtype=torch.uint8)
    if a.numel():
        src, dst, full = _flat(a, bits), out.numpy(), a.numel() // 8
        omp.run(_pack_sign_bits, full, omp.Split(src[: 8 * full]), shift, omp.Split(dst[:full]), work=a.numel(), grain=_ALIGN)
        if full < dst.size:
            _pack_sign_bits(src[8 * full :], shift, dst[full:])
    return out


def unpack_signs(packed: Tensor, shape: torch.Size, stride: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """The +-1 tensor :func:`pack_signs` packed, as a float32 or bfloat16 ``dtype`` tensor of the packed one's shape
    and (dense) strides."""
    out = torch.empty_strided(shape, stride, dtype=dtype)
    bits, shift, one = _SIGN_BIT[dtype]
    if out.numel():
        src, dst, full = packed.numpy(), _flat(out, bits), out.numel() // 8
        omp.run(_unpack_sign_bits, full, omp.Split(src[:full]), shift, bits(one), omp.Split(dst[: 8 * full]), work=out.numel(), grain=_ALIGN)
        if full < src.size:
            _unpack_sign_bits(src[full:], shift, bits(one), dst[8 * full :])
    return out


_WELFORD_BLOCK = 32  # elements of each row copied into a block of columns, one element of every row per column


@njit(nogil=True, cache=True)
def _quotient(a: np.float64, n: np.float64, inverse: np.float64) -> np.float64:  # pragma: no cover - compiled
    """a / n correctly rounded, for a whole n < 2^40 with ``inverse`` = 1 / n rounded and a quotient a / n that is
    normal or zero (the sign of a zero aside: -0 / n gives +0), in three products (a division's latency is the
    Welford chain's): q = a inverse is within 1.5 ulp of a / n, its remainder a - q n comes exactly enough from
    an fma, and q + (a - q n) inverse, rounded once, differs from a / n by under 3 2^-53 ulp, while a / n lies at
    least ulp / (2 n) from every rounding midpoint (it is a multiple of ulp / n, and no midpoint: a has 53 bits;
    a subnormal quotient, with fewer, can be one).  A non-finite a gives NaN.  In :func:`_welford_rows` the
    deltas of float32 or bfloat16 values are zero or far above 2^-1022 n, and the mean is never -0."""
    q = a * inverse
    return fma(fma(-q, n, a), inverse, q)


@njit(nogil=True, cache=True)
def _welford_row(row: np.ndarray, bf16: bool) -> np.float64:  # pragma: no cover - compiled
    """torch's WelfordOps over one row in order (float64): the sum of squared deviations."""
    mean = m2 = np.float64(0.0)
    for i in range(row.size):
        v = np.float64(_widen(row[i])) if bf16 else np.float64(row[i])
        delta = v - mean
        mean = mean + delta / np.float64(i + 1)
        m2 = m2 + delta * (v - mean)
    return m2


@njit(nogil=True, cache=True)
def _welford_rows(rows: np.ndarray, bf16: bool, correction: int, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """Per row, torch's WelfordOps over the row in order (float64), all rows advanced together (independent chains,
    one vector lane each): blocks of each row's next elements are copied into columns, so that the loop over the
    rows reads one column, and the update divides by the element count as :func:`_quotient` does.  A row with a
    non-finite element (a non-finite sum) is summed again with divisions (its NaN or infinity as torch's)."""
    count, n = rows.shape
    mean, m2 = np.zeros(count), np.zeros(count)
    block = np.empty((_WELFORD_BLOCK, count), dtype=rows.dtype)
    for start in range(0, n, _WELFORD_BLOCK):
        width = min(_WELFORD_BLOCK, n - start)
        for r in range(count):
            part = rows[r, start : start + width]
            for j in range(width):
                block[j, r] = part[j]
        for j in range(width):
            elements = np.float64(start + j + 1)
            inverse = np.float64(1.0) / elements
            column = block[j]
            for r in range(count):
                v = np.float64(_widen(column[r])) if bf16 else np.float64(column[r])
                delta = v - mean[r]
                new_mean = mean[r] + _quotient(delta, elements, inverse)
                m2[r] = m2[r] + delta * (v - new_mean)
                mean[r] = new_mean
    divisor = np.float64(max(n - correction, 0))
    for r in range(count):
        if not np.isfinite(m2[r]):
            m2[r] = _welford_row(rows[r], bf16)
        out[r] = m2[r] / divisor


def per_sample_variance(x: Tensor, root: bool = False) -> Tensor | None:
    """``x.var(dim=(1, ..., x.dim() - 1), keepdim=True)`` (unbiased), with ``root`` ``x.std(...)``, bit for bit, or
    None where the kernel does not cover x.

    torch reduces each sample with Welford's update in float64, sequentially in memory order
    when a sample has fewer than :data:`REDUCTION_GRAIN` elements or torch runs one thread
    (otherwise in per-thread chunks it then combines: not covered), takes the root (std) in float64 too,
    then rounds to x's dtype through float32."""
    if not (covered(x) and x.is_contiguous() and x.dim() >= 2 and x.shape[0] > 0):
        return None
    per_sample = x[0].numel()
    if per_sample < 2 or (per_sample >= REDUCTION_GRAIN and torch.get_num_threads() > 1):
        return None
    rows = bf16_bits(x, x.shape[0], per_sample) if x.dtype == torch.bfloat16 else x.detach().reshape(x.shape[0], per_sample).numpy()
    out = np.empty(x.shape[0])
    omp.run(_welford_rows, x.shape[0], omp.Split(rows), x.dtype == torch.bfloat16, 1, omp.Split(out), work=x.numel())
    if root:
        np.sqrt(out, out=out)
    variance = torch.from_numpy(out).to(torch.float32).to(x.dtype)
    if x.dtype == torch.bfloat16:  # torch rounds its result as c10 does one value: NaN to 0x7FC0 (its vector cast: 0xFFFF)
        variance.view(torch.int16)[variance.isnan()] = 0x7FC0
    return variance.view(x.shape[0], *([1] * (x.dim() - 1)))


__all__ = [
    "APPROX_SIGN_DERIVATIVE",
    "APPROX_SIGN_GRADIENT",
    "CLIP_DERIVATIVE",
    "CLIP_GRADIENT",
    "CLAMP_AND_SIGN",
    "clamp_and_sign",
    "Product",
    "EXCEPTION_SHARE",
    "Kernel",
    "apply",
    "bf16_table",
    "bf16_tail_table",
    "fma",
    "look_up",
    "memory_order",
    "multiplying",
    "tabulated",
    "operand",
    "r",
    "REDUCTION_GRAIN",
    "SHIFTED_APPROX_SIGN_GRAD",
    "SHIFTED_SIGN",
    "shifted_approx_sign_backward",
    "SIGN",
    "covered",
    "pack_signs",
    "per_sample_variance",
    "scale_channels",
    "scale_channels_backward",
    "unary",
    "unpack_signs",
]


# ------------------------------------------------------------------------------------------------------------
# y * alpha per channel, kept for the backward as its product (bnnbench.functional.scale_channels)
#
# out = y * alpha_c rounds once (to float32, or to bfloat16 from float32).  A binary layer's y is an integer
# (a convolution of +-1 by +-1, rounded to the dtype), recovered from out as the integer nearest to
# out (1 / alpha_c) (float32; the nearest integer v found as (v + 1.5 2^23) - 1.5 2^23): exactly whenever
# |y| < 2^20 in float32 and |y| < 128 in bfloat16 (the roundings move it by less than |y| (2^-8 + 2^-22) < 1/2).  Where that misses y (a larger bfloat16 y, a
# y that is no integer, alpha_c zero or not finite) the element is an exception, kept as (index, y); a
# layer with more than 1 in EXCEPTION_SHARE exceptions keeps y itself.

EXCEPTION_SHARE = 16
_NEAREST_INTEGER = np.float32(1.5 * 2**23)  # (v + this) - this: v rounded to an integer, half to even, for |v| < 2^22


def _scaling(bf16: bool):
    """The forward and backward loops of ``y * alpha`` over float32 arrays or bfloat16 bits (compiled per dtype,
    not cached on disk: numba keys no closure), dividing as IEEE 754 does (by zero too)."""

    @njit(nogil=True, error_model="numpy")
    def value(bits):  # pragma: no cover - compiled
        return _widen(bits) if bf16 else bits

    @njit(nogil=True, error_model="numpy")
    def rounded(v):  # pragma: no cover - compiled
        return _round_bf16(v) if bf16 else v

    @njit(nogil=True, error_model="numpy")
    def widened(v):  # pragma: no cover - compiled
        return _widen(_round_bf16(v)) if bf16 else v

    @njit(nogil=True, error_model="numpy")
    def recovered(o, inverse):  # pragma: no cover - compiled
        return (value(o) * inverse + _NEAREST_INTEGER) - _NEAREST_INTEGER

    @njit(nogil=True, error_model="numpy")
    def forward(y, alpha, inner, out, exceptions):  # pragma: no cover - compiled
        """out = y * alpha[channel] (rows of ``inner`` elements, channels cycling from the first row), and per
        row the count of elements y cannot be recovered from."""
        channels = alpha.size
        for row in range(y.size // inner):
            a = alpha[row % channels]
            inverse = np.float32(1.0) / a
            src, dst = y[row * inner : row * inner + inner], out[row * inner : row * inner + inner]
            count = 0
            for j in range(inner):  # (over a row's view: indices known non-negative, the loop vectorises)
                o = rounded(value(src[j]) * a)
                dst[j] = o
                count += _bits_of(recovered(o, inverse)) != _bits_of(value(src[j]))
            exceptions[row] = count

    @njit(nogil=True, error_model="numpy")
    def collect(y, alpha, inner, out, indices, values):  # pragma: no cover - compiled
        """The exceptions' indices and elements, in order, into ``indices``/``values`` (which hold them all)."""
        e, channels = 0, alpha.size
        for row in range(y.size // inner):
            inverse = np.float32(1.0) / alpha[row % channels]
            for j in range(inner):
                i = row * inner + j
                if _bits_of(recovered(out[i], inverse)) != _bits_of(value(y[i])):
                    indices[e], values[e] = i, y[i]
                    e += 1

    @njit(nogil=True, error_model="numpy")
    def backward(out, grad, alpha, inner, grad_y, product):  # pragma: no cover - compiled
        """grad_y = grad * alpha[channel] and product = grad * y (float32: a bfloat16 product rounded, then
        widened, as torch's sum of it widens it first), y recovered from out."""
        channels = alpha.size
        for row in range(out.size // inner):
            a = alpha[row % channels]
            inverse = np.float32(1.0) / a
            span = slice(row * inner, row * inner + inner)
            o, g, gy, p = out[span], grad[span], grad_y[span], product[span]
            for j in range(inner):
                gj = value(g[j])
                gy[j] = rounded(gj * a)
                p[j] = widened(gj * recovered(o[j], inverse))

    @njit(nogil=True, error_model="numpy")
    def patch(grad, indices, values, product):  # pragma: no cover - compiled
        """The exceptions' products, from their kept y."""
        for e in range(indices.size):
            i = indices[e]
            product[i] = widened(value(grad[i]) * value(values[e]))

    return forward, collect, backward, patch


_SCALING = {torch.float32: (_scaling(False), np.float32), torch.bfloat16: (_scaling(True), np.uint16)}


def _channel_layout(y: Tensor, alpha: Tensor) -> int | None:
    """Elements per (sample, channel) row when the kernels take ``y * alpha``: y dense and contiguous, alpha
    one value per channel of y's dtype, shaped to broadcast along dim 1; None otherwise."""
    if not (covered(y) and y.is_contiguous() and y.dim() >= 2 and alpha.dtype == y.dtype and alpha.device == y.device):
        return None
    if tuple(alpha.shape) != (y.shape[1], *([1] * (y.dim() - 2))):
        return None
    return y[0, 0].numel()


def scale_channels(y: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """(y * alpha, exception indices, exception values) when y can be recovered from the product, or None
    where the kernel does not cover y or too many elements would be exceptions (1 in EXCEPTION_SHARE)."""
    inner = _channel_layout(y, alpha)
    if inner is None or not y.numel():
        return None
    (forward, collect, _, _), bits = _SCALING[y.dtype]
    out = torch.empty_like(y)
    a = alpha.detach().reshape(-1).float().numpy()
    flat_y, flat_out, rows = _flat(y, bits), _flat(out, bits), y.numel() // inner
    exceptions = np.empty(rows, dtype=np.int64)
    # each thread's rows start at a multiple of the channels: row % channels stays the row's channel
    omp.run(forward, rows, omp.Split(flat_y), a, inner, omp.Split(flat_out), omp.Split(exceptions), work=y.numel(), grain=a.size)
    count = int(exceptions.sum())
    if count > y.numel() // EXCEPTION_SHARE:
        return None
    indices, values = np.empty(count, dtype=np.int64), np.empty(count, dtype=bits)
    if count:
        collect(flat_y, a, inner, flat_out, indices, values)
    kept = torch.from_numpy(values)
    return out, torch.from_numpy(indices), kept.view(torch.bfloat16) if y.dtype == torch.bfloat16 else kept


def scale_channels_backward(out: Tensor, alpha: Tensor, indices: Tensor, values: Tensor, grad: Tensor) -> tuple[Tensor, Tensor] | None:
    """(grad * alpha, grad * y) for ``out = y * alpha`` from :func:`scale_channels`, or None where the kernel
    does not cover grad (same layout as out).  grad * y comes in float32, each element rounded to out's dtype
    first: the copy torch's ``sum`` of a bfloat16 tensor over several dims makes before it adds (summing it
    gives that sum's float32 value, which rounds to its result)."""
    inner = _channel_layout(grad, alpha)
    if inner is None or grad.shape != out.shape or grad.dtype != out.dtype:
        return None
    (_, _, backward, patch), bits = _SCALING[out.dtype]
    grad_y, product = torch.empty_like(out), torch.empty_like(out, dtype=torch.float32)
    kept = values.view(torch.int16).numpy().view(np.uint16) if out.dtype == torch.bfloat16 else values.numpy()
    a = alpha.detach().reshape(-1).float().numpy()
    flat_grad, flat_product, rows = _flat(grad, bits), _flat(product, np.float32), out.numel() // inner
    split = [omp.Split(t) for t in (_flat(out, bits), flat_grad)]
    omp.run(backward, rows, *split, a, inner, omp.Split(_flat(grad_y, bits)), omp.Split(flat_product), work=out.numel(), grain=a.size)
    if indices.numel():
        patch(flat_grad, indices.numpy(), kept, flat_product)
    return grad_y, product


# ------------------------------------------------------------------------------------------------------------
# ReActNet's gradient with its shift's sum in the same pass (the fused formulas of bnnbench.functional.surrogate_sign
# with a per-channel shift and ApproxSign's derivative)


_APPROX_SIGN_DERIVATIVE_FLOAT32 = _with_rounding(_approx_sign_derivative, _keep)


@njit(nogil=True, fastmath={"reassoc"}, error_model="numpy")  # (not cached: it calls a formula compiled at import)
def _shifted_approx_sign_rows(x, grad, shift, out, sums):  # pragma: no cover - compiled
    """Per (sample, channel) row of x (bfloat16 bits or float32) and grad: the float32 product grad * max(0, 2 - 2|x +
    shift_c|) with x + shift_c rounded to float32 (as :data:`SHIFTED_APPROX_SIGN_GRAD` computes it in float32 mode),
    stored in out's dtype, and the row's float32 sum of the products; the row's channel is its index modulo the
    channels (a thread's rows start at a multiple of them).  Only the sum is reassociated (into vector lanes)."""
    channels = shift.size
    for row in range(x.shape[0]):
        b, xr, gr, o = shift[row % channels], x[row], grad[row], out[row]
        total = np.float32(0.0)
        for i in range(xr.size):
            g = _load(gr[i]) * _APPROX_SIGN_DERIVATIVE_FLOAT32(_load(xr[i]) + b)
            o[i] = _store(g, o)
            total += g
        sums[row] = total


@njit(nogil=True, fastmath={"reassoc"}, error_model="numpy")  # (not cached: it calls a formula compiled at import)
def _shifted_approx_sign_samples(x, grad, shift, out, sums):  # pragma: no cover - compiled
    """:func:`_shifted_approx_sign_rows` for channels_last samples (one row per sample, an element's channel its index
    modulo the channels): the same products, and per sample the float32 sum of each channel's (into its row of sums)."""
    channels = shift.size
    for n in range(x.shape[0]):
        xr, gr, o, total = x[n], grad[n], out[n], sums[n]
        for c in range(channels):
            total[c] = np.float32(0.0)
        for p in range(xr.size // channels):
            for c in range(channels):
                i = p * channels + c
                g = _load(gr[i]) * _APPROX_SIGN_DERIVATIVE_FLOAT32(_load(xr[i]) + shift[c])
                o[i] = _store(g, o)
                total[c] += g


def _channels_last_shift(x: Tensor, shift: Tensor) -> bool:
    """True where the channels_last kernel takes ``x + shift``: a covered channels_last x with elements, and a float32
    shift of shape (C, 1, 1)."""
    return x.numel() > 0 and covered(x) and channels_last(x) and shift.dtype == torch.float32 and tuple(shift.shape) == (x.shape[1], 1, 1)


def shifted_approx_sign_backward(x: Tensor, shift: Tensor, grad: Tensor) -> tuple[Tensor, Tensor] | None:
    """The gradients of ``sign(x + shift)`` with ApproxSign's surrogate, for a float32 per-channel shift (C, 1, ...)
    and a contiguous (N, C, ...) x and grad (bfloat16 or float32): to x ``grad * max(0, 2 - 2|x + shift|)`` in x's
    dtype, bit for bit what torch's float32 product rounded to x's dtype gives, and to the shift that product's sum
    over every other dimension, in one pass: float32 per (sample, channel) row, then float64 across samples,
    rounded once to float32 (torch's formula sums the float32 products in its own order).  A channels_last x takes
    the same products and sums per (sample, channel) in memory order (its grad copied to x's layout where it has
    another).  None where the kernel does not cover them."""
    if covered(grad) and grad.shape == x.shape and _channels_last_shift(x, shift):
        grad, count = in_layout_of(grad, x, grad.dtype), x.shape[0]
        out, sums = torch.empty_like(x), np.empty((count, x.shape[1]), dtype=np.float32)
        values = shift.detach().reshape(-1).contiguous().numpy()
        arrays = [omp.Split(memory_rows(t, count)) for t in (x, grad)]
        omp.run(_shifted_approx_sign_samples, count, *arrays, values, omp.Split(memory_rows(out, count)), omp.Split(sums), work=x.numel())
        _written(out)
        return out, torch.from_numpy(sums).double().sum(dim=0).float().reshape(shift.shape)
    if not (covered(x) and covered(grad) and x.is_contiguous() and grad.is_contiguous() and grad.shape == x.shape and x.dim() >= 2):
        return None
    if shift.dtype != torch.float32 or tuple(shift.shape) != (x.shape[1], *([1] * (x.dim() - 2))) or not x.numel():
        return None
    rows, channels = x.shape[0] * x.shape[1], x.shape[1]
    out = torch.empty_like(x)
    sums = np.empty(rows, dtype=np.float32)
    values = shift.detach().reshape(-1).contiguous().numpy()
    arrays = [omp.Split(stored(t, rows, -1)) for t in (x, grad)]
    omp.run(_shifted_approx_sign_rows, rows, *arrays, values, omp.Split(stored(out, rows, -1)), omp.Split(sums), work=x.numel(), grain=channels)
    _written(out)
    total = torch.from_numpy(sums).view(x.shape[0], channels).double().sum(dim=0).float()
    return out, total.reshape(shift.shape)
