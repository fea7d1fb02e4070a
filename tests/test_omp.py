"""bnnbench.omp runs numba kernels on torch's own OpenMP threads, and the kernels give the same bits on any count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numba import njit

import bnnbench.elementwise as elementwise
import bnnbench.functional as functional
from bnnbench import act_norm, omp

needs_pool = pytest.mark.skipif(not omp.available(), reason="torch runs no libgomp pool in this process")


@njit(nogil=True)
def _local_index(out):
    for i in range(out.size):
        out[i] = i


@njit(nogil=True)
def _every_kind(rows, per_row, table, params, scale, wide, flag, small, out):
    for r in range(rows.shape[0]):
        for i in range(rows.shape[1]):
            value = rows[r, i] * scale + per_row[r] + table[i % table.size] * params[0] + np.float32(wide)
            out[r, i] = value + params[1] if flag else value - np.float32(small)


@needs_pool
def test_run_gives_each_thread_a_contiguous_range_of_whole_grains(threads):
    threads(3)
    out = np.full(10_000, -1, dtype=np.int64)
    omp.run(_local_index, out.size, omp.Split(out), grain=512)
    starts = np.flatnonzero(out == 0)  # each thread's range is indexed from 0
    assert starts.tolist() == [0, 3584, 7168]  # ceil(10000 / 3) = 3334 rounded up to whole grains of 512
    assert (np.diff(out[starts[1] - 1 : starts[1] + 1]) < 0).all() and (out >= 0).all()
    threads(1)
    omp.run(_local_index, out.size, omp.Split(out), grain=512)
    assert np.array_equal(out, np.arange(out.size))


@needs_pool
def test_run_rebuilds_every_kind_of_argument_on_each_thread(threads):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((37, 50)).astype(np.float32)
    args = (rng.standard_normal(37).astype(np.float32), rng.standard_normal(7).astype(np.float32), (np.float32(0.5), np.float32(-2.0)))
    expected = np.empty_like(rows)
    _every_kind(rows, *args, np.float32(3.0), 0.1, True, np.uint16(3), expected)
    for flag, count in ((True, 2), (False, 4)):
        if not flag:
            _every_kind(rows, *args, np.float32(3.0), 0.1, False, np.uint16(3), expected)
        threads(count)
        out = np.zeros_like(rows)
        split = (omp.Split(rows), omp.Split(args[0]))
        omp.run(_every_kind, rows.shape[0], *split, *args[1:], np.float32(3.0), 0.1, flag, np.uint16(3), omp.Split(out))
        assert np.array_equal(out, expected)


def test_run_refuses_a_split_array_the_items_do_not_divide(threads):
    threads(2)
    with pytest.raises(ValueError, match="no multiple of the items"):
        omp.run(_local_index, 3, omp.Split(np.zeros(10, dtype=np.int64)))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32) if t.dtype in (torch.bfloat16, torch.float32) else t


def _kernel_results(dtype: torch.dtype) -> list[torch.Tensor]:
    """Every kernel bnnbench.omp splits, on odd sizes (threads' ranges ending mid-row, a tail byte of signs)."""
    generator = torch.Generator().manual_seed(3)
    x = (2 * torch.randn(6, 5, 13, 17, generator=generator)).to(dtype)
    grad = torch.randn(x.shape, generator=generator).to(dtype)
    flat = x.view(-1)[:-3]  # 6627 elements: packed signs end in a partial byte
    shift = torch.randn(5, 1, 1, generator=generator).to(dtype)
    y = torch.randint(-200, 200, x.shape, generator=generator).to(dtype)
    y.view(-1)[::97] = -0.0  # exceptions of y * alpha in both dtypes (recovered as +0)
    alpha = torch.rand(5, 1, 1, generator=generator).to(dtype)
    scaled, indices, values = elementwise.scale_channels(y, alpha)
    root = torch.sqrt(elementwise.per_sample_variance(x) + 1e-5)
    signs = functional.sign(flat)
    results = [
        functional.sign(x),
        functional.approx_sign_derivative(x),
        elementwise.unpack_signs(elementwise.pack_signs(signs), signs.shape, signs.stride(), dtype),
        elementwise.pack_signs(signs),
        *functional._shifted(elementwise.SHIFTED_APPROX_SIGN_GRAD, x, shift, (grad,)),
        elementwise.per_sample_variance(x),
        *act_norm.backward(x, root, grad, functional._FORMULAS[functional.approx_sign_derivative]),
        *act_norm.backward(x, root, grad, functional.approx_sign_derivative(x / root)),
        scaled,
        indices,
        values,
        *elementwise.scale_channels_backward(scaled, alpha, indices, values, grad),
    ]
    if dtype == torch.bfloat16:
        results.append(elementwise.look_up(elementwise.bf16_table(torch.tanh), x))
    return results


@needs_pool
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernels_give_the_same_bits_on_every_thread_count(threads, dtype):
    """One thread's results are torch's (tests/test_elementwise.py, test_act_norm.py, test_fast_path.py); 2, 3
    and 5 threads give the same bits, the bfloat16 exceptions of y * alpha included."""
    threads(1)
    expected = _kernel_results(dtype)
    assert expected[-4 if dtype == torch.bfloat16 else -3].numel() > 0  # y * alpha has exceptions to patch
    for count in (2, 3, 5):
        threads(count)
        for got, want in zip(_kernel_results(dtype), expected, strict=True):
            assert got.dtype == want.dtype and torch.equal(_bits(got), _bits(want)), count
