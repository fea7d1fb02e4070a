"""bnnbench: binary neural network binarizers compared under one protocol.

Public API::

    register_method(name)        decorator registering a Method subclass
    list_methods(), get_method(name, **hparams)
    build_model(net, method, num_classes=..., stage=...)
"""

from .functional import sign, surrogate_sign
from .layers import BinaryConv2d, BinaryLinear, binary_layers, regularization_loss, set_progress, set_stage
from .method import Method
from .models import build_model, list_nets, register_net
from .registry import get_method, list_methods, load_plugin, register_method

from . import methods  # noqa: E402,F401  (registers the built-in binarizers)

__version__ = "0.1.0"

__all__ = [
    "BinaryConv2d",
    "BinaryLinear",
    "Method",
    "binary_layers",
    "build_model",
    "get_method",
    "list_methods",
    "list_nets",
    "load_plugin",
    "regularization_loss",
    "register_method",
    "register_net",
    "set_progress",
    "set_stage",
    "sign",
    "surrogate_sign",
]
