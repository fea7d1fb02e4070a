"""Model summary: counts checked against hand-computed numbers."""

from __future__ import annotations

import pytest
from torch import nn

from bnnbench import BinaryConv2d
from bnnbench.cli import main as cli_main
from bnnbench.summary import summarize, summarize_net


def tiny(stage: int = 2, method: str = "biper") -> nn.Module:
    """3x8x8 -> binary 3x3 conv (3 -> 4) -> BN -> flatten -> Linear(256 -> 10)."""
    return nn.Sequential(
        BinaryConv2d(3, 4, 3, padding=1, method=method, stage=stage),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )


def test_tiny_model_totals_by_hand():
    s = summarize(tiny(), (3, 8, 8))
    assert [(layer.name, layer.output_shape) for layer in s.layers] == [("0", (4, 8, 8)), ("1", (4, 8, 8)), ("3", (10,))]
    conv, bn, fc = s.layers
    assert (conv.params_1bit, conv.params_32bit, conv.input_bits) == (4 * 3 * 9, 4, 1)  # weights; alpha
    assert (conv.macs_binary, conv.macs_float) == (8 * 8 * 4 * 3 * 9, 0)
    assert (bn.params_1bit, bn.params_32bit, bn.macs_float, bn.input_bits) == (0, 4 * 4, 0, None)  # affine + running stats
    assert (fc.params_32bit, fc.macs_float, fc.input_bits) == (256 * 10 + 10, 2560, 32)
    t = s.totals()
    assert t["params_1bit"] == 108 and t["params_32bit"] == 4 + 16 + 2570
    assert t["memory_bits"] == 108 + 32 * 2590
    assert t["float32_bytes"] == 4 * (108 + 2590)
    assert t["packed_bytes"] == (108 + 32 * 2590) / 8
    assert t["stored_packed_bytes"] == 8 * (4 * 9 * 1) + 4 * 2590  # 3 channels still take one 64-bit word per tap
    assert t["compression"] == pytest.approx(4 * 2698 / ((108 + 32 * 2590) / 8))
    assert t["ops"] == pytest.approx(2560 + 6912 / 64)


def test_real_weights_and_activations_count_as_32_bit():
    stage1 = summarize(tiny(stage=1), (3, 8, 8)).layers[0]
    assert (stage1.params_1bit, stage1.params_32bit, stage1.macs_binary, stage1.macs_float) == (0, 108 + 4, 0, 6912)
    fp = summarize(tiny(method="fp"), (3, 8, 8)).layers[0]
    assert (fp.params_1bit, fp.input_bits, fp.macs_float) == (0, 32, 6912)


def test_imagenet_resnet18_binary_macs():
    """16 binary 3x3 convs: 4 at 64@56x56, then per stage one stride-2 conv from C/2 and three C->C at (56/2^i)^2."""
    s = summarize_net("resnet18", "biper", family="imagenet")
    per_conv = 56 * 56 * 64 * 64 * 9  # = 28^2 * 128^2 * 9 = 14^2 * 256^2 * 9 = 7^2 * 512^2 * 9
    assert s.total("macs_binary") == 4 * per_conv + 3 * (per_conv // 2 + 3 * per_conv)
    assert s.total("params_1bit") == sum(c_in * c_out * 9 for c_in, c_out in [(64, 64)] * 4 + [(64, 128)] + [(128, 128)] * 3 + [(128, 256)] + [(256, 256)] * 3 + [(256, 512)] + [(512, 512)] * 3)
    assert len([layer for layer in s.layers if layer.macs_binary]) == 16


def test_summary_command_prints_the_tables(capsys):
    assert cli_main(["summary", "--net", "resnet20", "--method", "biper"]) == 0
    out = capsys.readouterr().out
    assert "compression ratio" in out and "stages.0.0.conv1" in out
    assert "267,264" in out and "40,108,032" in out  # 1-bit params and binary MACs, never truncated
