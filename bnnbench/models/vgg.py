"""CIFAR VGG-Small (SPEC section 2).

Real conv 3->128 -> BN -> act, then binary convs 128-128 [maxpool], 128-256,
256-256 [maxpool], 256-512, 512-512 [maxpool], each conv -> (pool) -> BN -> act,
and a real Linear 8192 -> classes.  Convs start from N(0, 2/(k^2 C_out))
(upstream), the Linear from N(0, 0.01^2).  Block features (``feature_blocks``, for a teacher):
the outputs of the non-linearities after the three max-pools.
"""

from __future__ import annotations

from torch import Tensor, nn

from .blocks import BinaryLayers
from .registry import register_net

# (in, out, pool after) of the five binary convs
_BINARY_CONVS = [(128, 128, True), (128, 256, False), (256, 256, True), (256, 512, False), (512, 512, True)]


class VGGSmall(nn.Module):
    def __init__(self, layers: BinaryLayers, num_classes: int = 10) -> None:
        super().__init__()
        modules: list[nn.Module] = [nn.Conv2d(3, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128), layers.nonlinearity()]
        for k, (c_in, c_out, pool) in enumerate(_BINARY_CONVS):
            modules.append(layers.conv(c_in, c_out, 3))
            if pool:
                modules.append(nn.MaxPool2d(2))
            modules += [nn.BatchNorm2d(c_out), layers.nonlinearity(into_binary=k < len(_BINARY_CONVS) - 1)]  # the last: the Linear's
        self.features = nn.Sequential(*modules)
        self.fc = nn.Linear(512 * 4 * 4, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def feature_blocks(self) -> list[nn.Module]:
        """Block features (:mod:`bnnbench.teacher`): the non-linearity after each max-pool (3 groups)."""
        modules = list(self.features)
        return [modules[i + 2] for i, m in enumerate(modules) if isinstance(m, nn.MaxPool2d)]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1))


@register_net("cifar", "vgg_small")
def vgg_small(layers: BinaryLayers, num_classes: int = 10) -> VGGSmall:
    """VGG-Small for 32x32 inputs."""
    return VGGSmall(layers, num_classes)
