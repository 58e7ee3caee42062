"""Student factory: the three student families, fitted to the task's input."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from kd.builds import ModelBuild, default_stride_reduction
from kd.config import TaskConfig
from kd.errors import UserError
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


def student_build(name: str, task: TaskConfig, test_time_flip: bool = False) -> ModelBuild:
    """How a student for the task is built: fitted to its input as the task config says (measured per
    task: docs/training.md), judging each image with its mirror image where `test_time_flip`."""
    name = canonical_student_name(name)
    check_test_time_flip(task, test_time_flip)
    return ModelBuild(STUDENT_ARCHS[name], task.num_classes, task.data.channels, task.data.input_size,
                      task.student_stride_reduction.get(name, default_stride_reduction(task.data.input_size)),
                      task.mean, task.std, test_time_flip)


def check_test_time_flip(task: TaskConfig, test_time_flip: bool) -> None:
    """Refuse --test_time_flip where it does not suit the task. A mirrored image is one the student trained
    on only where training flips images, which a config does only where mirroring keeps the class."""
    if test_time_flip and not task.augment.hflip:
        raise UserError(f"--test_time_flip averages each image's prediction with its mirror image's, but task "
                        f"{task.name} trains without flips (augment.hflip: false: a mirror image may not keep its "
                        "class)")


def build_student(name: str, task: TaskConfig) -> Normalized:
    """A new student for the task, with random weights."""
    return student_build(name, task).create()
