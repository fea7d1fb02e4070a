"""Closed forms of BiPer's quantization analysis (Sec. 4.1 of the paper, Eq. 13-18).

Model: the latent weights follow a zero-mean Laplace law, ``W ~ La(0, b)`` with
density ``exp(-|w|/b) / (2b)`` (the paper prints ``exp(|w|/b) / b``, a typo), and
BiPer's pre-sign weight is ``W_hat = sin(w0 W)``.  Everything depends on the
product ``u = w0 b`` only, because ``w0 W ~ La(0, u)``.

Results (u = w0 b):

* pdf of ``W_hat`` (Eq. 14, corrected)::

      f(x) = [exp(-|a|/u) + 2 cosh(a/u) / (exp(pi/u) - 1)] / (2 u sqrt(1 - x^2)),
      a = arcsin(x),  -1 < x < 1.

  The printed Eq. 14 lacks the factor 2 on the cosh term (the images of
  ``k != 0`` in Eq. 13 pair up as ``k`` and ``-k``); as printed it integrates to
  ``1 - exp(-pi/(2u))/2`` instead of 1.

* optimal scale (Eq. 18, corrected)::

      gamma* = E|sin(w0 W)| = u/(1 + u^2) * coth(pi/(2u))

  The printed Eq. 18 has a misplaced bracket in the denominator; the intended
  ``u (e^{pi/u} + 1) / ((u^2 + 1)(e^{pi/u} - 1))`` equals the form above.

* quantization error (Eq. 15-17 with gamma = gamma*)::

      QE(u) = E[sin^2(w0 W)] - gamma*^2
            = 2u^2/(1 + 4u^2) - u^2 coth^2(pi/(2u)) / (1 + u^2)^2

  The printed Eq. 17 drops the brackets around ``((w0 b)^2 + 1)(e^{pi/w0 b} - 1)``.
  QE ~ u^2 as u -> 0, QE -> 1/2 - 4/pi^2 as u -> inf, and the maximum
  0.102834609 lies at u = 0.954882471 (:func:`qe_peak`).

All functions take numpy arrays (or scalars, returning floats) and broadcast.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import brentq

QE_LIMIT = 0.5 - 4.0 / np.pi**2
"""lim_{u -> inf} QE(u) = 1/2 - 4/pi^2 (the arcsine law of sin of a uniform phase)."""

GAMMA_LIMIT = 2.0 / np.pi
"""lim_{u -> inf} gamma*(u) = E|sin| under a uniform phase."""


def _nonnegative(u: ArrayLike, name: str = "u") -> np.ndarray:
    arr = np.asarray(u, dtype=float)
    if np.any(arr < 0):
        raise ValueError(f"{name} = w0 * b must be >= 0 (b is a Laplace scale, w0 a frequency), got {u!r}")
    return arr


def _like_input(result: np.ndarray, *inputs: ArrayLike) -> np.ndarray | float:
    """A float when every input was a scalar, else the array."""
    return float(result) if all(np.ndim(x) == 0 for x in inputs) else result


def _coth(x: np.ndarray) -> np.ndarray:
    """coth(x) for x >= 0: 1 for large x (tanh saturates, no overflow), inf at 0."""
    with np.errstate(divide="ignore"):
        return 1.0 / np.tanh(x)


def gamma_laplace(u: ArrayLike) -> np.ndarray | float:
    """Optimal scale gamma* = E|sin(w0 W)| for W ~ La(0, b), u = w0 b (Eq. 18, corrected).

    ``gamma* = u/(1 + u^2) * coth(x)``, ``x = pi/(2u)``, evaluated without
    overflow as ``coth(x) / (u + 1/u)`` for u <= 1 (coth(x) -> 1) and as
    ``(2/pi) (x / tanh(x)) / (1 + u^-2)`` for u > 1 (x / tanh(x) -> 1);
    gamma*(0) = 0 and gamma*(inf) = 2/pi.
    """
    arr = _nonnegative(u)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        x = (np.pi / 2.0) / arr
        small_u = _coth(x) / (arr + 1.0 / arr)
        large_u = GAMMA_LIMIT * (x / np.tanh(x)) / (1.0 + arr**-2.0)
    gamma = np.where(arr <= 1.0, small_u, large_u)
    gamma = np.where(np.isposinf(arr), GAMMA_LIMIT, gamma)
    return _like_input(gamma, u)


def second_moment_laplace(u: ArrayLike) -> np.ndarray | float:
    """E[sin^2(w0 W)] = 2u^2/(1 + 4u^2) for W ~ La(0, b), u = w0 b (first term of Eq. 17).

    Evaluated as ``2/(4 + u^-2)``: exact at u = 0 and u = inf, no overflow.
    """
    arr = _nonnegative(u)
    with np.errstate(divide="ignore", over="ignore"):
        return _like_input(2.0 / (4.0 + arr**-2.0), u)


def qe_laplace(u: ArrayLike) -> np.ndarray | float:
    """Quantization error of BiPer for Laplace weights, u = w0 b (Eq. 15-17, corrected).

    ``QE(u) = 2u^2/(1 + 4u^2) - u^2 coth^2(pi/(2u)) / (1 + u^2)^2``, the mean of
    ``(sin(w0 w) - gamma* sign(sin(w0 w)))^2`` with the optimal ``gamma*`` of Eq. 18.
    Stable from u = 0 (QE = 0, QE ~ u^2) to u = inf (QE = 1/2 - 4/pi^2).
    """
    arr = _nonnegative(u)
    qe = np.asarray(second_moment_laplace(arr)) - np.asarray(gamma_laplace(arr)) ** 2
    qe = np.where(np.isposinf(arr), QE_LIMIT, qe)
    return _like_input(qe, u)


def _qe_laplace_derivative(u: float) -> float:
    """dQE/du for moderate u (0 < u < 1e3), used to locate the maximum.

    dQE/du = 4u/(1 + 4u^2)^2 - 2 gamma* dgamma*/du, with
    dgamma*/du = coth(x)(1 - u^2)/(1 + u^2)^2 + pi csch^2(x) / (2u(1 + u^2)), x = pi/(2u).
    """
    x = np.pi / (2.0 * u)
    csch2 = 1.0 / np.sinh(x) ** 2
    dgamma = _coth(x) * (1.0 - u * u) / (1.0 + u * u) ** 2 + np.pi * csch2 / (2.0 * u * (1.0 + u * u))
    return float(4.0 * u / (1.0 + 4.0 * u * u) ** 2 - 2.0 * float(gamma_laplace(u)) * dgamma)


def qe_peak() -> tuple[float, float]:
    """(u*, QE(u*)): the maximum of :func:`qe_laplace`, ~ (0.954882471, 0.102834609).

    Found as the root of the analytic derivative (brentq, xtol 1e-15), which is
    well conditioned, unlike maximising the flat QE curve itself.
    """
    u_star = brentq(_qe_laplace_derivative, 0.5, 2.0, xtol=1e-15, rtol=4 * np.finfo(float).eps)
    return float(u_star), float(qe_laplace(u_star))


def pdf_sin_laplace(x: ArrayLike, b: ArrayLike, w0: ArrayLike = 1.0) -> np.ndarray | float:
    """Density of ``W_hat = sin(w0 W)`` for ``W ~ La(0, b)`` (Eq. 14, corrected).

    ``f(x) = [exp(-|a|/u) + 2 cosh(a/u)/(exp(pi/u) - 1)] / (2u sqrt(1 - x^2))``
    with ``a = arcsin(x)`` and ``u = w0 b`` (the printed Eq. 14 lacks the 2).
    The sum over the images ``k != 0`` is evaluated as
    ``(exp((|a| - pi)/u) + exp(-(|a| + pi)/u)) / (1 - exp(-pi/u))`` so that no
    exponent is positive.  Zero outside [-1, 1]; infinite (integrable) at +-1.
    """
    xs = np.asarray(x, dtype=float)
    u = np.asarray(_nonnegative(np.asarray(b, dtype=float) * np.asarray(w0, dtype=float), "w0 * b"))
    if np.any(u == 0):
        raise ValueError("pdf_sin_laplace needs w0 * b > 0 (at 0 the law of sin(w0 W) is a point mass at 0)")
    inside = np.abs(xs) <= 1.0
    a = np.abs(np.arcsin(np.clip(xs, -1.0, 1.0)))
    images = (np.exp((a - np.pi) / u) + np.exp(-(a + np.pi) / u)) / -np.expm1(-np.pi / u)
    with np.errstate(divide="ignore"):
        density = (np.exp(-a / u) + images) / (2.0 * u * np.sqrt(1.0 - np.clip(xs, -1.0, 1.0) ** 2))
    return _like_input(np.where(inside, density, 0.0), x, b, w0)


__all__ = [
    "GAMMA_LIMIT",
    "QE_LIMIT",
    "gamma_laplace",
    "pdf_sin_laplace",
    "qe_laplace",
    "qe_peak",
    "second_moment_laplace",
]
