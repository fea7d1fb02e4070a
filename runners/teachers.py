"""The teacher run of a method with a teacher (``Method.teacher``: LCR-BNN): find it, load it.

A student run's :class:`~.spec.RunSpec` names its teacher run (``spec.teacher_spec``, part of
the student's signature).  The teacher is the network of that run's final checkpoint
(``stage<last>_last.pt``, read with ``weights_only=True``): from the directory ``--teacher``
gave (``Machine.teacher_dir``), whose spec must be that teacher spec, or else the newest
finished run in ``OUT/runs`` with the teacher's signature *and* that checkpoint (committed runs
keep their logs, not their checkpoints).  :func:`~.experiments.run_task` (``bnnbench table``,
``bnnbench run``) trains the teacher first when no such run exists; :func:`load_teacher` is what
the training loop calls, and refuses, naming the fix, when there is none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnnbench.errors import ConfigError

from .catalog import RunRecord, read_run, scan_runs
from .results import checkpoint_name, load_checkpoint, load_model_state
from .spec import Machine, RunSpec


class TeacherMissing(ConfigError):
    """No finished teacher run with its final checkpoint is where the run looks for one."""


def final_checkpoint(record: RunRecord) -> Path | None:
    """The checkpoint of a finished run's last epoch (``stage<last>_last.pt``), None when it is not there."""
    if record.status != "finished" or record.spec is None:
        return None
    path = record.path / checkpoint_name(record.spec.stages[-1], "last")
    return path if path.is_file() else None


def train_command(teacher: RunSpec) -> str:
    """A ``bnnbench run`` command line that trains ``teacher`` (a preset recipe's name; overrides otherwise)."""
    m = teacher.model
    skip = f" --skip {m.options['skip']}" if "skip" in m.options else ""
    return f"bnnbench run --method fp --net {m.net}{skip} --data {teacher.data} --recipe {teacher.recipe.name} --seed {teacher.seed}"


def find_teacher(spec: RunSpec, machine: Machine) -> RunRecord:
    """The finished teacher run of ``spec`` with its final checkpoint (see the module docstring)."""
    teacher = spec.teacher_spec
    if teacher is None:
        raise ConfigError(f"method {spec.model.method!r} trains without a teacher")
    if machine.teacher_dir is not None:
        record = read_run(machine.teacher_dir)
        if record.spec is None or record.spec.key() != teacher.key():
            given = record.spec.describe() if record.spec is not None else "unreadable"
            raise ConfigError(f"--teacher {machine.teacher_dir} is the run {given}, but this run's teacher is {teacher.describe()}")
        if final_checkpoint(record) is None:
            raise TeacherMissing(
                f"--teacher {machine.teacher_dir} has no final checkpoint ({checkpoint_name(teacher.stages[-1], 'last')}; "
                f"status {record.status}): finish it, or train a new one with: {train_command(teacher)}"
            )
        return record
    key = teacher.key()
    found = [r for r in scan_runs(machine.run_root()) if r.spec is not None and r.spec.key() == key and final_checkpoint(r) is not None]
    if not found:
        raise TeacherMissing(
            f"no finished teacher run ({teacher.describe()}) with its final checkpoint in {machine.run_root()}; "
            f"train it with: {train_command(teacher)} --out {machine.out}, or pass --teacher RUN_DIR"
        )
    return found[-1]


def load_teacher(spec: RunSpec, machine: Machine, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher network of ``spec`` on ``device`` (to be frozen by ``bnnbench.attach_teacher``) and
    what config.json records of it: run directory, checkpoint, final test top-1."""
    record = find_teacher(spec, machine)
    teacher = spec.teacher_spec
    assert teacher is not None
    path = final_checkpoint(record)
    assert path is not None
    model = teacher.model.build(stage=teacher.stages[-1])
    state = load_checkpoint(path)
    load_model_state(model, state, path, f"teacher {teacher.model.net} (fp)")
    info = {
        "run_id": record.run_id,
        "run": str(record.path.resolve()),
        "checkpoint": path.name,
        "final_test_top1": (record.final or {}).get("final_test_top1"),
    }
    return model.to(device), info


__all__ = ["TeacherMissing", "final_checkpoint", "find_teacher", "load_teacher", "train_command"]
