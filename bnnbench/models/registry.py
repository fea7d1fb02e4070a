"""Backbone registry and the single factory ``build_model``."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from ..errors import ConfigError
from ..layers import resolve_method
from ..method import Method
from .blocks import BinarySpec

NetFactory = Callable[..., nn.Module]

FAMILIES = ("cifar", "imagenet")
_NETS: dict[tuple[str, str], NetFactory] = {}


def register_net(family: str, name: str) -> Callable[[NetFactory], NetFactory]:
    """Register a backbone factory ``fn(spec, num_classes=..., **options)``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")

    def decorator(fn: NetFactory) -> NetFactory:
        _NETS[(family, name)] = fn
        return fn

    return decorator


def list_nets(family: str | None = None) -> list[str]:
    """Registered backbones as "family/name"."""
    return sorted(f"{f}/{n}" for f, n in _NETS if family in (None, f))


def _lookup(net: str, family: str) -> tuple[str, str, NetFactory]:
    if "/" in net:
        family, net = net.split("/", 1)
    if family not in FAMILIES:
        raise ValueError(f"unknown network family {family!r}; valid: {', '.join(FAMILIES)}")
    try:
        return family, net, _NETS[(family, net)]
    except KeyError:
        valid = ", ".join(n for f, n in sorted(_NETS) if f == family)
        raise ValueError(f"unknown {family} network {net!r}; valid {family} networks: {valid}") from None


def build_model(
    net: str,
    method: str | Method,
    *,
    num_classes: int | None = None,
    stage: int = 2,
    family: str = "cifar",
    act_norm: bool | None = None,
    binary_activations: bool = True,
    **options: Any,
) -> nn.Module:
    """Build backbone ``net`` with every binary layer using ``method``.

    Args:
        net: "resnet20", "resnet18", "vgg_small" (CIFAR) or "resnet18",
            "resnet34" (ImageNet); "family/name" selects the family explicitly.
        method: a registered method name or a :class:`Method` instance.
        num_classes: classifier outputs (default 10 for CIFAR, 1000 for ImageNet).
        stage: 1 (binary activations, stage-1 weights) or 2 (all binary).
        family: "cifar" (32x32 inputs) or "imagenet" (224x224).
        act_norm: evaluate the activation surrogate on a per-sample variance
            normalised input (None: the method's default).
        binary_activations: False for 1W/32A models (Table 2).
        options: backbone options, e.g. ``skip="single"`` for CIFAR ResNet-18.

    The returned model carries ``model.bnn_config``, a JSON-ready record of all
    of the above.
    """
    family, name, factory = _lookup(net, family)
    method_obj = resolve_method(method)
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    accepted = set(inspect.signature(factory).parameters) - {"spec", "num_classes"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(f"network {family}/{name} has no option {', '.join(unknown)}; valid: {', '.join(sorted(accepted)) or 'none'}")
    if num_classes is None:
        num_classes = 1000 if family == "imagenet" else 10
    spec = BinarySpec(method_obj, stage=stage, act_norm=act_norm, binary_activations=binary_activations)
    model = factory(spec, num_classes=num_classes, **options)
    defaults = {k: p.default for k, p in inspect.signature(factory).parameters.items() if k in accepted}
    model.bnn_config = {
        "net": name,
        "family": family,
        "num_classes": num_classes,
        "method": method_obj.describe(),
        "stage": stage,
        "act_norm": method_obj.default_act_norm if act_norm is None else act_norm,
        "binary_activations": binary_activations and method_obj.binary_activations,
        "nonlinearity": "relu" if spec.real_activations else "hardtanh",
        "options": {**defaults, **options},
    }
    return model
