"""Closed forms of BiPer's QE analysis (Eq. 13-18) against quadrature, Monte Carlo and the paper's numbers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.optimize import minimize_scalar

from bnnbench.theory import (
    GAMMA_LIMIT,
    QE_LIMIT,
    gamma_laplace,
    pdf_sin_laplace,
    qe_laplace,
    qe_peak,
    second_moment_laplace,
)

# (w0, b) pairs: u = w0 b from 0.3 to 3, including the paper's w0 = 20 and w0 = 30
CASES = [(1.0, 0.3), (1.0, 1.0), (20.0, 0.05), (5.0, 0.4), (30.0, 0.1)]


def half_line_integral(integrand, w0: float, b: float) -> float:
    """int_0^inf of integrand(w), split at the kinks k pi / w0 of |sin(w0 w)|, up to where e^{-w/b} < 1e-17."""
    stop = 40.0 * b
    edges = np.append(np.arange(0.0, stop, np.pi / w0), stop)
    return sum(quad(integrand, lo, hi, epsabs=1e-14, epsrel=1e-12)[0] for lo, hi in zip(edges[:-1], edges[1:]))


def qe_eq16(gamma: float, w0: float, b: float) -> float:
    """Eq. 16: int_0^inf (1/b) e^{-w/b} (|sin(w0 w)| - gamma)^2 dw."""
    return half_line_integral(lambda w: np.exp(-w / b) / b * (abs(np.sin(w0 * w)) - gamma) ** 2, w0, b)


def qe_eq15(gamma: float, w0: float, b: float) -> float:
    """Eq. 15 on the whole line with the Laplace density e^{-|w|/b} / (2b)."""

    def integrand(w: float) -> float:
        s = np.sin(w0 * w)
        return np.exp(-abs(w) / b) / (2 * b) * (s - gamma * (1.0 if s >= 0 else -1.0)) ** 2

    return half_line_integral(integrand, w0, b) + half_line_integral(lambda w: integrand(-w), w0, b)


@pytest.mark.parametrize("w0,b", CASES)
def test_gamma_is_mean_abs_sine_and_minimises_eq16(w0, b):
    mean_abs = half_line_integral(lambda w: np.exp(-w / b) / b * abs(np.sin(w0 * w)), w0, b)
    assert gamma_laplace(w0 * b) == pytest.approx(mean_abs, rel=1e-9)
    best = minimize_scalar(lambda g: qe_eq16(g, w0, b), bounds=(0.0, 1.0), method="bounded", options={"xatol": 1e-10})
    assert best.x == pytest.approx(gamma_laplace(w0 * b), abs=1e-6)


@pytest.mark.parametrize("w0,b", CASES)
def test_qe_closed_form_matches_eq15_and_eq16(w0, b):
    gamma = gamma_laplace(w0 * b)
    assert qe_laplace(w0 * b) == pytest.approx(qe_eq16(gamma, w0, b), rel=1e-8, abs=1e-13)
    assert qe_laplace(w0 * b) == pytest.approx(qe_eq15(gamma, w0, b), rel=1e-8, abs=1e-13)
    second = half_line_integral(lambda w: np.exp(-w / b) / b * np.sin(w0 * w) ** 2, w0, b)
    assert second_moment_laplace(w0 * b) == pytest.approx(second, rel=1e-9)


@pytest.mark.parametrize("w0,b", [(1.0, 0.5), (20.0, 0.05), (30.0, 0.1)])
def test_gamma_and_qe_match_monte_carlo(w0, b):
    n = 400_000
    w_hat = np.sin(w0 * np.random.default_rng(1234).laplace(0.0, b, n))
    mag = np.abs(w_hat)
    gamma_mc = mag.mean()
    sq_residual = (w_hat - gamma_mc * np.where(w_hat >= 0, 1.0, -1.0)) ** 2
    # five standard errors of the sample means
    assert abs(gamma_mc - gamma_laplace(w0 * b)) < 5 * mag.std() / np.sqrt(n)
    assert abs(sq_residual.mean() - qe_laplace(w0 * b)) < 5 * sq_residual.std() / np.sqrt(n)


def test_qe_maximum_from_the_paper():
    u_star, qe_max = qe_peak()
    assert u_star == pytest.approx(0.954882471, abs=1e-8)
    assert qe_max == pytest.approx(0.102834609, abs=1e-8)
    # an independent search on QE itself (flat at the top: its argmin is only good to ~1e-7)
    found = minimize_scalar(lambda u: -qe_laplace(u), bounds=(0.1, 5.0), method="bounded", options={"xatol": 1e-10})
    assert found.x == pytest.approx(u_star, abs=1e-6)
    assert -found.fun == pytest.approx(qe_max, abs=1e-13)
    grid = np.linspace(0.01, 50.0, 20_001)
    assert np.max(qe_laplace(grid)) <= qe_max


def test_qe_limit_for_large_u():
    assert QE_LIMIT == pytest.approx(0.0947152654, abs=1e-10)
    assert qe_laplace(1e4) == pytest.approx(QE_LIMIT, abs=1e-9)
    assert qe_laplace(np.inf) == QE_LIMIT
    assert gamma_laplace(1e8) == pytest.approx(2 / np.pi, rel=1e-12)
    assert gamma_laplace(np.inf) == GAMMA_LIMIT


@pytest.mark.parametrize("u", [1e-2, 1e-3, 1e-5, 1e-8, 1e-100])
def test_qe_is_u_squared_for_small_u(u):
    # once coth(pi / 2u) = 1 in double precision: QE / u^2 = 2/(1 + 4u^2) - 1/(1 + u^2)^2 = 1 - 6u^2 + 29u^4 - ...
    ratio = qe_laplace(u) / u**2
    assert ratio == pytest.approx(2.0 / (1.0 + 4.0 * u**2) - 1.0 / (1.0 + u**2) ** 2, rel=1e-12)
    assert abs(ratio - 1.0) <= 6.0 * u**2 + 1e-14


@pytest.mark.filterwarnings("error")
def test_extreme_arguments_are_finite_and_warning_free():
    u = np.array([0.0, 5e-324, 1e-300, 1e-150, 1e150, 1e300, 1.7e308, np.inf])
    gamma, qe = gamma_laplace(u), qe_laplace(u)
    assert np.all(np.isfinite(gamma)) and np.all(np.isfinite(qe))
    assert gamma[0] == 0.0 and qe[0] == 0.0
    np.testing.assert_allclose(gamma[-4:], GAMMA_LIMIT, rtol=1e-12)
    np.testing.assert_allclose(qe[-4:], QE_LIMIT, rtol=1e-12)
    assert np.all(qe >= 0)


def test_scalars_in_floats_out_arrays_keep_shape():
    assert isinstance(qe_laplace(1.0), float) and isinstance(gamma_laplace(2), float)
    assert qe_laplace(np.ones((2, 3))).shape == (2, 3)
    assert pdf_sin_laplace(np.zeros(4), np.array([[0.5], [1.0]])).shape == (2, 4)
    with pytest.raises(ValueError, match="w0 \\* b must be >= 0"):
        qe_laplace(-1.0)
    with pytest.raises(ValueError, match="point mass"):
        pdf_sin_laplace(0.1, 0.0)


@pytest.mark.parametrize("b,w0", [(0.05, 1.0), (0.5, 1.0), (1.0, 1.0), (4.0, 1.0), (0.05, 20.0), (1e4, 1.0)])
def test_pdf_normalises(b, w0):
    total = quad(lambda x: pdf_sin_laplace(x, b, w0), -1.0, 1.0, points=[0.0], limit=400, epsabs=1e-11)[0]
    assert total == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("x", [-0.9, -0.3, 0.0, 0.2, 0.75])
@pytest.mark.parametrize("u", [0.2, 1.0, 3.0])
def test_pdf_equals_the_image_sum_of_eq13(x, u):
    k = np.arange(-400, 401)
    images = np.exp(-np.abs((-1.0) ** k * np.arcsin(x) + np.pi * k) / u).sum()
    eq13 = images / (2 * u * np.sqrt(1 - x * x))
    assert pdf_sin_laplace(x, u) == pytest.approx(eq13, rel=1e-12)
    assert pdf_sin_laplace(x, u / 4.0, w0=4.0) == pytest.approx(eq13, rel=1e-12)  # depends on w0 b only


def test_pdf_support():
    assert pdf_sin_laplace(1.5, 1.0) == 0.0 and pdf_sin_laplace(-1.0001, 1.0) == 0.0
    assert np.isinf(pdf_sin_laplace(1.0, 1.0))


@pytest.mark.parametrize("b,w0", [(0.3, 1.0), (2.0, 1.0), (0.05, 20.0)])
def test_pdf_matches_monte_carlo_histogram(b, w0):
    n = 400_000
    samples = np.sin(w0 * np.random.default_rng(99).laplace(0.0, b, n))
    edges = np.linspace(-1.0, 1.0, 41)
    counts, _ = np.histogram(samples, bins=edges)
    p_hat = counts / n
    p = np.array([quad(lambda x: pdf_sin_laplace(x, b, w0), lo, hi)[0] for lo, hi in zip(edges[:-1], edges[1:])])
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(p_hat - p) < 5 * se + 1e-12), np.max(np.abs(p_hat - p) / se)
