"""Student factory: the three student families, fitted to the task's input."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from kd.builds import ModelBuild, default_stride_reduction
from kd.config import TaskConfig
from kd.settings import STUDENT_ARCHS, canonical_student_name

if TYPE_CHECKING:
    from kd.models import Normalized


def with_stride_reduction(task: TaskConfig, name: str, halvings: int | None) -> TaskConfig:
    """The task with the student's halvings set (None: as configured). A run records the result in its
    config.yaml, so evaluation, export and --resume rebuild the student the run trained."""
    if halvings is None:
        return task
    return dataclasses.replace(task, student_stride_reduction={**task.student_stride_reduction,
                                                               canonical_student_name(name): halvings})


def student_build(name: str, task: TaskConfig) -> ModelBuild:
    """How a student for the task is built: fitted to its input as the task config says (measured per
    task: docs/training.md)."""
    name = canonical_student_name(name)
    return ModelBuild(STUDENT_ARCHS[name], task.num_classes, task.data.channels, task.data.input_size,
                      task.student_stride_reduction.get(name, default_stride_reduction(task.data.input_size)),
                      task.mean, task.std)


def build_student(name: str, task: TaskConfig) -> Normalized:
    """A new student for the task, with random weights."""
    return student_build(name, task).create()
