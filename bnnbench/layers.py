"""Binary layers: ``BinaryConv2d`` and ``BinaryLinear`` take a weight and an activation binarizer.

``method`` binarizes the weights and ``act_method`` (default: the same method) the inputs,
as larq's layers take a kernel and an input quantizer.  Forward of a binary layer (stage 2)::

    a_b = act_method.activation(a0, **activation_params)
                                     a0 = a / sqrt(var_{C,H,W}(a) + 1e-5) per sample
                                     in training when act_norm (upstream BiPer/ReCU),
                                     a otherwise; a positive per-sample scale, so
                                     sign(a0) = sign(a): the forward is unchanged
    w_b = method.weight(w)           sign with the method's surrogate and scale
    y   = conv(a_b, w_b) * alpha     alpha: learned per output channel when the
                                     method's scale is "learned_alpha"; the conv
                                     keeps its +-1 input a_b in 1 bit each for the backward
                                     (``functional.conv2d_of_signs``), and act_norm keeps
                                     only a and the per-sample scale
                                     (``functional.normalized_surrogate_sign``): the
                                     same gradients, bit for bit, in less memory
        = conv(a_b, w_b * alpha)     with bfloat16's fused formulas (the default;
                                     float32's scale in the conv: :meth:`scale_placement`)

``activation_params`` are the learnable per-layer tensors the activation method asks for
through ``Method.activation_parameters`` (ReActNet's per-channel threshold);
they live in ``layer.activation_params`` and exist only when the layer's
activations are binary.  The weight method's per-layer tensors (``Method.weight_parameters``,
``Method.weight_state``) live in ``layer.weight_params`` and in buffers named
``weight_state_<name>``; ``layer.weight_tensors()`` gives both, by name, as the weight hooks
take them.  In a training forward the layer calls ``method.update_state(..., event="step")``
after computing the binary weight, and evaluates ``act_method.activation_loss`` on its input, with the
binarizer in one call (``Method.activation_with_loss``; kept as ``layer.activation_loss_term`` for
:func:`regularization_loss`); :func:`set_progress`
calls ``update_state(..., event="progress")``.  A method with such a threshold refuses ``act_norm``:
sign(a0 + beta) would differ from sign(a + beta), so training and evaluation
would run different networks.

Training progress ``p`` (for schedules) is a 0-dim float64 buffer of every layer, set for a
whole model with :func:`set_progress`: its value changes every epoch, its identity never, so
a ``torch.compile``-d model does not recompile when it moves.  The methods' hooks receive it as
that tensor.  The stage is a plain attribute set with :func:`set_stage`: it changes once per
run, which costs a compiled model one recompile, while a tensor stage would cost either a host
synchronisation or both weight paths on every step.  Neither is part of the ``state_dict``
(checkpoints record stage and epoch, and the loop sets both).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional
from .errors import ConfigError
from .method import Method
from .registry import get_method
from .teacher import feature_loss

ACT_NORM_EPS = 1e-5


def resolve_method(method: str | Method) -> Method:
    """A method object from a name or an instance."""
    return get_method(method) if isinstance(method, str) else method


def check_act_norm(method: Method, act_norm: bool) -> None:
    """act_norm and a learned activation threshold exclude each other: sign(a0 + beta) != sign(a + beta)."""
    learned = method.activation_parameters(1, 2) if method.binary_activations else {}
    if learned and act_norm:
        raise ConfigError(
            f"method {method.name!r} learns activation parameters ({', '.join(learned)}); act_norm would change "
            "its forward (sign(a0 + beta) != sign(a + beta)): use --no-act-norm"
        )


class _BinaryMixin:
    """What BinaryConv2d and BinaryLinear share; ``weight`` comes from the torch layer."""

    weight: Tensor
    training: bool

    def _setup_binary(
        self,
        method: str | Method,
        act_method: str | Method | None,
        in_features: int,
        out_features: int,
        spatial_dims: int,
        stage: int,
        act_norm: bool | None,
        binary_activations: bool,
    ) -> None:
        self.method = resolve_method(method)
        self.act_method = self.method if act_method is None else resolve_method(act_method)
        if not binary_activations:
            self.act_method = get_method("fp")
        self.stage = stage
        self.register_buffer("progress", torch.zeros((), dtype=torch.float64), persistent=False)  # type: ignore[attr-defined]
        self.binary_activations = self.act_method.binary_activations
        self.act_norm = (self.act_method.default_act_norm if act_norm is None else act_norm) and self.binary_activations
        if self.method.scale == "learned_alpha":
            # upstream BiPer/ReCU initialise alpha uniformly in [0, 1)
            self.alpha = nn.Parameter(torch.rand(out_features, *([1] * spatial_dims)))
        else:
            self.register_parameter("alpha", None)  # type: ignore[attr-defined]
        check_act_norm(self.act_method, self.act_norm)
        initial = self.act_method.activation_parameters(in_features, spatial_dims) if self.binary_activations else {}
        self.activation_params = nn.ParameterDict({name: nn.Parameter(value) for name, value in initial.items()})
        with torch.no_grad():
            weight = self.weight.detach()
            learned = self.method.weight_parameters(weight) if self.method.binary_weights else {}
            state = self.method.weight_state(weight) if self.method.binary_weights else {}
        self.weight_params = nn.ParameterDict({name: nn.Parameter(value.clone()) for name, value in learned.items()})
        self.weight_state_names = tuple(state)
        for name, value in state.items():
            self.register_buffer(f"weight_state_{name}", value.clone())  # type: ignore[attr-defined]
        self._updates_state = type(self.method).update_state is not Method.update_state
        self._activation_loss = self.binary_activations and type(self.act_method).activation_loss is not Method.activation_loss
        self.activation_loss_term: Tensor | None = None

    @property
    def binary_weights(self) -> bool:
        """True when the forward weight is +-1 (times a scale): stage 2 of a binary method."""
        return self.method.binary_weights and self.stage == 2

    def weight_tensors(self) -> dict[str, Tensor]:
        """The weight method's per-layer tensors by name: ``weight_params`` and ``weight_state`` (usually none)."""
        tensors: dict[str, Tensor] = dict(self.weight_params.items())
        for name in self.weight_state_names:
            tensors[name] = getattr(self, f"weight_state_{name}")
        return tensors

    def update_state(self, event: str) -> None:
        """Let the weight method update its per-layer state (``Method.update_state``), without gradients."""
        if self._updates_state:
            with torch.no_grad():
                self.method.update_state(self.weight.detach(), self.progress, self.stage, event, **self.weight_tensors())

    def scale_placement(self, x: Tensor) -> str:
        """Where alpha multiplies (none: "output"): "output", "weight" or "conv", by the formulas of the conv's dtype
        (:func:`bnnbench.functional.fused_formulas`).

        * "output": ``y * alpha`` (:meth:`scale_output`), torch's formulas: the reference numbers, bit for bit.
        * "weight" (bfloat16's fused formulas, a layer without bias): conv(a, w * alpha) = conv(a, w) * alpha per
          output channel, and in bfloat16 the left side is the more exact: a stage-2 layer's products are +-alpha
          (bfloat16: 8 significant bits) and every partial sum an integer multiple of it, exact in the conv's
          float32 accumulator, so the output is y alpha rounded once, where ``y * alpha`` rounds the integer y to
          bfloat16 first, then the product.  It costs a pass over the weight instead of two over the output
          (forward, backward) and the per-channel sum of grad y.
        * "conv" (float32's fused formulas, a conv without bias on binary inputs): the conv scales its own output
          in place and folds alpha into its backward's weight (:func:`bnnbench.functional.conv2d_of_signs`): the
          forward's numbers are the reference's, the backward a few units in the last place from them, without
          its pass over the output's gradient.  In float32 alpha in the weight would not be exact: the partial
          sums of +-alpha (24 significant bits) round, and a stage-2 output that is exactly 0 (frequent: an even
          number of +-1 products) would come out +-1 ulp, its sign after the BatchNorm then a coin toss."""
        if self.alpha is None or self.bias is not None:
            return "output"
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        if not functional.fused_formulas(dtype):
            return "output"
        if dtype == torch.bfloat16:
            return "weight"
        return "conv" if isinstance(self, BinaryConv2d) and self.convolves_signs else "output"

    def forward_weight(self, fold_scale: bool = False) -> Tensor:
        """The weight the layer computes with: the method's (binary in stage 2), times alpha with ``fold_scale``."""
        tensors = self.weight_tensors()
        w = self.method.weight(self.weight, progress=self.progress, stage=self.stage, **tensors)
        if self.training and self._updates_state:
            self.update_state("step")
        return w * self.alpha.reshape(-1, *([1] * (w.dim() - 1))) if fold_scale else w

    def forward_input(self, x: Tensor) -> Tensor:
        if not self.binary_activations:
            return x
        normalize = {"normalize": ACT_NORM_EPS} if self.act_norm and self.training else {}
        if self._activation_loss and self.training:
            out, self.activation_loss_term = self.act_method.activation_with_loss(x, self.stage, self.progress, **normalize, **self.activation_params)
            return out
        self.activation_loss_term = None
        return self.act_method.activation(x, progress=self.progress, **normalize, **self.activation_params)

    def scale_output(self, y: Tensor, folded: bool = False) -> Tensor:
        """``y * alpha`` in y's dtype (y itself where there is no alpha or it is ``folded`` into the weight or conv): a
        float32 alpha would promote every later activation to float32.  The backward keeps the product (which
        the BatchNorm after keeps anyway) instead of y where y, an integer in stage 2, can be recovered from it
        bit for bit (:func:`bnnbench.functional.scale_channels`)."""
        return y if self.alpha is None or folded else functional.scale_channels(y, self.alpha.to(y.dtype))

    def regularization(self) -> Tensor | None:
        return self.method.regularizer(self.weight, self.stage)

    def binary_repr(self) -> str:
        acts = "" if self.act_method is self.method else f", act_method={self.act_method.name}"
        return f"method={self.method.name}{acts}, stage={self.stage}, act_norm={self.act_norm}, binary_activations={self.binary_activations}"

    alpha: nn.Parameter | None
    bias: Tensor | None
    activation_params: nn.ParameterDict
    progress: Tensor


class BinaryConv2d(_BinaryMixin, nn.Conv2d):
    """A 2-D convolution whose weights and inputs a method binarizes."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        method: str | Method,
        act_method: str | Method | None = None,
        stage: int = 2,
        act_norm: bool | None = None,
        binary_activations: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self._setup_binary(method, act_method, in_channels, out_channels, 2, stage, act_norm, binary_activations)

    @property
    def convolves_signs(self) -> bool:
        """True where the inputs are +-1 and the conv keeps them for the backward in 1 bit each (``conv2d_of_signs``)."""
        return self.binary_activations and self.padding_mode == "zeros"

    def forward(self, x: Tensor) -> Tensor:
        placement = self.scale_placement(x)
        a, w = self.forward_input(x), self.forward_weight(placement == "weight")
        if self.convolves_signs:
            scale = self.alpha.to(x.dtype) if placement == "conv" else None
            y = functional.conv2d_of_signs(a, w, self.bias, self.stride, self.padding, self.dilation, self.groups, scale)
        else:
            y = self._conv_forward(a, w, self.bias)
        return self.scale_output(y, placement != "output")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.binary_repr()}"


class BinaryLinear(_BinaryMixin, nn.Linear):
    """A fully connected layer whose weights and inputs a method binarizes."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        method: str | Method,
        act_method: str | Method | None = None,
        stage: int = 2,
        act_norm: bool | None = None,
        binary_activations: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self._setup_binary(method, act_method, in_features, out_features, 0, stage, act_norm, binary_activations)

    def forward(self, x: Tensor) -> Tensor:
        placement = self.scale_placement(x)
        return self.scale_output(F.linear(self.forward_input(x), self.forward_weight(placement == "weight"), self.bias), placement != "output")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.binary_repr()}"


BinaryLayer = (BinaryConv2d, BinaryLinear)


def binary_layers(model: nn.Module) -> Iterator[tuple[str, BinaryConv2d | BinaryLinear]]:
    """(name, layer) for every binary layer of ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, BinaryLayer):
            yield name, module


def takes_fused_formulas(model: nn.Module, dtype: torch.dtype) -> bool:
    """True where :func:`bnnbench.functional.formulas` changes the model's numbers in ``dtype``: a layer with act_norm
    or alpha, or whose method says so (:attr:`~bnnbench.method.Method.takes_bf16_formulas`,
    :attr:`~bnnbench.method.Method.takes_fp32_formulas`)."""
    flag = "takes_bf16_formulas" if dtype == torch.bfloat16 else "takes_fp32_formulas"
    return any(
        layer.act_norm or layer.alpha is not None or getattr(layer.method, flag) or getattr(layer.act_method, flag)
        for _, layer in binary_layers(model)
    )


def channels_last_kernels(model: nn.Module) -> bool:
    """True where every binary layer's methods take channels_last activations in their kernels
    (:attr:`~bnnbench.method.Method.channels_last_kernels`): a channels_last model runs none of their torch formulas."""
    return all(layer.method.channels_last_kernels and layer.act_method.channels_last_kernels for _, layer in binary_layers(model))


def set_progress(model: nn.Module, progress: float) -> None:
    """Set training progress p = epoch / epochs in [0, 1] on every binary layer.

    The training loop calls it at the start of every epoch; a weight method with per-layer state
    updates it then (``Method.update_state(..., event="progress")``: RBNN's rotations, DSQ's
    first bound), so call it to move the training forward, not merely to read a schedule."""
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must lie in [0, 1], got {progress}")
    for _, layer in binary_layers(model):
        layer.progress.fill_(float(progress))
        layer.update_state("progress")


def set_stage(model: nn.Module, stage: int) -> None:
    """Switch every binary layer to stage 1 (binary activations) or 2 (all binary)."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    for _, layer in binary_layers(model):
        layer.stage = stage


def regularization_loss(model: nn.Module) -> Tensor | None:
    """The methods' extra loss terms over binary layers (None when there are none).

    Weight terms (``Method.regularizer``) are summed over layers.  Activation terms
    (``Method.activation_loss``, kept by each layer from its last training forward) are summed,
    or averaged over the layers that have one where the activation method's ``loss_reduction``
    is ``"mean"`` (RAD averages its distribution loss over layers).  For a method with a teacher,
    the feature loss of the last training forward against it is added too
    (:func:`bnnbench.teacher.feature_loss`, at the first binary layer's stage and progress)."""
    terms, averaged = [], []
    first = None
    for _, layer in binary_layers(model):
        first = layer if first is None else first
        if (t := layer.regularization()) is not None:
            terms.append(t)
        if (t := layer.activation_loss_term) is not None:
            (averaged if layer.act_method.loss_reduction == "mean" else terms).append(t)
    if averaged:
        terms.append(torch.stack(averaged).mean())
    if first is not None and (t := feature_loss(model, first.stage, first.progress)) is not None:
        terms.append(t)
    return torch.stack(terms).sum() if terms else None
