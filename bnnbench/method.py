"""The binarizer interface: one object per method, hyper-parameters as dataclass fields.

A method binarizes the latent weights ``w`` and the activations ``a`` of every
binary layer (SPEC section 1).  Subclasses override the small hooks below; the
public calls ``weight`` and ``activation`` compose them so that the forward
value is the binary tensor and the autograd backward is the method's surrogate.

Weight path, stage 2 (both binary)::

    w_hat = pre_sign(w, p)                       # sin(w0 w) for BiPer, w for STE
    w_b   = surrogate_sign(w_hat, weight_derivative)
    out   = w_b * weight_scale(w)                # when the method has an analytic scale

The scale enters the backward by autograd (``scale_in_backward = True``: the
surrogate is multiplied by the scale, plus the scale's own derivative when it
is not detached) or multiplies the forward only (``False``: the backward of
``scale * sign`` is the surrogate alone, as upstream DoReFa and ReActNet do;
XNOR-Net writes its scale's share of the gradient into its surrogate).

Stage 1 (binary activations only) returns ``stage1_weight(w)``: ``w`` for most
methods, ``sin(w0 w)`` for BiPer (Eq. 10).

Training progress ``p`` reaches the hooks as a :data:`Progress`: a Python float, or the
0-dim float64 buffer a binary layer holds (so that a compiled model does not recompile when
it moves).  Schedules are written with torch operations on :func:`as_progress` ``(p)`` and
work for both.

Activation path: ``activation(a, progress=p, **params)``.  A method that needs
learnable per-layer tensors (ReActNet's per-channel threshold) returns their
initial values from ``activation_parameters``; every binary layer registers
them as parameters and passes them to ``activation`` as keyword arguments.

Per-layer tensors of the weight path (added for DSQ, LQ-Net and RBNN; any plugin may use them):

* ``weight_parameters(w)``: learnable tensors (DSQ's clipping bound and characteristic
  variable, RBNN's rotation angle), registered as ``layer.weight_params`` (a ParameterDict,
  trained by the optimiser like the weights);
* ``weight_state(w)``: tensors updated without gradients (LQ-Net's basis, RBNN's two
  rotation matrices), registered as buffers of the layer (in its ``state_dict``, so
  checkpoints and resumes keep them) and updated in place by ``update_state``, which the
  layer calls at two moments, without gradients: ``event="step"`` after every training
  forward has computed the binary weight (LQ-Net's moving average of the QEM solution) and
  ``event="progress"`` when :func:`bnnbench.set_progress` moves the training progress, i.e.
  at the start of every epoch (RBNN's alternating update of its rotations).

The layer passes both, as keyword arguments, to every weight hook that sees the latent
weights: ``weight``, ``binarize_weight``, ``pre_sign`` and ``weight_scale`` (diagnostics and
packed export call them the same way, through ``layer.weight_tensors()``).  A method without
them never receives keyword arguments, so the hooks of the methods above keep their
two-argument form.  ``straight_through(hard, soft)`` is the primitive for a method whose
backward is autograd's through a soft function (DSQ): the forward value of ``hard``, bit for
bit, and the gradient of ``soft`` to every tensor it depends on.

Extra loss terms.  ``regularizer(w, stage)`` is a term of one layer's latent weights (BiPer);
``activation_loss(a, stage, progress)`` is a term of one layer's *input activations* (the
real tensor the sign is applied to), which the layer evaluates in every training forward and
keeps until the next (RAD's distribution loss).  :func:`bnnbench.regularization_loss` adds
both kinds over the binary layers, the one loss term the training loop knows: weight terms are
summed over layers; activation terms are summed, or averaged over the layers when the
activation method's ``loss_reduction`` is ``"mean"``.  The recipe's regulariser switch turns
both on or off.  A training forward asks for the binarizer and the activation term in one call,
``activation_with_loss(a, stage, progress, **kwargs)`` (default: the term, then ``activation``),
so that a method may compute both in one autograd node (RAD's bfloat16 path).

Schedules of the training progress (IR-Net's t and k, ReCU's tau, ...) are methods decorated with
:func:`schedule`: evaluated once per value of a layer's progress buffer, not in every forward and
backward.

A loss over several layers' activations, against a teacher (added for LCR-BNN; any plugin may
use it).  A method with ``teacher = True`` trains against a frozen full-precision network of the
same backbone (a finished ``fp`` run, :mod:`bnnbench.teacher`).  Every backbone names its *block
features* (``model.feature_blocks()``: the modules whose outputs are compared, e.g. the stages of
a ResNet); in a training forward the student keeps those outputs, the teacher runs on the same
batch without gradients, and :func:`bnnbench.regularization_loss` adds
``feature_loss(student, teacher, stage, progress, **feature_params)``: ``student`` the student's
features (in the graph), ``teacher`` the teacher's (detached), ``feature_params`` the learnable
tensors of :meth:`Method.feature_parameters` (registered as ``model.feature_params``, trained with
the weights).  ``teacher_batch_statistics()`` says whether the teacher's BatchNorm normalises with
the batch's statistics (its running statistics are never updated) instead of its running ones.
The run's :class:`~bnnbench.runners.spec.RunSpec` names the teacher run (part of its identity).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from typing import Any, Callable, ClassVar, Union

import torch
from torch import Tensor

from .errors import ConfigError
from .standardize import fuses as fuses_standardization
from .standardize import standardized as fused_standardized
from .functional import (
    Derivative,
    ParametrizedSurrogate,
    approx_sign_derivative,
    identity_derivative,
    normalized_surrogate_sign,
    per_output_variance,
    surrogate_sign,
)

SCALES: tuple[str, ...] = (
    "none", "learned_alpha", "mean_abs_channel", "mean_abs_layer", "power_of_two",
    "learned_bound",  # a learned per-layer bound multiplies the binary weight (DSQ's clipping value u)
    "qem_basis",  # a per-channel basis fitted by quantization-error minimisation, not by gradient (LQ-Net)
)
LOSS_REDUCTIONS: tuple[str, ...] = ("sum", "mean")

Progress = Union[float, Tensor]
"""Training progress p in [0, 1]: a float, or a binary layer's 0-dim float64 buffer."""


def as_progress(progress: Progress) -> Tensor:
    """``progress`` as a 0-dim float64 tensor (the buffer itself when it is one), for schedule arithmetic."""
    return progress if isinstance(progress, Tensor) else torch.tensor(float(progress), dtype=torch.float64)


def scheduled(progress: Progress, value: Tensor) -> Progress:
    """A schedule's ``value`` (computed from :func:`as_progress`) in the kind ``progress`` came as:
    a float for a float, the 0-dim tensor for a layer's buffer."""
    return value if isinstance(progress, Tensor) else float(value)


_SCHEDULES: weakref.WeakKeyDictionary[Tensor, dict] = weakref.WeakKeyDictionary()
"""Per progress buffer (alive), the schedules kept for it: a copy of a layer is a new buffer, with none."""


def schedule(function: Callable[[Any, Progress], Any]) -> Callable[[Any, Progress], Any]:
    """A method's schedule of the training progress (``t(p)``, ``k(p)``, ...), kept on a layer's progress buffer:
    evaluated once per value the buffer holds (its version: :func:`bnnbench.set_progress` fills it in place), not
    in every forward and backward of every layer, which cost some 5-10 small operators a call.  Keyed by the function
    and the method's hyper-parameters, on which alone the value depends besides p; a float progress, or a method
    whose hyper-parameters do not hash, is evaluated every time, as inside torch.compile."""

    @functools.wraps(function)
    def kept(self: Any, progress: Progress) -> Any:
        if not isinstance(progress, Tensor) or torch.compiler.is_compiling():
            return function(self, progress)
        key = (function, *(getattr(self, field.name) for field in dataclasses.fields(self)))
        try:
            memo = _SCHEDULES.setdefault(progress, {})
            hit = memo.get(key)
        except TypeError:  # an unhashable hyper-parameter
            return function(self, progress)
        if hit is not None and hit[0] == progress._version:
            return hit[1]
        value = function(self, progress)
        memo[key] = (progress._version, value)
        return value

    return kept


@dataclasses.dataclass
class Method:
    """Base binarizer: sign with the straight-through estimator on both paths.

    Class attributes document the method (shown by ``bnnbench list``);
    dataclass fields are its hyper-parameters, settable through
    ``bnnbench.get_method(name, **hparams)``.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    weight_forward: ClassVar[str] = "sign(w)"
    weight_backward: ClassVar[str] = "1"
    activation_forward: ClassVar[str] = "sign(a)"
    activation_backward: ClassVar[str] = "max(0, 2 - 2|a|)"
    scale: ClassVar[str] = "none"
    binary_weights: ClassVar[bool] = True
    binary_activations: ClassVar[bool] = True
    # Upstream BiPer and ReCU evaluate the activation surrogate on a per-sample
    # variance-normalised input; methods set their default here.
    default_act_norm: ClassVar[bool] = False
    # False: the analytic scale multiplies the forward only (see module docstring).
    scale_in_backward: ClassVar[bool] = True
    # How regularization_loss combines the layers' activation_loss terms: "sum" or "mean".
    loss_reduction: ClassVar[str] = "sum"
    # Hyper-parameters that must be finite and > 0 (a frequency, a temperature, ...).
    positive: ClassVar[tuple[str, ...]] = ()
    # True: trains against a frozen full-precision teacher of the same backbone (feature_loss).
    teacher: ClassVar[bool] = False
    # True: the method's own bfloat16 formulas follow functional.formulas(bf16=...) (RAD's moments, DSQ, IR-Net's
    # standardisation, ReActNet's shifted sign: functional.surrogate_sign with a shift), as act_norm and learned alpha
    # do; a run records the choice (layers.takes_fused_formulas).
    takes_bf16_formulas: ClassVar[bool] = False
    # True: its own float32 formulas follow them too (functional.formulas(fp32=...): RAD's moments, DSQ, FDA, ...).
    takes_fp32_formulas: ClassVar[bool] = False
    # True: the activation's forward is functional.sign(a) of the layer's input a itself (any backward), so the
    # hardtanh before the layer makes those signs in its own pass and hands them over (functional.hardtanh_).  A method
    # whose forward is another function sets False (ReActNet's sign(a + beta)): signs made for it would go unused.
    signs_its_input: ClassVar[bool] = True
    # True: the method's own kernels take channels_last activations as they take contiguous ones (every built-in
    # method's: functional.surrogate_sign's with or without a shift, act_norm's, DSQ's and RAD's loop over each sample
    # in memory order).  A plugin whose own kernels need contiguous (N, C, ...) rows sets False: a run's channels_last
    # default then stays off on the CPU (runners.train.resolve_channels_last), where its kernels would otherwise fall
    # back to torch's formulas (RAD's did before they took channels_last: 2.7x fp's step, README "Training speed").
    channels_last_kernels: ClassVar[bool] = True
    # The activation surrogate d sign(a)/da as a function of a alone: Bi-Real's ApproxSign (Eq. 7) unless a method
    # names another (staticmethod(clip_derivative), ...).  surrogate_sign receives the function itself, so the
    # one-pass backwards it knows apply (functional: ApproxSign, clipped STE, and the STE handing the gradient on).
    # A surrogate that depends on the training progress or a hyper-parameter overrides activation_derivative.
    activation_surrogate: ClassVar[Derivative] = staticmethod(approx_sign_derivative)

    def __post_init__(self) -> None:
        """Refuse out-of-range hyper-parameters when the method is made (subclasses call this first)."""
        for name in self.positive:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"method {self.name!r}: hyper-parameter {name}={value!r} must be a positive number (--hp {name}=...)")

    # ----------------------------------------------------------------- weights
    def pre_sign(self, w: Tensor, progress: Progress, **tensors: Tensor) -> Tensor:
        """The real tensor the sign is applied to (``w_hat``, used for QE, Eq. 15).

        ``tensors``: the layer's ``weight_params``/``weight_state`` (only for methods that have them)."""
        return w

    def weight_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        """Surrogate d sign(x)/dx at the pre-sign value ``x``."""
        return identity_derivative(x)

    def weight_scale(self, w: Tensor, **tensors: Tensor) -> Tensor | None:
        """Analytic scale multiplied onto the binary weight (None: no scale).

        ``tensors``: the layer's ``weight_params``/``weight_state`` (only for methods that have them)."""
        return None

    def stage1_weight(self, w: Tensor) -> Tensor:
        """The weight used while only activations are binary (stage 1)."""
        return w

    def binarize_weight(self, w: Tensor, progress: Progress = 0.0, **tensors: Tensor) -> Tensor:
        """+-1 weights whose backward is the method's surrogate (no scale).

        ``tensors``: the layer's ``weight_params`` and ``weight_state`` (none for most methods)."""
        derivative = (  # the function itself where not overridden (the STE hands the gradient on)
            identity_derivative if type(self).weight_derivative is Method.weight_derivative else lambda x: self.weight_derivative(x, progress)
        )
        return surrogate_sign(self.pre_sign(w, progress, **tensors), derivative)

    def weight(self, w: Tensor, progress: Progress = 0.0, stage: int = 2, **tensors: Tensor) -> Tensor:
        """Forward weight of a binary layer at training progress ``progress`` in [0, 1].

        ``tensors``: the layer's ``weight_params`` and ``weight_state``, passed on to
        ``binarize_weight`` and ``weight_scale`` (none for most methods)."""
        _check_stage(stage)
        if stage == 1 or not self.binary_weights:
            return self.stage1_weight(w)
        binary = self.binarize_weight(w, progress, **tensors)
        scale = self.weight_scale(w, **tensors)
        if scale is None:
            return binary
        return binary * scale if self.scale_in_backward else forward_only_scale(binary, scale)

    # ------------------------------------------------- per-layer tensors of the weight path
    def weight_parameters(self, w: Tensor) -> dict[str, Tensor]:
        """Initial values of learnable per-layer tensors of the weight path, from the layer's
        initial latent weights ``w`` (shape ``(C_out, C_in, kh, kw)`` or ``(out, in)``).

        A binary layer registers each as ``layer.weight_params[name]`` (trained with the
        weights) and passes them to the weight hooks as keyword arguments."""
        return {}

    def weight_state(self, w: Tensor) -> dict[str, Tensor]:
        """Initial values of per-layer tensors of the weight path that no gradient trains.

        A binary layer registers each as a buffer (kept in its ``state_dict``), passes them to
        the weight hooks as keyword arguments and lets :meth:`update_state` change them."""
        return {}

    def update_state(self, w: Tensor, progress: Progress, stage: int, event: str, **tensors: Tensor) -> None:
        """Update the layer's ``weight_state`` tensors in place (called without gradients).

        ``event`` is ``"step"`` after a training forward computed the binary weight, or
        ``"progress"`` when ``set_progress`` moved the training progress (start of an epoch).
        ``tensors`` holds the layer's ``weight_params`` and ``weight_state``."""
        return None

    # ------------------------------------------------------------- activations
    def activation_derivative(self, x: Tensor, progress: Progress) -> Tensor:
        """Surrogate d sign(a)/da: :attr:`activation_surrogate` unless overridden."""
        return self.activation_surrogate(x)

    def activation_formula(self, progress: Progress) -> tuple[Callable[..., float], Callable[[], tuple[float, ...]]] | None:
        """An overridden :meth:`activation_derivative` as a float32 scalar formula and a function giving its parameters
        at ``progress`` (:class:`~bnnbench.functional.ParametrizedSurrogate`), which act_norm's fused backward
        evaluates in its own sweep; None (the default): torch evaluates the surrogate there, one pass more."""
        return None

    def activation(self, a: Tensor, progress: Progress = 0.0, normalize: float | None = None) -> Tensor:
        """Binary activations sign(a) (+-1 values: the layer stores them in 1 bit each) with the method's surrogate backward.

        ``normalize=eps`` evaluates the surrogate at a / sqrt(var_{C,H,W}(a) + eps) per sample, the
        gradient flowing through the variance (``act_norm`` in training; the forward is unchanged).
        Methods with :meth:`activation_parameters` accept them here as keyword arguments (e.g.
        ``activation(a, progress=p, beta=beta)``) and refuse ``act_norm``.
        """
        if not self.binary_activations:
            return a
        derivative = (  # the function itself where not overridden: the fused backwards know their formulas
            self.activation_surrogate
            if type(self).activation_derivative is Method.activation_derivative
            else lambda x: self.activation_derivative(x, progress)
        )
        if normalize is None:
            return surrogate_sign(a, derivative)
        if derivative is not self.activation_surrogate and (formula := self.activation_formula(progress)) is not None:
            derivative = ParametrizedSurrogate(derivative, *formula)
        return normalized_surrogate_sign(a, derivative, normalize)

    def activation_parameters(self, in_channels: int, spatial_dims: int) -> dict[str, Tensor]:
        """Initial values of learnable per-layer tensors that :meth:`activation` takes.

        ``in_channels`` is the layer's input channels (features for a linear
        layer) and ``spatial_dims`` the number of trailing input dimensions
        after the channel one (2 for Conv2d, 0 for Linear), so a per-channel
        tensor has shape ``(in_channels, 1, ..., 1)`` and broadcasts against
        the input.  A binary layer registers each as ``layer.activation_params[name]``.
        """
        return {}

    # ------------------------------------------------------------------ extras
    def regularizer(self, w: Tensor, stage: int) -> Tensor | None:
        """Extra loss term of one layer's latent weights (None: no term)."""
        return None

    def activation_loss(self, a: Tensor, stage: int, progress: Progress) -> Tensor | None:
        """Extra loss term of one layer's real input activations ``a`` (None: no term).

        Evaluated by the layer of this activation method in every training forward (before
        ``act_norm``), kept until the next, and combined over layers by
        :func:`bnnbench.regularization_loss` as ``loss_reduction`` says."""
        return None

    def activation_with_loss(self, a: Tensor, stage: int, progress: Progress = 0.0, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        """``(activation(a, progress=progress, **kwargs), activation_loss(a, stage, progress))``, the loss evaluated
        first, as a training forward of a layer with an activation loss asks for them: one call, so that a method
        computing both in one node can (RAD's bfloat16 path)."""
        loss = self.activation_loss(a, stage, progress)
        return self.activation(a, progress=progress, **kwargs), loss

    # ------------------------------------------------------------- teacher
    def feature_parameters(self, num_features: int) -> dict[str, Tensor]:
        """Initial values of learnable tensors of the feature loss, for a backbone with
        ``num_features`` block features (registered as ``model.feature_params``)."""
        return {}

    def feature_loss(self, student: list[Tensor], teacher: list[Tensor], stage: int, progress: Progress, **params: Tensor) -> Tensor | None:
        """Loss term of the student's block features against the teacher's (None: no term).

        Only methods with ``teacher = True`` are asked; ``teacher`` holds detached tensors of the
        same shapes as ``student``; ``params`` are the model's ``feature_params``."""
        return None

    def teacher_batch_statistics(self) -> bool:
        """True: the teacher's BatchNorm uses the batch's statistics (as a network in training
        mode, without updating its running ones); False: its running statistics (eval mode)."""
        return False

    def schedule(self, progress: Progress) -> dict[str, float]:
        """Values of the scheduled hyper-parameters at ``progress`` (for logs)."""
        return {}

    # ------------------------------------------------------------- description
    @classmethod
    def hparam_defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def hparams(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> dict[str, Any]:
        """Everything a results file needs to reproduce this binarizer."""
        return {
            "name": self.name,
            "hparams": self.hparams(),
            "scale": self.scale,
            "weight_forward": self.weight_forward,
            "weight_backward": self.weight_backward,
            "activation_forward": self.activation_forward,
            "activation_backward": self.activation_backward,
            "paper": self.paper,
        }


class _ForwardOnlyScale(torch.autograd.Function):
    """Forward ``x * scale``; backward passes the gradient to ``x`` unchanged."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        return x * scale

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        return grad_output, None


class _StraightThrough(torch.autograd.Function):
    """Forward ``hard``; backward the incoming gradient to ``soft``."""

    @staticmethod
    def forward(ctx, soft: Tensor, hard: Tensor) -> Tensor:  # type: ignore[override]
        return hard.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        return grad_output, None


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """The value of ``hard`` (exactly: not ``soft + (hard - soft).detach()``, which rounds) with the
    gradient of ``soft``: d out / d soft := 1, nothing to ``hard``.  Shapes must agree."""
    if hard.shape != soft.shape:
        raise ValueError(f"straight_through: hard {tuple(hard.shape)} and soft {tuple(soft.shape)} differ in shape")
    return _StraightThrough.apply(soft, hard)


def forward_only_scale(x: Tensor, scale: Tensor) -> Tensor:
    """``x * scale`` whose backward ignores the scale: d out / d x := 1, no gradient to ``scale``.

    ``scale`` must broadcast to ``x``'s shape (a per-channel or scalar scale).
    """
    if torch.broadcast_shapes(x.shape, scale.shape) != x.shape:
        raise ValueError(f"scale of shape {tuple(scale.shape)} does not broadcast to the weight's shape {tuple(x.shape)}")
    return _ForwardOnlyScale.apply(x, scale)


def _check_stage(stage: int) -> None:
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 (binary activations) or 2 (binary weights and activations), got {stage!r}")


def mean_abs(w: Tensor, dims: tuple[int, ...]) -> Tensor:
    """E|w| over ``dims`` kept for broadcasting."""
    return w.abs().mean(dim=dims, keepdim=True)


def per_output_dims(w: Tensor) -> tuple[int, ...]:
    """All dimensions but the output-channel one (dim 0)."""
    return tuple(range(1, w.dim()))


def standardized(w: Tensor) -> Tensor:
    """(w - mean_c(w)) / std_c(w - mean_c(w)) per output channel c, the std unbiased and without eps (IR-Net's
    and RBNN's weights, as upstream); torch's values and gradients (:func:`~bnnbench.functional.per_output_variance`),
    or one node computing in float64 under bfloat16 autocast with the fused formulas (:mod:`bnnbench.standardize`)."""
    if fuses_standardization(w):
        return fused_standardized(w)
    centered = w - w.mean(dim=per_output_dims(w), keepdim=True)
    return centered / per_output_variance(centered, root=True)


__all__ = [
    "LOSS_REDUCTIONS", "Method", "Progress", "SCALES", "as_progress", "forward_only_scale", "mean_abs", "per_output_dims", "standardized",
    "schedule", "scheduled", "straight_through",
]
