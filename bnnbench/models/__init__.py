"""Backbones; importing this package registers them."""

from . import resnet, vgg
from .blocks import BinaryLayers
from .registry import list_nets, register_net
from .spec import ModelSpec, build_model

__all__ = ["BinaryLayers", "ModelSpec", "build_model", "list_nets", "register_net", "resnet", "vgg"]
