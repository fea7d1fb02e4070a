"""FDA: frequency-domain approximation of the sign's gradient by a Fourier series.

Forward:  w_b = alpha_c sign(w),  alpha_c = mean|w_c| per output channel (detached);
          a_b = sign(a)   (sign(0) = +1)
Backward, on weights (times alpha_c) and activations alike (paper Sec. 3):
          sign(x) = (4/pi) sum_i sin((2i+1) omega x) / (2i+1)  over i >= 0, so
          d sign(x) / dx ~ (4 omega / pi) sum_{i=0..n} cos((2i+1) omega x) 1{|x| <= 1}
          omega = 0.1,  n(p) = 9 + floor(9 p)   (SPEC section 1)

Not modelled: the noise-adaptation module (a small per-layer MLP whose output,
weighted by 0.05 (1 + cos(pi (epoch+1)/E)), is added to the binary weights and
activations during training, which makes the training forward non-binary).

Paper: Xu, Han, Wang, Zhao, Xu, Tao & Xu, "Learning Frequency Domain
Approximation for Binary Neural Networks", NeurIPS 2021.  The authors' public
release (huawei-noah/Efficient-Computing, ``BinaryNetworks``) holds evaluation code and
checkpoints only, no training code: the backward here follows the paper's truncated
Fourier series of sign (Sec. 3) with the constants of this project's specification
(SPEC section 1: omega = 0.1, n = 9 + floor(9 p)), not an official training script.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit
from torch import Tensor

from bnnbench import elementwise, omp
from bnnbench.elementwise import r
from bnnbench.functional import fused_formulas
from bnnbench.method import Method, Progress, as_progress, mean_abs, per_output_dims, schedule
from bnnbench.registry import register_method


def fourier_sign_derivative(x: Tensor, omega: float, n: int | Tensor, max_n: int | None = None) -> Tensor:
    """(4 omega / pi) sum_{i=0..n} cos((2i+1) omega x), zero for |x| > 1.

    ``n`` may be a 0-dim tensor (a schedule of the training progress) that never exceeds
    ``max_n``: the terms ``i <= max_n`` are evaluated and those beyond ``n`` multiplied by 0,
    which leaves the sum bit for bit as with the integer ``n``.

    The torch formula, or bit for bit its value in fewer passes where the kernels cover x: bfloat16 by lookup
    (:func:`bnnbench.elementwise.tabulated`), float32 in blocks (:func:`_fourier_float32`); float32 with the fused
    fp32 formulas by the cosines' recurrence instead (:func:`_fourier_recurrence`: not bit for bit).
    """
    if x.dtype == torch.bfloat16:
        fused = elementwise.tabulated(_fourier, x, omega, n, max_n)
    elif fused_formulas(torch.float32) and (recurred := _fourier_recurrence(x, omega, n, max_n)) is not None:
        return recurred
    else:
        fused = _fourier_float32(x, omega, n, max_n)
    return fused if fused is not None else _fourier(x, omega, n, max_n)


def _fourier(x: Tensor, omega: float, n: int | Tensor, max_n: int | None = None) -> Tensor:
    last = int(n) if max_n is None else max_n
    series = sum(torch.cos((2 * i + 1) * omega * x) * (i <= n) for i in range(last + 1))
    return (4.0 * omega / math.pi) * series * (x.abs() <= 1).to(x.dtype)


def _fourier_scaled(series: np.float32, x: np.float32, scale: np.float32, beyond: np.float32) -> np.float32:
    """``(4 omega / pi) * series`` times ``(|x| <= 1)`` as 1 or 0; NaN where a term not evaluated (the largest
    coefficient ``beyond``, 0 for none) has an infinite argument: cos(inf) * 0 is NaN."""
    if abs(r(beyond * x)) == np.float32(np.inf):
        series = np.float32(np.nan)
    return r(r(scale * series) * (np.float32(1.0) if abs(x) <= np.float32(1.0) else np.float32(0.0)))


FOURIER_SCALED = elementwise.Kernel("fourier_scaled", _fourier_scaled)

BLOCK = 1 << 14
"""Elements of x per block of the float32 series: every term's argument of a block, (n + 1) x BLOCK float32 (1.2 MB
for n = 18), stays in cache between the pass that makes them, torch's cos over them and the sum, where one pass
per term over the whole activation streams it from memory 2n times.  n = 13, against those passes per term, in one
process (2026-12-04, Intel Xeon 6/207, AVX-512 with VPOPCNTDQ, no AMX, medians of 15 calls): 128 x 16 x 32 x 32, 23.4 ms against 30.7 ms on one
thread, 13.4 against 16.5 ms on two; 128 x 64 x 8 x 8, 5.7 against 8.1 ms and 3.5 against 4.7 ms; a 16 x 16 x 3 x 3
weight 87 us against torch's formula's 221 us, so every size takes the blocks.  In a prototype of these loops (the same
day and machine) blocks of 8,192 to 16,384 elements were fastest of 2,048 to 32,768.  On several threads each thread makes and sums a block of its own, and torch's cos
takes all of them in one call."""


@njit(nogil=True, cache=True)
def _block_arguments(x: np.ndarray, coefficients: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """Per block b, out[b, i] = coefficients[i] * x[b]: the torch formula's ``(2 i + 1) * omega * x`` (a float
    times x: float32)."""
    for b in range(x.shape[0]):
        for i in range(coefficients.size):
            c = coefficients[i]
            for j in range(x.shape[1]):
                out[b, i, j] = c * x[b, j]


@njit(nogil=True, cache=True)
def _block_sums(cosines: np.ndarray, total: np.ndarray) -> None:  # pragma: no cover - compiled
    """Per block, the series in the torch formula's order, ``0 + t_0 + t_1 + ...`` with ``t_i = cos_i * 1`` (the
    term's ``* (i <= n)``; Python's ``sum`` starts from 0)."""
    blocks, terms, m = cosines.shape
    for b in range(blocks):
        for j in range(m):
            total[b, j] = np.float32(0.0)
        for i in range(terms):
            for j in range(m):
                total[b, j] = total[b, j] + cosines[b, i, j] * np.float32(1.0)


def _fourier_float32(x: Tensor, omega: float, n: int | Tensor, max_n: int | None) -> Tensor | None:
    """The terms i <= n only: a term beyond n adds cos * 0, +-0 where its argument is finite, which leaves a partial
    sum unchanged unless it were -0, which none is (0 + t is +0 for t = -0, an exact cancellation rounds to +0),
    and NaN where the argument overflows (:func:`_fourier_scaled` checks the largest).  Block by block (:data:`BLOCK`,
    one per thread at a time), every term's argument, torch's cos over them in place (its vectorised cos, element
    by element whatever the element's place: the same bits as over the whole tensor) and the series; then one pass
    that scales it and takes the waiting gradient into it (``final``)."""
    if x.dtype != torch.float32 or not elementwise.covered(x) or x.numel() == 0:
        return None
    last = min(int(n), int(n) if max_n is None else max_n)
    if last < 0:
        return None
    coefficient = lambda i: np.float32((2 * i + 1) * omega)  # noqa: E731  (a float times x: float32 opmath)
    beyond = coefficient(max_n) if max_n is not None and max_n > last else np.float32(0.0)
    coefficients = np.array([coefficient(i) for i in range(last + 1)], dtype=np.float32)
    series = torch.empty_like(x)
    xs, sums = elementwise.memory_order(x), elementwise.memory_order(series)
    threads = omp.threads_for(xs.size)
    buffer = torch.empty(min(threads * BLOCK, xs.size) * coefficients.size)
    for start in range(0, xs.size, threads * BLOCK):
        full = start + threads * BLOCK <= xs.size  # else the rest, as one block on the calling thread
        blocks, stop = (threads, start + threads * BLOCK) if full else (1, xs.size)
        width = (stop - start) // blocks
        block = buffer[: (stop - start) * coefficients.size]
        cosines = block.numpy().reshape(blocks, coefficients.size, width)
        omp.run(_block_arguments, blocks, omp.Split(xs[start:stop].reshape(blocks, width)), coefficients, omp.Split(cosines), work=block.numel())
        torch.cos(block, out=block)
        omp.run(_block_sums, blocks, omp.Split(cosines), omp.Split(sums[start:stop].reshape(blocks, width)), work=block.numel())
    params = (np.float32(4.0 * omega / math.pi), beyond)
    return elementwise.apply(FOURIER_SCALED, series, x, params=params, out=(series,), final=True)


CHUNK = 512
"""Elements per chunk of the recurrence: its four float32 arrays (8 KB) stay in the first-level cache over the terms."""
RECURRENCE_OMEGA = 1.0
"""The largest omega the recurrence takes: its polynomials hold cos(t) and sin(t) for |t| <= omega (errors below
1 / 18! and 1 / 17!, 3e-15 at omega = 1); a larger omega keeps the blocks of torch's cos."""
_COS_TERMS = np.array([(-1) ** k / math.factorial(2 * k) for k in range(8, -1, -1)], dtype=np.float32)
_SIN_TERMS = np.array([(-1) ** k / math.factorial(2 * k + 1) for k in range(7, -1, -1)], dtype=np.float32)
"""cos's and sin's Taylor coefficients, (-1)^k / (2k)! for k = 8 .. 0 and (-1)^k / (2k + 1)! for k = 7 .. 0."""


@njit(nogil=True, error_model="numpy", fastmath={"contract"}, inline="always", cache=True)
def _taylor(terms: np.ndarray, s: np.float32) -> np.float32:  # pragma: no cover - compiled
    """sum_k terms[k] s^(K - k): Horner's scheme in float32."""
    value = terms[0]
    for k in range(1, terms.size):
        value = value * s + terms[k]
    return value


@njit(nogil=True, error_model="numpy", fastmath={"contract"}, cache=True)
def _recurrence_rows(
    x: np.ndarray, grad: np.ndarray, out: np.ndarray, omega: np.float32, terms: int, scale: np.float32, largest: np.float32
) -> None:  # pragma: no cover - compiled
    """out = scale * sum_{i < terms} cos((2 i + 1) omega x) where |x| <= 1, 0 elsewhere, NaN where ``largest x`` is
    not finite (``largest``: the largest coefficient (2 i + 1) omega the float32 formula evaluates, whose cos(inf) * 0
    is NaN), times ``grad`` where that has x's size (empty: the value alone).  With t = omega x and T_i = cos((2 i + 1) t), T_{i+1} + T_{i-1} = 2 cos(2 t) T_i
    (T_-1 = T_0), kept in Reinsch's form for small t, where 2 cos(2 t) is near 2: the differences D_i = T_i - T_{i-1}
    step as D_{i+1} = D_i - e T_i with e = 2 - 2 cos(2 t) = 4 sin(t)^2, computed from sin(t) with its relative
    precision, and T_{i+1} = T_i + D_{i+1}.  Per chunk, term by term over the chunk (vectorised), the sum beside;
    products and sums contracted into fused multiply-adds (1.6 ns an element less of 4.9 at 10 terms with a gradient,
    2026-12-04, Intel Xeon 6/207, AVX-512, one thread)."""
    current = np.empty(CHUNK, dtype=np.float32)
    step, gap, total = np.empty_like(current), np.empty_like(current), np.empty_like(current)
    one, zero = np.float32(1.0), np.float32(0.0)
    for start in range(0, x.size, CHUNK):
        m = min(CHUNK, x.size - start)
        for j in range(m):
            v = x[start + j]
            t = omega * (zero if abs(v) > one else v)  # outside [-1, 1] the value is 0: no polynomial far out
            s = t * t
            c, sine = _taylor(_COS_TERMS, s), t * _taylor(_SIN_TERMS, s)
            current[j], total[j], gap[j] = c, c, zero
            step[j] = np.float32(4.0) * sine * sine
        for _ in range(1, terms):
            for j in range(m):
                difference = gap[j] - step[j] * current[j]
                following = current[j] + difference
                gap[j], current[j] = difference, following
                total[j] += following
        for j in range(m):
            v = abs(x[start + j])
            value = zero if v > one else scale * total[j]
            value = np.float32(np.nan) if abs(largest * v) == np.float32(np.inf) else value
            out[start + j] = grad[start + j] * value if grad.size else value


def _fourier_recurrence(x: Tensor, omega: float, n: int | Tensor, max_n: int | None = None) -> Tensor | None:
    """:func:`fourier_sign_derivative` by the cosines' three-term recurrence (:func:`_recurrence_rows`): one cosine
    pair by polynomial per element and two multiply-adds per term, all in cache, where the blocks evaluate n + 1 of
    torch's cosines per element, with the waiting gradient multiplied in (:func:`bnnbench.elementwise.multiplying`).
    Within float32's rounding of the series, as near the float64 value as torch's formula, not bit for bit it (the
    fused fp32 formulas); None where it does not take x (not a covered float32 tensor, omega above
    :data:`RECURRENCE_OMEGA`)."""
    if x.dtype != torch.float32 or not elementwise.covered(x) or x.numel() == 0 or not 0 < omega <= RECURRENCE_OMEGA:
        return None
    terms = int(n) + 1
    if terms < 1:
        return None
    largest = np.float32((2 * max(terms - 1, -1 if max_n is None else max_n) + 1) * omega)  # as _fourier_float32's
    out = torch.empty_like(x)
    waiting = elementwise.waiting_product(x, out)
    xs, values = elementwise.memory_order(x), elementwise.memory_order(out)
    grad = elementwise.memory_order(waiting[0]) if waiting is not None else np.empty(0, dtype=np.float32)
    split = [omp.Split(a) for a in (xs, grad, values)] if waiting is not None else [omp.Split(xs), grad, omp.Split(values)]
    omp.run(_recurrence_rows, xs.size, *split, np.float32(omega), terms, np.float32(4.0 * omega / math.pi), largest, grain=CHUNK)
    return out if waiting is None else waiting[1].finish(out)


@register_method("fda")
@dataclass
class FDA(Method):
    """Sign forward, truncated-Fourier-series derivative backward, n growing with p."""

    omega: float = 0.1
    n_start: int = 9
    n_growth: int = 9

    positive = ("omega",)

    paper = "Xu et al., Learning Frequency Domain Approximation for Binary Neural Networks, NeurIPS 2021"
    weight_forward = "mean|w_c| sign(w) (scale detached)"
    weight_backward = "(4 omega/pi) sum_{i<=n} cos((2i+1) omega w) 1{|w|<=1}, omega=0.1, n = 9 + floor(9p)"
    activation_backward = "same Fourier series as the weights"
    scale = "mean_abs_channel"
    takes_fp32_formulas = True  # the series by the cosines' recurrence with formulas(fp32="fused")

    @schedule
    def n_terms(self, progress: Progress) -> int | Tensor:
        """n(p) = n_start + floor(n_growth p): the last index of the series (an int for a float progress)."""
        n = self.n_start + torch.floor(as_progress(progress) * self.n_growth)
        return n if isinstance(progress, Tensor) else int(n)

    def derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return fourier_sign_derivative(x, self.omega, self.n_terms(progress), self.n_start + self.n_growth)

    def weight_scale(self, w: Tensor) -> Tensor:
        return mean_abs(w, per_output_dims(w)).detach()

    def weight_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return self.derivative(x, progress)

    def activation_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        return self.derivative(x, progress)

    def schedule(self, progress: Progress) -> dict[str, float]:
        return {"n": float(self.n_terms(progress))}
