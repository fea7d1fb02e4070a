"""Building blocks shared by the backbones: the binary layer factory, shortcuts, basic block."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import Hardtanh
from ..layers import BinaryConv2d
from ..method import Method


@dataclass
class BinaryLayers:
    """How a backbone builds its binary layers: the two binarizers, the stage, act_norm.

    Made by :meth:`bnnbench.models.spec.ModelSpec.build`; backbones call :meth:`conv` and
    :meth:`nonlinearity` and need nothing else.
    """

    weights: Method
    activations: Method
    stage: int = 2
    act_norm: bool = False

    @property
    def real_activations(self) -> bool:
        return not self.activations.binary_activations

    def conv(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> BinaryConv2d:
        return BinaryConv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            method=self.weights,
            act_method=self.activations,
            stage=self.stage,
            act_norm=self.act_norm,
        )

    def nonlinearity(self, into_binary: bool = True) -> nn.Module:
        """Hardtanh between binary layers (upstream), ReLU when activations are real.  ``into_binary``: its output is
        a binary layer's input as it is, so the hardtanh makes the signs in its pass where the activation method's
        forward is sign(a) of that input (:attr:`~bnnbench.method.Method.signs_its_input`)."""
        if self.real_activations:
            return nn.ReLU(inplace=True)
        return Hardtanh(signs=into_binary and self.activations.signs_its_input)


class PadShortcut(nn.Module):
    """Parameter-free shortcut ("option A"): AvgPool2d(2) then zero channel padding."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        extra = out_channels - in_channels
        if extra < 0 or extra % 2:
            raise ValueError(f"PadShortcut needs an even channel increase, got {in_channels}->{out_channels}")
        self.pad = extra // 2
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(self.pool(x), (0, 0, 0, 0, self.pad, self.pad))


def conv_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Real-valued 1x1 strided conv + BN downsample (ImageNet ResNets)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two binary 3x3 convs with a double skip (Bi-Real) or a single skip.

    Double skip:  x1 = act(BN(conv1(x)) + shortcut(x));  out = act(BN(conv2(x1)) + x1)
    Single skip:  out = act(BN(conv2(act(BN(conv1(x))))) + shortcut(x))
    """

    def __init__(
        self, layers: BinaryLayers, in_channels: int, out_channels: int, stride: int, shortcut: nn.Module, double_skip: bool, last: bool = False
    ) -> None:
        """``last``: the network's last block, whose output goes to the head, not to a binary layer."""
        super().__init__()
        self.double_skip = double_skip
        self.conv1 = layers.conv(in_channels, out_channels, 3, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = layers.nonlinearity()
        self.conv2 = layers.conv(out_channels, out_channels, 3, 1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = layers.nonlinearity(into_binary=not last)
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        if self.double_skip:
            x1 = self.act1(self.bn1(self.conv1(x)) + self.shortcut(x))
            return self.act2(self.bn2(self.conv2(x1)) + x1)
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))
