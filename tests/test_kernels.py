"""Bit-packed XNOR-popcount convolution: exact against F.conv2d of the same +-1 tensors."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numba import njit

from bnnbench.functional import sign
from bnnbench.kernels import (
    MICRO_KERNELS,
    SELECTED,
    PackedWeights,
    binary_conv2d,
    binary_conv2d_packed,
    border_correction,
    output_size,
    pack_channels,
    pack_weights,
    padded_filters,
    popcount,
    popcount_isa,
    select_micro_kernel,
    unpack_weights,
)
from bnnbench.kernels.packing import in_memory_order, pack_into, packed_shape, runs_per_image
from bnnbench.kernels.buffers import aligned_empty, aligned_zeros, is_aligned, l2_bytes, stream_threshold, streams
from bnnbench.kernels.isa import AVX2, AVX512_VPOPCNTDQ, GENERIC


def pm1(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).sign()


# (batch, in, out, height, width, kernel, stride, padding): 3x3 and 1x1, strides 1 and 2, zero padding,
# odd and multi-word channel counts, filter counts that are not a multiple of the 8-filter panel,
# row counts that are not a multiple of the 4-row block, ResNet shapes.
CASES = [
    (1, 1, 1, 3, 3, 3, 1, 1),
    (2, 3, 5, 7, 6, 3, 1, 1),
    (1, 65, 7, 9, 9, 3, 2, 1),
    (3, 130, 9, 5, 8, 1, 1, 0),
    (2, 70, 6, 6, 6, 1, 2, 0),
    (1, 200, 13, 11, 10, 3, 2, 0),
    (2, 64, 64, 8, 8, 3, 1, 1),
    (2, 128, 128, 7, 7, 3, 2, 1),
    (1, 64, 17, 1, 1, 3, 1, 1),
    (1, 256, 24, 5, 5, 3, 1, 2),
]


@pytest.mark.parametrize("batch,cin,cout,height,width,kernel,stride,padding", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("micro_kernel", list(MICRO_KERNELS))
def test_binary_conv2d_equals_float_conv(batch, cin, cout, height, width, kernel, stride, padding, channels_last, micro_kernel):
    """Every micro-kernel, selected on this CPU or not, is exact."""
    g = torch.Generator().manual_seed(cin * 1000 + cout)
    x, w = pm1(batch, cin, height, width, generator=g), pm1(cout, cin, kernel, kernel, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = F.conv2d(x, w, stride=stride, padding=padding)
    got = binary_conv2d(x, w, stride=stride, padding=padding, kernel=MICRO_KERNELS[micro_kernel])
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("micro_kernel", list(MICRO_KERNELS))
@pytest.mark.parametrize("batch,cin,cout,height,width,kernel,stride,padding", CASES[1::2])
def test_streaming_stores_are_exact(monkeypatch, micro_kernel, batch, cin, cout, height, width, kernel, stride, padding):
    """With every output streamed past the caches (threshold 0), the GEMM still writes exactly F.conv2d."""
    monkeypatch.setenv("BNNBENCH_STREAM_BYTES", "0")
    g = torch.Generator().manual_seed(cin * 7 + cout)
    x, w = pm1(batch, cin, height, width, generator=g), pm1(cout, cin, kernel, kernel, generator=g)
    packed = pack_weights(w)
    out = aligned_empty((batch * output_size(height, kernel, stride, padding) * output_size(width, kernel, stride, padding), padded_filters(cout)), np.float32)
    assert streams(out)
    got = binary_conv2d_packed(x, packed, stride=stride, padding=padding, kernel=MICRO_KERNELS[micro_kernel])
    assert torch.equal(got, F.conv2d(x, w, stride=stride, padding=padding))


def test_buffers_are_cache_line_aligned_and_large_outputs_stream(monkeypatch):
    """Filter panels and outputs start on 64-byte lines; only aligned outputs above the threshold stream."""
    monkeypatch.delenv("BNNBENCH_STREAM_BYTES", raising=False)
    for shape, dtype in [((3, 5), np.float32), ((1, 1, 1, 1), np.uint64), ((7,), np.uint8)]:
        for _ in range(8):  # numpy's own alignment is 16 bytes: several tries would hit a misaligned start
            a = aligned_empty(shape, dtype)
            assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and is_aligned(a)
    assert not aligned_zeros((4, 9), np.uint64).any()
    g = torch.Generator().manual_seed(3)
    for kernel in MICRO_KERNELS.values():
        assert is_aligned(pack_weights(pm1(40, 70, 3, 3, generator=g)).panels(kernel))
    large = aligned_empty((stream_threshold() // 4 + 16,), np.float32)
    assert streams(large) and not streams(aligned_empty((16,), np.float32))
    assert is_aligned(binary_conv2d_packed(torch.randn(2, 70, 5, 5, generator=g), pack_weights(pm1(40, 70, 3, 3, generator=g)), 1, 1).numpy())
    assert not streams(large[1:])  # misaligned: a non-temporal 64-byte store would fault
    monkeypatch.setenv("BNNBENCH_STREAM_BYTES", "-1")
    with pytest.raises(ValueError, match="BNNBENCH_STREAM_BYTES"):
        stream_threshold()


def test_l2_size_is_read_from_sysfs():
    """The streaming threshold's default is a plausible L2 size (64 KiB to 64 MiB) or the documented fallback."""
    assert 64 << 10 <= l2_bytes() <= 64 << 20


@pytest.mark.parametrize("micro_kernel", list(MICRO_KERNELS))
@pytest.mark.parametrize("cin,cout,size,stride", [(64, 64, 9, 1), (64, 128, 9, 2), (256, 256, 5, 1), (256, 512, 6, 2), (512, 512, 4, 1)])
def test_resnet18_channel_counts_are_exact(micro_kernel, cin, cout, size, stride):
    """The ResNet-18 layer widths (1 to 8 words per tap), batch 2, on shrunken images."""
    g = torch.Generator().manual_seed(cin + cout + size)
    x, w = pm1(2, cin, size, size, generator=g), pm1(cout, cin, 3, 3, generator=g)
    got = binary_conv2d(x, w, stride=stride, padding=1, kernel=MICRO_KERNELS[micro_kernel])
    assert torch.equal(got, F.conv2d(x, w, stride=stride, padding=1))


def test_micro_kernel_selection_follows_the_isa(monkeypatch):
    monkeypatch.delenv("BNNBENCH_MICRO_KERNEL", raising=False)
    assert select_micro_kernel(AVX512_VPOPCNTDQ).name == "4x32"
    assert select_micro_kernel(AVX2).name == "4x8-mixed"
    assert select_micro_kernel(GENERIC).name == "4x8-mixed"
    assert popcount_isa(frozenset({"avx2", "avx512f", "avx512vpopcntdq"})) == AVX512_VPOPCNTDQ
    assert popcount_isa(frozenset({"avx2", "avx512f"})) == AVX2  # AVX-512 without VPOPCNTDQ (Skylake-X)
    assert popcount_isa(frozenset({"popcnt"})) == GENERIC
    assert SELECTED == select_micro_kernel(popcount_isa())
    monkeypatch.setenv("BNNBENCH_MICRO_KERNEL", "4x8-mixed")
    assert select_micro_kernel(AVX512_VPOPCNTDQ).name == "4x8-mixed"
    monkeypatch.setenv("BNNBENCH_MICRO_KERNEL", "9x9")
    with pytest.raises(ValueError, match="not one of"):
        select_micro_kernel()


def test_kernels_compiled_for_avx2_are_exact(tmp_path):
    """Both micro-kernels compiled for an AVX2-only target (Haswell), in a subprocess: the other ISA's code path."""
    script = (
        "import torch, torch.nn.functional as F\n"
        "from bnnbench.kernels import MICRO_KERNELS, SELECTED, binary_conv2d, popcount_isa\n"
        "assert popcount_isa() == 'generic' and SELECTED.name == '4x8-mixed', (popcount_isa(), SELECTED)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, w = torch.randn(2, 130, 6, 7, generator=g).sign(), torch.randn(40, 130, 3, 3, generator=g).sign()\n"
        "for kernel in MICRO_KERNELS.values():\n"
        "    for stride in (1, 2):\n"
        "        assert torch.equal(binary_conv2d(x, w, stride, 1, kernel=kernel), F.conv2d(x, w, stride=stride, padding=1)), kernel\n"
    )
    env = {**os.environ, "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": ""}
    env.pop("BNNBENCH_MICRO_KERNEL", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_real_inputs_are_binarised_with_sign_of_zero_plus_one():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 67, 6, 6, generator=g, dtype=torch.float64)
    w = torch.randn(9, 67, 3, 3, generator=g)
    x[0, :5, 2, 2] = 0.0
    w[3, :7, 1, 1] = 0.0
    expected = F.conv2d(sign(x.float()), sign(w), padding=1)
    assert torch.equal(binary_conv2d(x, w, padding=1), expected)


def test_strided_and_half_inputs():
    g = torch.Generator().manual_seed(5)
    x, w = pm1(2, 20, 9, 12, generator=g), pm1(6, 10, 3, 3, generator=g)
    view = x[:, ::2, :, ::2]  # neither NCHW- nor channels-last-contiguous
    assert torch.equal(binary_conv2d(view, w, padding=1), F.conv2d(view, w, padding=1))
    assert torch.equal(binary_conv2d(view.half(), w, padding=1), F.conv2d(view, w, padding=1))


def test_border_correction_is_what_plus_one_padding_adds():
    """Without the correction the result would be the conv of the input padded with +1."""
    g = torch.Generator().manual_seed(2)
    x, w = pm1(1, 33, 5, 5, generator=g), pm1(4, 33, 3, 3, generator=g)
    packed = pack_weights(w)
    plus_one_padded = F.conv2d(F.pad(x, (1, 1, 1, 1), value=1.0), w)
    zero_padded = F.conv2d(x, w, padding=1)
    correction = border_correction(packed.tap_sums, 5, 5, 1, 1)
    assert torch.equal(plus_one_padded - zero_padded, torch.from_numpy(correction).float().view(1, 4, 5, 5))
    assert correction[:, 12].tolist() == [0] * 4 and np.abs(correction).sum() > 0  # centre untouched, border corrected


def test_packed_weights_reused_across_input_sizes():
    g = torch.Generator().manual_seed(3)
    w = pm1(12, 40, 3, 3, generator=g)
    packed = pack_weights(w)
    for size, stride in ((9, 1), (7, 2), (4, 1)):
        x = pm1(2, 40, size, size, generator=g)
        assert torch.equal(binary_conv2d_packed(x, packed, stride, 1), F.conv2d(x, w, stride=stride, padding=1))


def test_bit_layout():
    """Bit c % 64 of word c // 64 is 1 exactly for -1; padding and unused channel bits are 0."""
    x = torch.ones(1, 70, 1, 2)
    x[0, [0, 5, 63, 64, 69], 0, 1] = -1.0
    packed = pack_channels(x.numpy(), padding=1)
    assert packed.shape == (1, 3, 4, 2) and packed.dtype == np.uint64
    assert packed[0, 1, 1].tolist() == [0, 0]
    assert packed[0, 1, 2].tolist() == [(1 << 0) | (1 << 5) | (1 << 63), (1 << 0) | (1 << 5)]
    assert packed[0, 0].sum() == 0 and packed[0, :, 0].sum() == 0 and packed[0, :, 3].sum() == 0


@pytest.mark.parametrize("batch,channels,size", [(1, 130, 13), (2, 64, 9), (1, 256, 14), (3, 7, 11)])
def test_packing_in_runs_of_pixels_is_the_same_bits(batch, channels, size):
    """NCHW images packed in 1..5 runs of pixels (the split between threads; the last run shorter) and channels-last
    inputs give the same words."""
    g = torch.Generator().manual_seed(batch * channels + size)
    x = torch.randn(batch, channels, size, size, generator=g)
    expected = pack_channels(x.contiguous(memory_format=torch.channels_last).numpy(), 2)
    for runs in range(1, 6):
        out = np.zeros(packed_shape(batch, channels, size, size, 2), dtype=np.uint64)
        pack_into(*in_memory_order(x.numpy()), 2, runs, out)
        assert np.array_equal(out, expected), runs
    assert runs_per_image(1, size, size) >= 1 and runs_per_image(64, size, size) == 1


def test_a_conv_plan_is_made_once_per_input_geometry():
    """The plan (tables, panels, offsets, GEMM variant) is cached per input shape, stride, padding and micro-kernel,
    and a cached plan does not let an invalid argument through."""
    g = torch.Generator().manual_seed(5)
    w = pm1(40, 20, 3, 3, generator=g)
    packed = pack_weights(w)
    x = pm1(2, 20, 6, 6, generator=g)
    first = packed.plan(x.shape, 1, 1)
    assert packed.plan(tuple(x.shape), 1, 1) is first and packed.plan(x.shape, 2, 1) is not first
    assert first.size == (2, 40, 6, 6) and first.rows == (72, padded_filters(40))
    assert torch.equal(binary_conv2d_packed(x, packed, 1, 1), F.conv2d(x, w, padding=1))
    with pytest.raises(ValueError, match="stride must be an int"):
        binary_conv2d_packed(x, packed, True, 1)  # type: ignore[arg-type]


def test_packed_weights_layout_and_tap_sums():
    g = torch.Generator().manual_seed(4)
    w = pm1(11, 70, 3, 3, generator=g)
    packed = pack_weights(w)
    assert packed.bits.shape == (11, 3 * 3 * 2) and packed.k_bits == 70 * 9
    for kernel in MICRO_KERNELS.values():
        panels = packed.panels(kernel)
        assert panels.shape == (padded_filters(11) // kernel.filters, 18, kernel.filters)
        assert np.array_equal(panels.transpose(0, 2, 1).reshape(-1, 18)[:11], packed.bits)
    assert np.array_equal(packed.tap_sums, w.sum(dim=1).numpy().astype(np.int32))
    assert torch.equal(unpack_weights(packed), w)
    rebuilt = PackedWeights(bits=packed.bits.copy(), in_channels=70, kernel_size=(3, 3))
    assert np.array_equal(rebuilt.panels(), packed.panels())
    with pytest.raises(ValueError, match="packed filters must be"):
        PackedWeights(bits=packed.bits[:, :5], in_channels=70, kernel_size=(3, 3))


@njit
def _popcounts(words):
    out = np.empty(words.size, dtype=np.int64)
    for i in range(words.size):
        out[i] = popcount(words[i])
    return out


def test_popcount_intrinsic():
    words = np.random.default_rng(0).integers(0, np.iinfo(np.int64).max, 1000, dtype=np.int64).view(np.uint64)
    words[:3] = [0, np.uint64(2**64 - 1), np.uint64(1 << 63)]
    assert np.array_equal(_popcounts(words), np.bitwise_count(words).astype(np.int64))


def test_clear_errors():
    x, w = torch.ones(1, 8, 4, 4), torch.ones(2, 8, 3, 3)
    with pytest.raises(ValueError, match="input has 3 channels"):
        binary_conv2d(torch.ones(1, 3, 4, 4), w)
    with pytest.raises(ValueError, match="stride must be an int"):
        binary_conv2d(x, w, stride=(1, 1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating-point"):
        binary_conv2d(x.int(), w)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        binary_conv2d(torch.ones(1, 8, 2, 2), w)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        binary_conv2d(torch.ones(8, 4, 4), w)


@pytest.mark.parametrize("user_cache_writable", [True, False])
def test_cache_dir_fallback_for_a_read_only_package(monkeypatch, tmp_path, user_cache_writable):
    """A read-only package folder sends numba's cache to the user cache, or else to the temp folder."""
    import numba

    import bnnbench.kernels as kernels

    package_cache = Path(kernels.__file__).parent / "__pycache__"
    user_cache = tmp_path / "bnnbench" / "numba"
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setattr(kernels, "_writable", lambda folder: folder not in (package_cache, *([] if user_cache_writable else [user_cache])))
    kernels._choose_cache_dir()
    expected = user_cache if user_cache_writable else Path(tempfile.gettempdir()) / f"bnnbench-numba-{os.getuid()}"
    assert numba.config.CACHE_DIR == str(expected)
