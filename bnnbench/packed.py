"""Packed inference: a trained model's binary layers as bits, run by the XNOR-popcount kernel.

:func:`export_packed` copies a model and replaces every stage-2 binary layer
(binary weights and activations) by a :class:`PackedBinaryLayer` holding

    bits          sign(w_hat) packed along input channels (int64 words; bit 1 = -1)
    weight_scale  the method's analytic scale (``method.weight_scale(w)``), per output channel
    bias, alpha   the layer's bias and learned per-channel scale, in float

and computing, exactly like the float-simulated layer in eval mode (SPEC section 6),

    y = (binary_conv(a_b, w_b) * weight_scale + bias) * alpha,   a_b = method.activation(x)

where the binary convolution is integer-exact, so for methods without an
analytic scale (BiPer, ReCU, sign-STE, ...) the outputs equal the float
model's bit for bit up to the summation order of later real-valued layers.
Everything else (stem, BatchNorm, shortcuts, classifier) stays float.

``set_backend(model, "float")`` runs the same packed model with the bits
unpacked to +-1 float32 filters and ``F.conv2d``: the identical network on
the float path, the like-for-like baseline for speed comparisons
(``"xnor"``, the default, is the bit-packed kernel).  ``"int8"`` runs the
same +-1 convolutions through oneDNN's int8 convolution (VNNI or AMX-INT8
where the CPU has them), integer-exact with a float32 output: the honest
integer baseline.

:func:`chain_in_bits` goes one step further for ResNets of
:class:`~bnnbench.models.blocks.BasicBlock`: each binary conv's epilogue
applies the folded BatchNorm, the residual add and the hardtanh and emits the
next binary conv's packed sign bits directly (:mod:`bnnbench.kernels.fused`),
instead of float output -> BatchNorm -> add -> sign -> pack.

:func:`save_packed` / :func:`load_packed` store the packed model as a
``torch.save`` dict of tensors and JSON-able values (read back with
``weights_only=True``): the architecture is rebuilt from the model's
:class:`~bnnbench.models.ModelSpec` (``model.spec``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .io import atomic_write, read_torch
from .kernels import PackedWeights, binary_conv2d_packed, pack_weights, padded_filters, unpack_weights
from .kernels.fused import BitActivation, SignConv, rows_of
from .layers import BinaryConv2d, BinaryLinear, binary_layers
from .errors import UnknownMethodError
from .method import Method
from .models import ModelSpec
from .models.blocks import BasicBlock

FORMAT = "bnnbench-packed"
VERSION = 2
BACKENDS = ("xnor", "float", "int8")


class PackedBinaryLayer(nn.Module):
    """Inference-only stand-in for a stage-2 :class:`BinaryConv2d` or :class:`BinaryLinear`.

    Built from the float layer; a linear layer runs as a 1x1 convolution of a
    (B, C, 1, 1) input.  Runs on the CPU.  ``backend``: "xnor" (bit-packed
    kernel), "float" (the same bits as +-1 float32 filters and ``F.conv2d``)
    or "int8" (+-1 as int8 through oneDNN's quantized conv, float32 out).
    """

    bits: Tensor
    weight_scale: Tensor | None
    bias: Tensor | None
    alpha: Tensor | None

    def __init__(self, layer: BinaryConv2d | BinaryLinear) -> None:
        super().__init__()
        check_packable(layer)
        self.method: Method = layer.method
        self.act_method: Method = layer.act_method
        self.linear = isinstance(layer, BinaryLinear)
        weight = layer.weight.detach()
        if self.linear:
            self.stride, self.padding = 1, 0
        else:
            self.stride, self.padding = layer.stride[0], layer.padding[0]  # type: ignore[index]
        self.out_channels = weight.shape[0]
        with torch.no_grad():
            tensors = {name: t.detach() for name, t in layer.weight_tensors().items()}
            binary = self.method.binarize_weight(weight, layer.progress, **tensors)
            scale = self.method.weight_scale(weight, **tensors)
        filters = binary if binary.dim() == 4 else binary[:, :, None, None]
        packed = pack_weights(filters)
        self.in_channels, self.kernel_size = packed.in_channels, packed.kernel_size
        self.register_buffer("bits", torch.from_numpy(packed.bits.view(np.int64).copy()))
        self.register_buffer("weight_scale", None if scale is None else self._per_output(scale.detach(), "weight scale"))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.register_buffer("alpha", None if layer.alpha is None else self._per_output(layer.alpha.detach(), "alpha"))
        self.activation_params = nn.ParameterDict(
            {name: nn.Parameter(p.detach().clone(), requires_grad=False) for name, p in layer.activation_params.items()}
        )
        self.backend = "xnor"
        # the kernel's packing applies sign (sign(0) = +1) itself, unless the method binarizes otherwise
        self._packing_binarizes = type(self.act_method).activation is Method.activation and not self.activation_params
        self._packed: PackedWeights | None = packed
        self._float_weight: Tensor | None = None
        self._int8_weight: Int8Conv | None = None
        self._packed_version = self.bits._version

    def _per_output(self, value: Tensor, what: str) -> Tensor:
        """A per-output-channel (or per-layer) factor as a (out_channels,) vector."""
        if value.numel() == 1:
            return value.reshape(1).expand(self.out_channels).clone().float()
        if value.shape[0] == self.out_channels and value.numel() == self.out_channels:
            return value.reshape(self.out_channels).clone().float()
        raise ValueError(
            f"method {self.method.name!r}: the {what} of shape {tuple(value.shape)} varies within a filter; "
            "packed layers support one factor per output channel or per layer"
        )

    def packed_weights(self) -> PackedWeights:
        """The kernel's view of ``bits`` (rebuilt after ``load_state_dict`` changes them)."""
        if self._packed is None or self._packed_version != self.bits._version:
            self._packed = PackedWeights(bits=self.bits.numpy().view(np.uint64), in_channels=self.in_channels, kernel_size=self.kernel_size)
            self._float_weight = None
            self._int8_weight = None
            self._packed_version = self.bits._version
        return self._packed

    def float_weight(self) -> Tensor:
        """The +-1 float32 filters (O, C, kh, kw) held in ``bits``, for the "float" backend."""
        packed = self.packed_weights()
        if self._float_weight is None:
            self._float_weight = unpack_weights(packed)
        return self._float_weight

    def _binary_conv(self, a: Tensor) -> Tensor:
        if self.backend == "xnor":
            return binary_conv2d_packed(a, self.packed_weights(), self.stride, self.padding)
        if self.backend == "int8":
            if self._int8_weight is None or self._packed_version != self.bits._version:
                self._int8_weight = Int8Conv(self.float_weight(), self.stride, self.padding)
            return self._int8_weight(a)
        return F.conv2d(a, self.float_weight(), stride=self.stride, padding=self.padding)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            if self.backend == "xnor" and self._packing_binarizes:
                a = x
            else:
                a = self.act_method.activation(x, **self.activation_params)
            if self.linear:
                if a.dim() != 2:
                    raise ValueError(f"a packed linear layer expects (batch, features) inputs, got shape {tuple(a.shape)}")
                a = a[:, :, None, None]
            y = self._binary_conv(a)
            if self.linear:
                y = y.flatten(1)
            shape = (1, -1) if self.linear else (1, -1, 1, 1)
            if self.weight_scale is not None:
                y = y * self.weight_scale.view(shape)
            if self.bias is not None:
                y = y + self.bias.view(shape)
            if self.alpha is not None:
                y = y * self.alpha.view(shape)
            return y

    def extra_repr(self) -> str:
        kind = "linear" if self.linear else f"conv {self.kernel_size[0]}x{self.kernel_size[1]}, stride={self.stride}, padding={self.padding}"
        return f"{self.in_channels}, {self.out_channels}, {kind}, method={self.method.name}, backend={self.backend}"


class Int8Conv:
    """A +-1 convolution through oneDNN's int8 conv (``torch.ops.onednn.qconv_pointwise``), exact, float32 out.

    Activations +-1 become uint8 {0, 2} with zero point 1 and scale 1, weights
    int8 +-1 with scale 1, so the int32 accumulator is the exact dot product
    and the float32 output equals ``F.conv2d``.  oneDNN picks its fastest
    int8 kernel for the CPU (AVX-512 VNNI, AMX-INT8).
    """

    def __init__(self, weight: Tensor, stride: int, padding: int) -> None:
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv_pointwise")):
            raise RuntimeError("the int8 backend needs torch built with oneDNN (torch.ops.onednn.qconv_pointwise)")
        out_channels = weight.shape[0]
        self.stride, self.padding = [stride, stride], [padding, padding]
        self.w_scales = torch.ones(out_channels, dtype=torch.float64)
        self.w_zero_points = torch.zeros(out_channels, dtype=torch.int64)
        int8 = weight.sign().to(torch.int8).contiguous(memory_format=torch.channels_last)
        self.weight = torch.ops.onednn.qconv_prepack(int8, self.w_scales, 1.0, 1, self.stride, self.padding, [1, 1], 1, None)

    def __call__(self, a: Tensor) -> Tensor:
        """``F.conv2d(a, w)`` for a +-1 (B, C, H, W) float tensor ``a``."""
        quantized = (a + 1).to(torch.uint8).contiguous(memory_format=torch.channels_last)
        return torch.ops.onednn.qconv_pointwise(
            quantized, 1.0, 1, self.weight, self.w_scales, self.w_zero_points, None,
            self.stride, self.padding, [1, 1], 1, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip


def check_packable(layer: nn.Module) -> None:
    """Raise a ValueError saying why ``layer`` cannot run on the XNOR-popcount kernel."""
    if not isinstance(layer, (BinaryConv2d, BinaryLinear)):
        raise ValueError(f"only BinaryConv2d and BinaryLinear layers can be packed, got {type(layer).__name__}")
    name = layer.method.name
    if not layer.binary_weights:
        why = "its weights are real in stage 1" if layer.stage == 1 else f"method {name!r} keeps real weights"
        raise ValueError(f"cannot pack a layer whose weights are not binary ({why}); export a stage-2 model of a binary method")
    if not layer.binary_activations:
        raise ValueError(f"cannot pack a layer with real activations (method {name!r}, 1W/32A): XNOR-popcount needs binary inputs too")
    if isinstance(layer, BinaryConv2d):
        if layer.groups != 1 or layer.dilation != (1, 1) or layer.padding_mode != "zeros":
            raise ValueError("packed convolutions support groups=1, dilation=1 and zero padding only")
        if layer.stride[0] != layer.stride[1] or layer.padding[0] != layer.padding[1]:  # type: ignore[index]
            raise ValueError(f"packed convolutions need the same stride and padding in height and width, got {layer.stride}, {layer.padding}")


def export_packed(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode, frozen) whose binary layers are :class:`PackedBinaryLayer`.

    The copy keeps ``model.spec`` and lists the replaced layers in
    ``packed_layers``.  Raises ValueError when the model has no binary layer
    or one of them cannot be packed (stage 1, real weights or activations).
    """
    names = [name for name, _ in binary_layers(model)]
    if not names:
        raise ValueError("the model has no binary layers to pack")
    packed = copy.deepcopy(model)
    for name in names:
        layer = packed.get_submodule(name)
        try:
            replacement = PackedBinaryLayer(layer)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}") from None
        parent_name, _, child = name.rpartition(".")
        setattr(packed.get_submodule(parent_name), child, replacement)
    packed.eval().requires_grad_(False)
    packed.packed_layers = names
    return packed


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Run every packed layer of ``model`` with ``backend`` ("xnor" or "float"); returns the model."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    layers = [m for m in model.modules() if isinstance(m, PackedBinaryLayer)]
    if not layers:
        raise ValueError("the model has no packed layers; make one with export_packed(model)")
    for layer in layers:
        layer.backend = backend
    return model


def chain_in_bits(model: nn.Module) -> nn.Module:
    """A copy of a packed ResNet (from :func:`export_packed`) whose blocks keep activations in bits between binary convs.

    Every :class:`~bnnbench.models.blocks.BasicBlock` of ``model.stages``
    becomes a :class:`BitBlock`: its two binary convs run with the sign
    epilogue (folded BatchNorm, residual add, hardtanh, packed signs for the
    next conv); shortcuts with parameters (1x1 conv + BN downsample,
    average-pool) stay in torch.  The stem packs its output once.  The copy
    snapshots the packed weights: chain after loading them.  Raises ValueError
    when the model is not such a ResNet or a block's layers cannot be fused
    (an activation other than sign, a nonlinearity other than hardtanh).
    """
    if not hasattr(model, "packed_layers"):
        raise ValueError("chain_in_bits expects a packed model; make one with export_packed(model)")
    if not _basic_blocks(model):
        raise ValueError("chain_in_bits needs a ResNet whose stages are BasicBlocks (model.stages)")
    chained = copy.deepcopy(model)
    blocks = _basic_blocks(chained)  # the copy's, so that nothing is shared with model
    paddings = [block.conv1.padding for block in blocks[1:]] + [0]  # the padding each block's output is packed for
    chained.stages = BitStages([BitBlock(block, next_padding) for block, next_padding in zip(blocks, paddings)])
    return chained.eval()


def _basic_blocks(model: nn.Module) -> list[BasicBlock]:
    """The blocks of ``model.stages`` (a Sequential of Sequentials of BasicBlocks), or [] if it is not that."""
    stages = getattr(model, "stages", None)
    if not isinstance(stages, nn.Sequential) or not all(isinstance(stage, nn.Sequential) for stage in stages):
        return []
    blocks = [block for stage in stages for block in stage]
    return blocks if all(isinstance(block, BasicBlock) for block in blocks) else []


class BitStages(nn.Module):
    """A ResNet's blocks in sequence on :class:`~bnnbench.kernels.fused.BitActivation`; real tensor in and out."""

    def __init__(self, blocks: list[BitBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            activation = BitActivation.from_tensor(x, self.blocks[0].conv1.padding)
            for block in self.blocks:
                activation = block(activation)
            return activation.tensor()


class BitBlock(nn.Module):
    """A packed :class:`~bnnbench.models.blocks.BasicBlock` whose binary convs end in the sign epilogue.

    Double skip: ``x1 = hardtanh(BN1(conv1(x)) + shortcut(x))``, ``out =
    hardtanh(BN2(conv2(x1)) + x1)``; single skip: ``x1 = hardtanh(BN1(conv1(x)))``,
    ``out = hardtanh(BN2(conv2(x1)) + shortcut(x))``.  Each conv emits its
    output's values (for the residual adds and real-valued layers) and its
    sign bits packed for the next conv (``next_padding`` for the block's output).
    """

    def __init__(self, block: BasicBlock, next_padding: int) -> None:
        super().__init__()
        self.double_skip = block.double_skip
        self.next_padding = next_padding
        self.conv1 = _sign_conv(block.conv1, block.bn1, block.act1, "conv1")
        self.conv2 = _sign_conv(block.conv2, block.bn2, block.act2, "conv2")
        self.shortcut = None if isinstance(block.shortcut, nn.Identity) else block.shortcut

    def _shortcut(self, x: BitActivation) -> np.ndarray:
        if self.shortcut is None:
            return x.values
        return rows_of(self.shortcut(x.tensor()), padded_filters(self.conv2.weights.out_channels))

    def forward(self, x: BitActivation) -> BitActivation:
        shortcut = self._shortcut(x)
        if self.double_skip:
            x1 = self.conv1(x, shortcut, self.conv2.padding)
            return self.conv2(x1, x1.values, self.next_padding)
        x1 = self.conv1(x, None, self.conv2.padding)
        return self.conv2(x1, shortcut, self.next_padding)


def _sign_conv(layer: nn.Module, bn: nn.Module, nonlinearity: nn.Module, name: str) -> SignConv:
    """The packed conv ``layer`` with its scale, bias, alpha and BatchNorm ``bn`` folded into one affine map."""
    if not isinstance(layer, PackedBinaryLayer) or layer.linear:
        raise ValueError(f"{name}: chain_in_bits needs packed binary convs, got {type(layer).__name__}")
    if not layer._packing_binarizes:
        raise ValueError(f"{name}: method {layer.method.name!r} binarizes activations otherwise than sign; its bits cannot be chained")
    if not (isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and bn.running_mean is not None):
        raise ValueError(f"{name}: chain_in_bits folds a BatchNorm2d with running statistics after each binary conv")
    if not (isinstance(nonlinearity, nn.Hardtanh) and nonlinearity.min_val == -1.0 and nonlinearity.max_val == 1.0):
        raise ValueError(f"{name}: chain_in_bits needs hardtanh(-1, 1) after each binary conv, got {nonlinearity}")
    ones = torch.ones(layer.out_channels, dtype=torch.float64)
    scale = ones if layer.weight_scale is None else layer.weight_scale.double()
    shift = ones * 0 if layer.bias is None else layer.bias.double()
    if layer.alpha is not None:
        scale, shift = scale * layer.alpha.double(), shift * layer.alpha.double()
    gain = (ones if bn.weight is None else bn.weight.detach().double()) / torch.sqrt(bn.running_var.double() + bn.eps)
    beta = ones * 0 if bn.bias is None else bn.bias.detach().double()
    return SignConv(layer.packed_weights(), layer.stride, layer.padding, (scale * gain).numpy(), (shift * gain + beta - bn.running_mean.double() * gain).numpy())


def save_packed(model: nn.Module, path: str | Path) -> Path:
    """Write a packed model (from :func:`export_packed`) atomically; returns the path."""
    if not hasattr(model, "packed_layers") or not isinstance(getattr(model, "spec", None), ModelSpec):
        raise ValueError("save_packed expects a model from export_packed(model) built with bnnbench.build_model")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "spec": model.spec.to_dict(),
        "packed_layers": list(model.packed_layers),
        "state_dict": model.state_dict(),
    }
    atomic_write(path, lambda handle: torch.save(payload, handle))
    return Path(path)


def load_packed(path: str | Path) -> nn.Module:
    """Read a file written by :func:`save_packed` and return the packed model in eval mode.

    Version 1 files (written before model specs) record the network as ``bnn_config``."""
    payload = read_torch(path, "packed model", "write one with `bnnbench export RUN_DIR --packed`")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a bnnbench packed model (written by `bnnbench export --packed`)")
    version = payload.get("version")
    if version not in (1, VERSION):
        raise ValueError(f"{str(path)!r} has packed-model format version {version}; this bnnbench reads versions 1 and {VERSION}")
    try:
        spec = ModelSpec.from_legacy(payload["bnn_config"]) if version == 1 else ModelSpec.from_dict(payload["spec"])
    except UnknownMethodError as exc:
        raise ValueError(f"{exc}; a plugin method must be loaded first (bnnbench --plugin FILE.py ...)") from None
    model = export_packed(spec.build(stage=2))
    if model.packed_layers != payload["packed_layers"]:
        raise ValueError(f"{str(path)!r}: the rebuilt network packs layers {model.packed_layers}, the file {payload['packed_layers']}")
    model.load_state_dict(payload["state_dict"])
    return model
