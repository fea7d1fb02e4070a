"""Block features and the frozen teacher of a method with ``teacher = True`` (LCR-BNN).

Block features
--------------
Every backbone names the modules whose outputs are its *block features* with
``model.feature_blocks()`` (a list, input side first): the stages of a ResNet (the output of
each stage's last block, after its non-linearity) and the three pooled groups of VGG-Small (the
output of the non-linearity after each max-pool).  A student and a teacher of one backbone have
the same number of features with the same shapes.

Student and teacher
-------------------
:func:`prepare_student` (called by :meth:`ModelSpec.build` for a teacher method) registers the
method's ``feature_parameters`` as ``model.feature_params`` and forward hooks that keep the
block outputs of every training forward; the model carries a :class:`TeacherLink` as
``model.teacher_link``.  :func:`attach_teacher` gives it the teacher: a full-precision network of
the same backbone, frozen (``requires_grad`` off; never in the optimiser, never in the student's
``state_dict``), in eval mode, or, when the method's ``teacher_batch_statistics()`` is true, with
its BatchNorm layers normalising by the batch's statistics without updating their running ones.
In every training forward of the student the teacher runs on the same input under
``torch.no_grad`` (and the caller's autocast), and :func:`bnnbench.regularization_loss` adds
:meth:`TeacherLink.loss`, the method's ``feature_loss``.  In eval mode neither keeps features
and the teacher does not run.  A teacher method without an attached teacher adds no feature term
(the training loop always attaches the run's teacher, :mod:`bnnbench.runners.teachers`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .method import Method, Progress


def feature_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are ``model``'s block features, or a ConfigError naming the backbone."""
    blocks = getattr(model, "feature_blocks", None)
    if blocks is None:
        raise ConfigError(
            f"network {type(model).__name__} names no block features (a feature_blocks() method); "
            "a method with a teacher needs them: add feature_blocks() to the backbone"
        )
    return list(blocks())


class TeacherLink:
    """The student's kept block features, its teacher and the teacher's features (see the module docstring)."""

    def __init__(self, model: nn.Module, method: Method) -> None:
        self.method = method
        self.teacher: nn.Module | None = None
        self.student_features: list[Tensor] = []
        self.teacher_features: list[Tensor] = []
        self._teacher_hooks: list[Any] = []
        model.register_forward_pre_hook(self._before_forward)
        for block in feature_blocks(model):
            block.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if module.training:
            self.student_features.append(output)

    def _before_forward(self, model: nn.Module, inputs: tuple[Any, ...]) -> None:
        self.student_features.clear()
        self.teacher_features.clear()
        if not model.training or self.teacher is None:
            return
        with torch.no_grad():
            self.teacher(*inputs)  # its block hooks (attach) fill teacher_features

    def _keep_teacher(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self.teacher_features.append(output.detach())

    def attach(self, teacher: nn.Module) -> None:
        blocks = feature_blocks(teacher)
        teacher.requires_grad_(False)
        teacher.eval()
        if self.method.teacher_batch_statistics():
            for module in teacher.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train()
                    module.track_running_stats = False  # batch statistics, running ones left as they are
        for hook in self._teacher_hooks:  # a second attach replaces the first teacher
            hook.remove()
        self._teacher_hooks = [block.register_forward_hook(self._keep_teacher) for block in blocks]  # once, not per step
        self.teacher = teacher

    def loss(self, stage: int, progress: Progress, params: dict[str, Tensor]) -> Tensor | None:
        """The method's feature loss of the last training forward (None without a teacher or features)."""
        if self.teacher is None or not self.student_features:
            return None
        if len(self.teacher_features) != len(self.student_features):
            raise RuntimeError(f"the teacher gave {len(self.teacher_features)} block features, the student {len(self.student_features)}")
        for s, t in zip(self.student_features, self.teacher_features):
            if s.shape != t.shape:
                raise ConfigError(f"teacher feature of shape {tuple(t.shape)} against the student's {tuple(s.shape)}: the teacher must have the student's backbone")
        return self.method.feature_loss(list(self.student_features), list(self.teacher_features), stage, progress, **params)


def prepare_student(model: nn.Module, method: Method) -> None:
    """Give a model whose weight method has ``teacher = True`` its ``feature_params`` and :class:`TeacherLink`."""
    count = len(feature_blocks(model))
    model.feature_params = nn.ParameterDict({name: nn.Parameter(value) for name, value in method.feature_parameters(count).items()})
    model.teacher_link = TeacherLink(model, method)


def teacher_link(model: nn.Module) -> TeacherLink | None:
    """The model's :class:`TeacherLink` (None for a method without a teacher)."""
    link = getattr(model, "teacher_link", None)
    return link if isinstance(link, TeacherLink) else None


def attach_teacher(model: nn.Module, teacher: nn.Module) -> None:
    """Freeze ``teacher`` and let ``model`` (built for a teacher method) train against it."""
    link = teacher_link(model)
    if link is None:
        raise ConfigError("this model's method has no teacher (Method.teacher is False): nothing to attach it to")
    mine, theirs = backbone(model), backbone(teacher)
    if mine != theirs:
        raise ConfigError(f"the teacher is a {theirs}, the student a {mine}: a teacher must have the student's backbone")
    link.attach(teacher)


def backbone(model: nn.Module) -> str:
    """What a teacher must share with its student: the network (family, name, classes, options, from
    ``model.spec`` when the model has one) and its number of block features."""
    spec = getattr(model, "spec", None)
    if spec is None:
        return f"{type(model).__name__} with {len(feature_blocks(model))} block features"
    return f"{spec.family}/{spec.net} ({spec.num_classes} classes, options {dict(spec.options)})"


def feature_loss(model: nn.Module, stage: int, progress: Progress) -> Tensor | None:
    """The feature term of ``model``'s last training forward (None when there is none)."""
    link = teacher_link(model)
    if link is None:
        return None
    params = dict(model.feature_params.items()) if hasattr(model, "feature_params") else {}
    return link.loss(stage, progress, params)


__all__ = ["TeacherLink", "attach_teacher", "backbone", "feature_blocks", "feature_loss", "prepare_student", "teacher_link"]
