"""``ModelSpec``: one typed, resolved description of a network and its two binarizers.

A binary layer has a *weight* binarizer and an *activation* binarizer (larq's kernel and input
quantizers).  ``method`` names the registered method whose weight half binarizes the weights;
``act_method`` the one whose activation half binarizes the inputs of every binary layer
(``None``: the same method, i.e. the pair its paper uses).  ``act_method="fp"`` gives real
activations (1W/32A, Table 2), ``method="fp"`` with a binary ``act_method`` real weights with
binary activations (32W/1A).

A spec is *resolved* when made: the network's family and options and the methods'
hyper-parameters get their defaults (so ``w0=20``, ``w0=20.0``, ``w0="20"`` and no ``w0`` are one
spec), ``act_norm=None`` becomes the activation method's default, and ``act_norm`` is ``False``
whenever the activations are real (it has no effect there).  ``to_dict()`` is therefore canonical:
two specs that build the same network have the same dict.  ``build(stage)`` makes the network;
the model carries its spec as ``model.spec``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from ..errors import ConfigError
from ..layers import check_act_norm
from ..method import Method
from ..registry import get_method
from ..teacher import prepare_student
from .blocks import BinaryLayers
from .registry import FAMILIES, lookup_net

DEFAULT_CLASSES = {"cifar": 10, "imagenet": 1000}


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """Network + weight binarizer + activation binarizer, resolved (see the module docstring)."""

    net: str = "resnet20"
    method: str = "biper"
    hparams: Mapping[str, Any] = field(default_factory=dict)
    act_method: str | None = None
    act_hparams: Mapping[str, Any] = field(default_factory=dict)
    act_norm: bool | None = None
    family: str = "cifar"
    num_classes: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        family, net = self.net.split("/", 1) if "/" in self.net else (self.family, self.net)
        if family not in FAMILIES:
            raise ConfigError(f"unknown network family {family!r}; valid: {', '.join(FAMILIES)}")
        factory = lookup_net(family, net)
        weights = get_method(self.method, **self.hparams)
        act_name = self.method if self.act_method is None else self.act_method
        same_half = act_name == self.method and not self.act_hparams
        activations = weights if same_half else get_method(act_name, **self.act_hparams)
        binary_inputs = activations.binary_activations
        act_norm = (activations.default_act_norm if self.act_norm is None else bool(self.act_norm)) and binary_inputs
        check_act_norm(activations, act_norm)
        accepted = set(inspect.signature(factory).parameters) - {"layers", "num_classes"}
        unknown = sorted(set(self.options) - accepted)
        if unknown:
            raise ConfigError(f"network {family}/{net} has no option {', '.join(unknown)}; valid: {', '.join(sorted(accepted)) or 'none'}")
        defaults = {k: p.default for k, p in inspect.signature(factory).parameters.items() if k in accepted}
        resolved = {
            "net": net,
            "family": family,
            "hparams": weights.hparams(),
            "act_method": act_name,
            "act_hparams": activations.hparams(),
            "act_norm": act_norm,
            "num_classes": DEFAULT_CLASSES[family] if self.num_classes is None else int(self.num_classes),
            "options": dict(sorted({**defaults, **self.options}.items())),
        }
        for name, value in resolved.items():
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ identity
    def to_dict(self) -> dict[str, Any]:
        """The canonical, JSON-ready record (equal for every spelling of the same network)."""
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), Mapping) else v) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model spec has unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_legacy(cls, record: Mapping[str, Any]) -> ModelSpec:
        """The spec of a ``model`` record written before specs existed (``config.json["model"]``,
        checkpoints' ``bnn_config``): one method for both halves, ``binary_activations`` for 1W/32A."""
        method = record["method"]
        return cls(
            net=record["net"],
            method=method["name"],
            hparams=method["hparams"],
            act_method=None if record.get("binary_activations", True) else "fp",
            act_norm=record.get("act_norm"),
            family=record["family"],
            num_classes=record["num_classes"],
            options=record.get("options", {}),
        )

    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=str)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelSpec) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def replace(self, **changes: Any) -> ModelSpec:
        """A copy with fields changed (re-resolved)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ parts
    def weight_binarizer(self) -> Method:
        """The method object whose weight half binarizes the weights."""
        return get_method(self.method, **self.hparams)

    def activation_binarizer(self) -> Method:
        """The method object whose activation half binarizes the inputs of binary layers."""
        return get_method(self.act_method, **self.act_hparams)  # type: ignore[arg-type]

    @property
    def paired(self) -> bool:
        """True when both halves come from one method with one set of hyper-parameters (its paper's pair)."""
        return self.act_method == self.method and dict(self.act_hparams) == dict(self.hparams)

    @property
    def binary_weights(self) -> bool:
        return self.weight_binarizer().binary_weights

    @property
    def binary_activations(self) -> bool:
        return self.activation_binarizer().binary_activations

    @property
    def wa(self) -> str:
        """Bit widths as the paper's tables print them: "1/1", "1/32", "32/1" or "32/32"."""
        return f"{1 if self.binary_weights else 32}/{1 if self.binary_activations else 32}"

    @property
    def label(self) -> str:
        """``method`` or ``method + act_method activations`` when the halves differ."""
        return self.method if self.paired else f"{self.method} + {self.act_method} activations"

    def describe(self) -> dict[str, Any]:
        """The spec plus what it means: both halves' formulas, scales and papers, the non-linearity."""
        weights, acts = self.weight_binarizer(), self.activation_binarizer()
        return {
            **self.to_dict(),
            "weights": {k: v for k, v in weights.describe().items() if not k.startswith("activation")},
            "activations": {
                "name": acts.name,
                "forward": acts.activation_forward if acts.binary_activations else "a (real)",
                "backward": acts.activation_backward if acts.binary_activations else "1",
                "paper": acts.paper,
            },
            "wa": self.wa,
            "binary_weights": self.binary_weights,
            "binary_activations": self.binary_activations,
            "nonlinearity": self.nonlinearity,
        }

    @property
    def nonlinearity(self) -> str:
        """Hardtanh between binary layers (upstream); ReLU when the activations are real."""
        return "hardtanh" if self.binary_activations else "relu"

    # ------------------------------------------------------------------ the network
    def build(self, stage: int = 2) -> nn.Module:
        """The network with every binary layer in ``stage`` (1: binary activations, 2: all binary)."""
        factory = lookup_net(self.family, self.net)
        layers = BinaryLayers(self.weight_binarizer(), self.activation_binarizer(), stage=stage, act_norm=bool(self.act_norm))
        model = factory(layers, num_classes=self.num_classes, **self.options)
        if layers.weights.teacher:
            prepare_student(model, layers.weights)
        model.spec = self
        return model


def build_model(
    net: str,
    method: str | Method,
    *,
    num_classes: int | None = None,
    stage: int = 2,
    family: str = "cifar",
    act_method: str | Method | None = None,
    act_norm: bool | None = None,
    binary_activations: bool = True,
    **options: Any,
) -> nn.Module:
    """Build backbone ``net`` with every binary layer using ``method`` (a shortcut for
    ``ModelSpec(...).build(stage)``; the model carries its spec as ``model.spec``).

    Args:
        net: "resnet20", "resnet18", "vgg_small" (CIFAR) or "resnet18",
            "resnet34" (ImageNet); "family/name" selects the family explicitly.
        method: a registered method name or instance; its weight half binarizes the weights.
        num_classes: classifier outputs (default 10 for CIFAR, 1000 for ImageNet).
        stage: 1 (binary activations, stage-1 weights) or 2 (all binary).
        family: "cifar" (32x32 inputs) or "imagenet" (224x224).
        act_method: the method whose activation half binarizes the inputs (default: ``method``).
        act_norm: evaluate the activation surrogate on a per-sample variance
            normalised input (None: the activation method's default).
        binary_activations: False for 1W/32A models (Table 2): ``act_method="fp"``.
        options: backbone options, e.g. ``skip="single"`` for CIFAR ResNet-18.
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    if not binary_activations:
        act_method = "fp"
    weights = method if isinstance(method, Method) else get_method(method)
    acts = act_method if isinstance(act_method, Method) or act_method is None else get_method(act_method)
    spec = ModelSpec(
        net=net,
        method=weights.name,
        hparams=weights.hparams(),
        act_method=None if acts is None else acts.name,
        act_hparams={} if acts is None else acts.hparams(),
        act_norm=act_norm,
        family=family,
        num_classes=num_classes,
        options=options,
    )
    return spec.build(stage)


__all__ = ["ModelSpec", "build_model"]
