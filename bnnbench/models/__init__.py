"""Backbones; importing this package registers them."""

from . import resnet, vgg
from .blocks import BinarySpec
from .registry import build_model, list_nets, register_net

__all__ = ["BinarySpec", "build_model", "list_nets", "register_net", "resnet", "vgg"]
