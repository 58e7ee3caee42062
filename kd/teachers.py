"""Teachers: building, loading and the frozen ensemble (missing teachers are trained by kd.training)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from kd.checkpoint import check_classes, load_state_into, load_weights
from kd.config import TaskConfig, TeacherSpec
from kd.engine import Precision, collect_logits
from kd.errors import UserError
from kd.losses import teacher_target
from kd.builds import ModelBuild, default_stride_reduction
from kd.models import Normalized


class TeacherEnsemble(nn.Module):
    """K frozen teachers; forward returns their stacked logits, shape (K, B, C).

    The teachers stay in eval mode whatever .train() is called with, never require gradients,
    and run under no_grad, so they can sit inside a training model without being trained.
    """

    def __init__(self, teachers: dict[str, nn.Module], metadata: dict[str, dict] | None = None):
        super().__init__()
        self.names = list(teachers)
        self.models = nn.ModuleList(freeze(m) for m in teachers.values())
        self.metadata = metadata or {name: {} for name in teachers}  # each checkpoint's: arch, val/test acc...

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        self.training = mode
        for model in self.models:
            model.eval()
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([model(x) for model in self.models])


def freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def build_teacher(spec: TeacherSpec, task: TaskConfig, *, pretrained: bool | Path = False,
                  plain_timm: bool = False) -> Normalized:
    """The teacher's architecture fitted to the task's input (timm's own with `plain_timm`)."""
    build = teacher_build(spec, task)
    return (dataclasses.replace(build, stride_reduction=0) if plain_timm else build).create(pretrained)


def teacher_build(spec: TeacherSpec, task: TaskConfig) -> ModelBuild:
    """How `build_teacher` builds and feeds this teacher (with its config's halvings)."""
    return ModelBuild(spec.arch, task.num_classes, task.data.channels, task.data.input_size,
                      teacher_stride_reduction(spec, task), tuple(spec.mean or task.mean), tuple(spec.std or task.std))


def teacher_stride_reduction(spec: TeacherSpec, task: TaskConfig) -> int:
    return default_stride_reduction(task.data.input_size) if spec.stride_reduction is None else spec.stride_reduction


def load_teacher(spec: TeacherSpec, task: TaskConfig) -> tuple[Normalized, dict]:
    """Build the teacher's architecture and load its checkpoint; returns (frozen model, metadata).

    The checkpoint is this project's layout (the timm model under `backbone.` plus the `mean`/`std`
    buffers), or a plain timm state dict, as `model.state_dict()` of timm's own architecture gives
    it: that one is loaded into the unmodified architecture, with the teacher's (or the task's)
    normalisation, so the teacher computes what it computed where it was trained.
    """
    path = task.teacher_checkpoint(spec)
    source = f"teacher {spec.name} ({path})"
    state, meta = load_weights(path)
    check_classes(meta, task.classes, source)
    if meta.get("arch", spec.arch) != spec.arch:
        raise UserError(f"{source} is a {meta['arch']}, the config says {spec.arch}")
    plain = is_plain_timm_state(state)
    model = build_teacher(spec, task, plain_timm=plain)
    if plain:
        state = {**{f"backbone.{key}": value for key, value in state.items()}, "mean": model.mean, "std": model.std}
    load_state_into(model, state, source)
    return freeze(model), meta


def is_plain_timm_state(state: dict) -> bool:
    """A timm model's own state dict, not wrapped in kd.models.Normalized."""
    return "mean" not in state and not any(key.startswith("backbone.") for key in state)


def load_teachers(task: TaskConfig) -> TeacherEnsemble:
    """Every teacher of the task, frozen, with its checkpoint's metadata; a missing checkpoint is a
    UserError (kd.training.ensure_teachers trains missing teachers first)."""
    models, metas = {}, {}
    for spec in task.teachers:
        models[spec.name], metas[spec.name] = load_teacher(spec, task)
    return TeacherEnsemble(models, metas)


def teacher_accuracies(models: dict[str, nn.Module], batches, precision: Precision,
                    temperature: float) -> tuple[dict[str, float], float]:
    """Accuracy of each teacher on `batches`, and of their uniform ensemble: the argmax of the mean over
    teachers of softmax(z / T), the target a uniform KD run distils."""
    logits, labels = {}, None
    for name, model in models.items():
        logits[name], labels = collect_logits(model, batches, precision)
    ensemble = teacher_target(torch.stack(list(logits.values())), temperature).argmax(dim=1)
    return ({name: _accuracy(z.argmax(dim=1), labels) for name, z in logits.items()},
            _accuracy(ensemble, labels))


def _accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return (predictions == labels).float().mean().item()
