"""Binary convs chained in bits: the sign epilogue against torch, every micro-kernel; packing and the peak loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnnbench.kernels import MICRO_KERNELS, measure_peak, pack_channels, pack_weights, padded_filters
from bnnbench.kernels.fused import BitActivation, SignConv, rows_of


def reference(x: torch.Tensor, w: torch.Tensor, stride: int, scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor | None):
    """z = conv(sign x, w) * scale + shift (+ residual), each step rounded once, as the epilogue's FMAs do."""
    conv = F.conv2d(torch.where(x >= 0, 1.0, -1.0), w, stride=stride, padding=1).double()
    z = (conv * scale.view(1, -1, 1, 1).double() + shift.view(1, -1, 1, 1).double()).float()
    return z if residual is None else z + residual


# (batch, in, out, size, stride): one word, several words, channel counts that pad the filters, stride 2
SHAPES = [(2, 64, 64, 6, 1), (1, 70, 40, 7, 2), (3, 130, 96, 5, 1), (1, 16, 16, 8, 2)]


@pytest.mark.parametrize("micro_kernel", list(MICRO_KERNELS))
@pytest.mark.parametrize("batch,cin,cout,size,stride", SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_sign_conv_emits_hardtanh_values_and_packed_signs(micro_kernel, batch, cin, cout, size, stride, with_residual):
    g = torch.Generator().manual_seed(cin + cout + stride)
    x = torch.randn(batch, cin, size, size, generator=g)
    w = torch.randn(cout, cin, 3, 3, generator=g).sign()
    scale, shift = 0.05 * torch.rand(cout, generator=g) + 0.01, torch.randn(cout, generator=g)
    out_size = (size - 1) // stride + 1
    residual = torch.randn(batch, cout, out_size, out_size, generator=g) if with_residual else None
    conv = SignConv(pack_weights(w), stride, 1, scale.double().numpy(), shift.double().numpy(), MICRO_KERNELS[micro_kernel])
    rows = None if residual is None else rows_of(residual, padded_filters(cout))
    out = conv(BitActivation.from_tensor(x, 1), rows, next_padding=1)
    z = reference(x, w, stride, scale, shift, residual)
    assert out.shape == (batch, cout, out_size, out_size) and out.padding == 1
    torch.testing.assert_close(out.tensor(), z.clamp(-1, 1), atol=2e-6, rtol=0)
    clear = z.abs() > 1e-5  # signs of values within rounding of 0 may differ
    got_signs = torch.from_numpy(np.unpackbits(out.bits.view(np.uint8), axis=-1, bitorder="little").astype(np.int64))
    expected_bits = pack_channels(z.numpy(), 1)
    expected_signs = torch.from_numpy(np.unpackbits(expected_bits.view(np.uint8), axis=-1, bitorder="little").astype(np.int64))
    assert got_signs.shape == expected_signs.shape
    inner = got_signs[:, 1:-1, 1:-1, :cout].permute(0, 3, 1, 2)
    assert torch.equal(inner[clear], expected_signs[:, 1:-1, 1:-1, :cout].permute(0, 3, 1, 2)[clear])
    assert got_signs[:, :, :, cout:].sum() == 0  # unused channel bits stay 0
    border = got_signs.clone()
    border[:, 1:-1, 1:-1] = 0
    assert border.sum() == 0  # the next conv's padding holds +1


def test_chained_convs_equal_two_separate_convs():
    """conv -> BN -> hardtanh -> conv in bits equals the same through F.conv2d."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 64, 8, 8, generator=g)
    w1, w2 = torch.randn(96, 64, 3, 3, generator=g).sign(), torch.randn(64, 96, 3, 3, generator=g).sign()
    scale, shift = torch.full((96,), 0.03), torch.randn(96, generator=g)
    first = SignConv(pack_weights(w1), 2, 1, scale.double().numpy(), shift.double().numpy())
    second = SignConv(pack_weights(w2), 1, 1, np.ones(64), np.zeros(64))
    hidden = first(BitActivation.from_tensor(x, 1), None, 1)
    out = second(hidden, None, 0)
    z = reference(x, w1, 2, scale, shift, None)
    expected = F.conv2d(torch.where(z >= 0, 1.0, -1.0), w2, padding=1).clamp(-1, 1)
    assert torch.equal(out.tensor(), expected)
    with pytest.raises(ValueError, match="packed with padding 1"):
        second(out, None, 1)  # out is packed for padding 0


def test_nchw_and_channels_last_packing_agree_on_zeros_and_nan():
    """Both packers (plane loop and 16-wide compares) binarise alike: -0.0 and 0 are +1, NaN is -1, tails of C % 16 too."""
    g = torch.Generator().manual_seed(3)
    for channels in (1, 16, 17, 70, 128):
        x = torch.randn(2, channels, 5, 6, generator=g)
        x[0, 0, 0, 0], x[0, -1, 1, 1], x[1, channels // 2, 2, 2] = 0.0, -0.0, float("nan")
        nchw = pack_channels(x.numpy(), 1)
        channels_last = pack_channels(x.contiguous(memory_format=torch.channels_last).numpy(), 1)
        assert np.array_equal(nchw, channels_last)
        bits = np.unpackbits(nchw.view(np.uint8), axis=-1, bitorder="little")[:, 1:-1, 1:-1, :channels]
        expected = ~(x.permute(0, 2, 3, 1).numpy() >= 0)
        assert np.array_equal(bits.astype(bool), expected)


def test_peak_measurement_names_its_fastest_loop():
    peak = measure_peak(seconds=0.05)
    assert set(peak.rates) == {"scalar", "vector", "mixed", "peak"}
    assert peak.rates["peak"] == max(peak.rates[k] for k in ("scalar", "vector", "mixed")) > 0
    assert peak.fastest.ops_per_call == 128 * peak.fastest.repeats * (8 * peak.fastest.vector_chains + peak.fastest.scalar_chains)
    assert isinstance(peak.fastest.call()(), int)
