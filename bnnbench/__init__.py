"""bnnbench: binary neural network binarizers compared under one protocol.

Public API (imported on first use, so that ``bnnbench --help`` does not load torch)::

    register_method(name)        decorator registering a Method subclass
    list_methods(), get_method(name, **hparams)
    ModelSpec(net, method, act_method=..., ...).build(stage)
    build_model(net, method, num_classes=..., stage=...)
    attach_teacher(model, teacher)  the frozen teacher of a method with Method.teacher
"""

from __future__ import annotations

from .lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "sign": "functional",
    "surrogate_sign": "functional",
    "BinaryConv2d": "layers",
    "BinaryLinear": "layers",
    "binary_layers": "layers",
    "regularization_loss": "layers",
    "set_progress": "layers",
    "set_stage": "layers",
    "attach_teacher": "teacher",
    "Method": "method",
    "ModelSpec": "models",
    "build_model": "models",
    "list_nets": "models",
    "register_net": "models",
    "get_method": "registry",
    "list_methods": "registry",
    "load_plugin": "registry",
    "register_method": "registry",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
