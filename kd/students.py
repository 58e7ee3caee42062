"""Student factory: the three student families, fitted to the task's input."""

from __future__ import annotations

import dataclasses

from kd.config import TaskConfig
from kd.errors import UserError
from kd.models import Normalized, create_model, default_stride_reduction

# The deployment-sized member of each family; see the README for the measured trade-offs.
STUDENT_ARCHS = {
    "MobileNetV3": "mobilenetv3_small_100",
    "EfficientNet": "efficientnet_b0",
    "ResNet18": "resnet18",
}


def canonical_student_name(name: str) -> str:
    """Map a case-insensitive student name to its canonical spelling."""
    for canonical in STUDENT_ARCHS:
        if canonical.lower() == name.lower():
            return canonical
    raise UserError(f"unknown student {name!r}; choose one of {', '.join(STUDENT_ARCHS)}")


def with_stride_reduction(task: TaskConfig, name: str, halvings: int | None) -> TaskConfig:
    """The task with the student's halvings set (None: as configured). A run records the result in its
    config.yaml, so evaluation, export and --resume rebuild the student the run trained."""
    if halvings is None:
        return task
    return dataclasses.replace(task, student_stride_reduction={**task.student_stride_reduction,
                                                               canonical_student_name(name): halvings})


def build_student(name: str, task: TaskConfig) -> Normalized:
    """A new student for the task, fitted to its input as the task config says (measured per task: README)."""
    name = canonical_student_name(name)
    return create_model(STUDENT_ARCHS[name], task.num_classes, task.data.channels, task.mean, task.std,
                        stride_reduction=task.student_stride_reduction.get(
                            name, default_stride_reduction(task.data.input_size)))
