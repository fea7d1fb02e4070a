"""ResNet backbones (SPEC section 2): CIFAR ResNet-20/18 and ImageNet ResNet-18/34.

First conv and last FC are real; every 3x3 conv inside a block is binary.
CIFAR: 3x3 stem, parameter-free shortcuts (AvgPool2d + zero padding), head
global average pool -> BatchNorm1d -> Linear.  ImageNet: 7x7/2 stem + max-pool,
real 1x1/2 conv + BN downsample, the same head; every BatchNorm2d weight starts
at ``bn_weight_init`` (1e-8 upstream).  Block features (``feature_blocks``, for a teacher): the
outputs of the stages.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from .blocks import BasicBlock, BinaryLayers, PadShortcut, conv_shortcut
from .registry import register_net

Shortcut = Callable[[int, int, int], nn.Module]


def pad_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    return PadShortcut(in_channels, out_channels)


class ResNet(nn.Module):
    """Stem, stages of :class:`BasicBlock`, head."""

    def __init__(
        self,
        layers: BinaryLayers,
        stem: nn.Sequential,
        widths: list[int],
        depths: list[int],
        num_classes: int,
        shortcut: Shortcut,
        double_skip: bool,
    ) -> None:
        super().__init__()
        self.stem = stem
        stages, in_channels = [], widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                needs_shortcut = stride != 1 or in_channels != width
                sc = shortcut(in_channels, width, stride) if needs_shortcut else nn.Identity()
                last = i == len(widths) - 1 and j == depth - 1
                blocks.append(BasicBlock(layers, in_channels, width, stride, sc, double_skip, last=last))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_bn = nn.BatchNorm1d(in_channels)
        self.fc = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def feature_blocks(self) -> list[nn.Module]:
        """Block features (:mod:`bnnbench.teacher`): each stage's output, after its last non-linearity."""
        return list(self.stages)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(self.head_bn(self.pool(x).flatten(1)))


def _cifar_resnet(layers: BinaryLayers, widths: list[int], depths: list[int], num_classes: int, stem_act: bool, skip: str) -> ResNet:
    if skip not in ("double", "single"):
        raise ValueError(f"skip must be 'double' or 'single', got {skip!r}")
    stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]))
    if stem_act:
        stem.append(layers.nonlinearity())
    return ResNet(layers, stem, widths, depths, num_classes, pad_shortcut, double_skip=skip == "double")


@register_net("cifar", "resnet20")
def resnet20(layers: BinaryLayers, num_classes: int = 10, skip: str = "double") -> ResNet:
    """CIFAR ResNet-20: widths 16/32/64, [3, 3, 3]; stem conv -> BN -> hardtanh (upstream)."""
    return _cifar_resnet(layers, [16, 32, 64], [3, 3, 3], num_classes, stem_act=True, skip=skip)


@register_net("cifar", "resnet18")
def resnet18_cifar(layers: BinaryLayers, num_classes: int = 10, skip: str = "double") -> ResNet:
    """CIFAR ResNet-18: widths 64/128/256/512, [2, 2, 2, 2]; stem conv -> BN (upstream).

    ``skip="double"`` (the paper, Sec. 5.1.2) or ``"single"`` (upstream BiPer code).
    """
    return _cifar_resnet(layers, [64, 128, 256, 512], [2, 2, 2, 2], num_classes, stem_act=False, skip=skip)


def _imagenet_resnet(layers: BinaryLayers, depths: list[int], num_classes: int, bn_weight_init: float) -> ResNet:
    stem = nn.Sequential(
        nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        layers.nonlinearity(into_binary=False),  # the max-pool's output is the binary layer's input
        nn.MaxPool2d(3, stride=2, padding=1),
    )
    model = ResNet(layers, stem, [64, 128, 256, 512], depths, num_classes, conv_shortcut, double_skip=True)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, bn_weight_init)
            nn.init.zeros_(m.bias)
    return model


@register_net("imagenet", "resnet18")
def resnet18_imagenet(layers: BinaryLayers, num_classes: int = 1000, bn_weight_init: float = 1e-8) -> ResNet:
    """ImageNet ResNet-18, double skip, real 1x1 downsample."""
    return _imagenet_resnet(layers, [2, 2, 2, 2], num_classes, bn_weight_init)


@register_net("imagenet", "resnet34")
def resnet34_imagenet(layers: BinaryLayers, num_classes: int = 1000, bn_weight_init: float = 1e-8) -> ResNet:
    """ImageNet ResNet-34, double skip, real 1x1 downsample."""
    return _imagenet_resnet(layers, [3, 4, 6, 3], num_classes, bn_weight_init)
