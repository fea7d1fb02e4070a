"""bnnbench.act_norm reproduces torch's CPU sum over a contiguous row in its order and precision: float32 and
bfloat16 rows of every length up to beyond the cascade's first levels, on values whose float32 sum depends on
the order (+-2^k pairs among ones, and wide-range normals), and x.mean of a bfloat16 row (a float32 copy summed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnnbench import act_norm


def _rows(size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    pairs = np.full(size, 2.0 ** int(rng.integers(-3, 3)), dtype=np.float32)
    for _ in range(int(rng.integers(1, 4))):
        p, q = rng.integers(0, size, 2)
        b = 2.0 ** int(rng.integers(8, 30))
        pairs[p], pairs[q] = b, -b
    normals = (rng.standard_normal(size) * 2.0 ** rng.integers(-8, 14, size)).astype(np.float32)
    return [pairs, normals]


SIZES = [*range(1, 160), 255, 256, 257, 1023, 1024, 1025, 4095, 4097, 16383, 16385, 70001, 1 << 18, (1 << 20) + 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_row_sum_is_torch_sum_bit_for_bit(dtype):
    lanes = act_norm.vector_lanes()
    assert lanes is not None  # the kernel must cover the CPU the suite runs on
    fold = 2 if dtype == torch.bfloat16 else 1
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for seed, size in enumerate(SIZES):
        for row in _rows(size, seed):
            t = torch.from_numpy(row).to(dtype)
            values = t.float().numpy()
            got = torch.tensor(act_norm.row_sum(values, lanes, fold)).to(dtype)
            assert got.view(bits) == t.sum().view(bits), (size, float(got), float(t.sum()))
            mean = torch.tensor(np.float32(act_norm.row_sum(values, lanes, 1)) / np.float32(size)).to(dtype)
            assert mean.view(bits) == t.mean().view(bits), size


def test_an_all_negative_zero_row_sums_to_positive_zero_as_torch_stores_it():
    lanes = act_norm.vector_lanes()
    for size in (3, 40):
        got = act_norm.row_sum(np.full(size, -0.0, dtype=np.float32), lanes, 1)
        assert not np.signbit(got) and not torch.full((size,), -0.0).sum().signbit().item()
