"""Model summary in the style of larq's ``lq.models.summary``: precision, memory and MACs per layer.

For every layer with parameters or statistics (binary and real convolutions,
linear layers, BatchNorm):

    1-bit params    weights of a binary layer in stage 2 (binary_weights)
    32-bit params   everything else: real weights, biases, alpha, activation
                    thresholds, BatchNorm affine parameters and running statistics
    memory          1 bit per 1-bit parameter + 32 bits per 32-bit parameter
    binary MACs     multiply-accumulates whose weights and inputs are both 1 bit
                    (XNOR-popcount); all other MACs of convs and linear layers are
                    32-bit MACs.  Output sizes come from a forward pass with hooks.

Totals add the model size in float32 and packed (the memory above), their
ratio, the packed size as :mod:`bnnbench.packed` stores it (whole 64-bit words
per tap and channel group), and OPs = FLOPs + BOPs / 64, the convention of
Bi-Real Net (Liu et al., 2018) used to compare BNNs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .kernels import words_for
from .layers import BinaryConv2d, BinaryLinear
from .models import build_model

BINARY_OPS_PER_FLOP = 64  # Bi-Real Net: OPs = FLOPs + BOPs / 64
RESOLUTIONS = {"cifar": 32, "imagenet": 224}


@dataclass
class LayerSummary:
    """One row of the summary (counts per image)."""

    name: str
    kind: str
    input_bits: int | None  # 1, 32, or None for layers without MACs
    output_shape: tuple[int, ...]
    params_1bit: int
    params_32bit: int
    macs_binary: int
    macs_float: int
    stored_1bit_words: int = 0  # 64-bit words the packed export stores for the 1-bit weights

    @property
    def memory_bits(self) -> int:
        return self.params_1bit + 32 * self.params_32bit


@dataclass
class ModelSummary:
    """A model's layers and totals at a given input size."""

    title: str
    input_shape: tuple[int, ...]
    layers: list[LayerSummary] = field(default_factory=list)

    def total(self, attribute: str) -> int:
        return sum(getattr(layer, attribute) for layer in self.layers)

    @property
    def params(self) -> int:
        return self.total("params_1bit") + self.total("params_32bit")

    @property
    def float32_bytes(self) -> int:
        """Every parameter in float32."""
        return 4 * self.params

    @property
    def packed_bytes(self) -> float:
        """1 bit per binary weight, 32 bits per other parameter."""
        return self.total("memory_bits") / 8

    @property
    def stored_packed_bytes(self) -> int:
        """As :func:`bnnbench.packed.export_packed` stores it: binary weights in whole 64-bit words."""
        return 8 * self.total("stored_1bit_words") + 4 * self.total("params_32bit")

    @property
    def compression(self) -> float:
        return self.float32_bytes / self.packed_bytes

    @property
    def ops(self) -> float:
        """FLOPs + BOPs / 64 with FLOPs = 32-bit MACs (Bi-Real Net's convention)."""
        return self.total("macs_float") + self.total("macs_binary") / BINARY_OPS_PER_FLOP

    def totals(self) -> dict[str, Any]:
        """The totals as a flat dict (for tests, JSON and the table)."""
        return {
            "params": self.params,
            "params_1bit": self.total("params_1bit"),
            "params_32bit": self.total("params_32bit"),
            "memory_bits": self.total("memory_bits"),
            "macs_binary": self.total("macs_binary"),
            "macs_float": self.total("macs_float"),
            "ops": self.ops,
            "float32_bytes": self.float32_bytes,
            "packed_bytes": self.packed_bytes,
            "stored_packed_bytes": self.stored_packed_bytes,
            "compression": self.compression,
        }


def summarize(model: nn.Module, input_shape: tuple[int, ...], title: str = "") -> ModelSummary:
    """Summary of ``model`` for one input of ``input_shape`` (C, H, W), from a forward pass in eval mode."""
    summary = ModelSummary(title=title or type(model).__name__, input_shape=tuple(input_shape))
    outputs: dict[str, tuple[int, ...]] = {}
    hooks = [
        module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, tuple(o.shape[1:])))
        for name, module in model.named_modules()
        if _has_state(module)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    for name, module in model.named_modules():
        if name in outputs:
            summary.layers.append(_layer_summary(name, module, outputs[name]))
    return summary


def summarize_net(net: str, method: str, family: str = "cifar", resolution: int | None = None, stage: int = 2, **options: Any) -> ModelSummary:
    """Summary of backbone ``net`` built with ``method`` at ``resolution`` (32 for CIFAR, 224 for ImageNet)."""
    model = build_model(net, method, family=family, stage=stage, **options)
    size = resolution or RESOLUTIONS[model.spec.family]
    title = f"{model.spec.family}/{model.spec.net} + {method} (stage {stage}), {size}x{size} input"
    return summarize(model, (3, size, size), title=title)


def _saved_buffers(module: nn.Module) -> list[Tensor]:
    """The module's own buffers that its state_dict stores (not the training progress a binary layer holds)."""
    return [b for name, b in module.named_buffers(recurse=False) if name not in module._non_persistent_buffers_set]


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(t.is_floating_point() for t in _saved_buffers(module))


def _layer_summary(name: str, module: nn.Module, output_shape: tuple[int, ...]) -> LayerSummary:
    own = [t for t in (*module.parameters(recurse=False), *_saved_buffers(module)) if t.is_floating_point()]
    binary = isinstance(module, (BinaryConv2d, BinaryLinear))
    binary_weights = binary and module.binary_weights  # type: ignore[union-attr]
    binary_inputs = binary and module.binary_activations  # type: ignore[union-attr]
    # activation and weight-path parameters live in child ParameterDicts: count them with the layer
    # (weight-path state such as LQ-Net's basis or RBNN's rotations is among the layer's own buffers)
    extra = (
        sum(p.numel() for p in (*module.activation_params.parameters(), *module.weight_params.parameters()))  # type: ignore[union-attr]
        if binary
        else 0
    )
    weight: Tensor | None = getattr(module, "weight", None) if isinstance(module, (nn.Conv2d, nn.Linear)) else None
    params_1bit = weight.numel() if (weight is not None and binary_weights) else 0
    params_32bit = sum(t.numel() for t in own) - params_1bit + extra
    macs = _macs(module, output_shape)
    both_binary = binary_weights and binary_inputs
    stored_words = 0
    if params_1bit:
        taps = weight[0, 0].numel() if weight.dim() == 4 else 1  # type: ignore[union-attr]
        stored_words = weight.shape[0] * taps * words_for(weight.shape[1])  # type: ignore[union-attr]
    return LayerSummary(
        name=name,
        kind=type(module).__name__,
        input_bits=(1 if binary_inputs else 32) if macs else None,
        output_shape=output_shape,
        params_1bit=params_1bit,
        params_32bit=params_32bit,
        macs_binary=macs if both_binary else 0,
        macs_float=0 if both_binary else macs,
        stored_1bit_words=stored_words,
    )


def _macs(module: nn.Module, output_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates per image of a conv or linear layer (0 for others)."""
    outputs = 1
    for size in output_shape:
        outputs *= size
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return outputs * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return outputs * module.in_features
    return 0
