"""Teachers: loading (training them first when a checkpoint is missing) and the frozen ensemble."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.nn as nn

from kd.checkpoint import check_classes, load_state_into, load_weights, save_weights
from kd.config import TaskConfig, TeacherSpec
from kd.data import Batches, TaskData
from kd.engine import Precision, evaluate, fit, seed_everything
from kd.errors import UserError
from kd.losses import KDLoss
from kd.models import Normalized, count_parameters, create_model

log = logging.getLogger("kd")


class TeacherEnsemble(nn.Module):
    """K frozen teachers; forward returns their stacked logits, shape (K, B, C).

    The teachers stay in eval mode whatever .train() is called with, never require gradients,
    and run under no_grad, so they can sit inside a training model without being trained.
    """

    def __init__(self, teachers: dict[str, nn.Module]):
        super().__init__()
        self.names = list(teachers)
        self.models = nn.ModuleList(freeze(m) for m in teachers.values())

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
                  small_input: bool = True) -> Normalized:
    return create_model(spec.arch, task.num_classes, task.data.channels, spec.mean or task.mean,
                        spec.std or task.std, pretrained=pretrained, small_input=small_input)


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
    model = build_teacher(spec, task, small_input=not plain)
    if plain:
        state = {**{f"backbone.{key}": value for key, value in state.items()}, "mean": model.mean, "std": model.std}
    load_state_into(model, state, source)
    return freeze(model), meta


def is_plain_timm_state(state: dict) -> bool:
    """A timm model's own state dict, not wrapped in kd.models.Normalized."""
    return "mean" not in state and not any(key.startswith("backbone.") for key in state)


def train_teacher(spec: TeacherSpec, task: TaskConfig, data: TaskData, precision: Precision) -> dict:
    """Train one teacher with its recipe through the common engine, save it, return its metadata."""
    recipe = spec.recipe
    seed_everything(recipe.seed)
    model = build_teacher(spec, task, pretrained=task.pretrained_weights(spec)).to(precision.device)
    device = precision.device
    train = Batches(data.train, recipe.batch_size, device, shuffle=True, augment=task.augment, seed=recipe.seed)
    val = Batches(data.val, 512, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs)
    best = {"val_acc": -1.0}

    def keep_best(row):
        if row["val_acc"] > best["val_acc"]:
            best.update(val_acc=row["val_acc"], epoch=row["epoch"],
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})

    fit(model, train, val, optimizer=optimizer, scheduler=scheduler, criterion=KDLoss(1.0, 0.0),
        epochs=recipe.epochs, precision=precision, on_epoch=keep_best, desc=f"teacher {spec.name}")
    model.load_state_dict(best["state"])
    test_acc = evaluate(model, Batches(data.test, 512, device), precision)["acc"]
    meta = {"arch": spec.arch, "classes": list(task.classes), "task": task.name,
            "val_acc": best["val_acc"], "test_acc": test_acc, "best_epoch": best["epoch"],
            "recipe": dataclasses.asdict(recipe), "params": count_parameters(model),
            "pretrained": str(task.pretrained_weights(spec))}
    save_weights(model, task.teacher_checkpoint(spec), meta)
    return meta


def prepare_teachers(task: TaskConfig, data: TaskData, precision: Precision,
                     teacher_epochs: int | None = None) -> tuple[TeacherEnsemble, dict[str, dict]]:
    """Load every teacher of the task, training (and saving) the missing ones first."""
    models, metas = {}, {}
    for spec in task.teachers:
        path = task.teacher_checkpoint(spec)
        if not path.exists():
            if teacher_epochs:
                spec = dataclasses.replace(spec, recipe=dataclasses.replace(spec.recipe, epochs=teacher_epochs))
            log.warning("TEACHER CHECKPOINT MISSING: %s. Training teacher %s (%s) for %d epoch(s) with its "
                        "recipe, starting from %s; it will be saved there.", path, spec.name, spec.arch,
                        spec.recipe.epochs, _start_weights(task.pretrained_weights(spec)))
            meta = train_teacher(spec, task, data, precision)
            log.warning("Trained teacher %s: val acc %.4f, test acc %.4f, saved to %s",
                        spec.name, meta["val_acc"], meta["test_acc"], path)
        model, metas[spec.name] = load_teacher(spec, task)
        models[spec.name] = model
        log.info("teacher %-16s %-22s %6.2fM params  val acc %s  (%s)", spec.name, spec.arch,
                 count_parameters(model) / 1e6, _fmt(metas[spec.name].get("val_acc")), path)
    return TeacherEnsemble(models).to(precision.device), metas


def _start_weights(pretrained: bool | Path) -> str:
    if isinstance(pretrained, Path):
        return f"the pretrained weights in {pretrained}"
    return "timm's pretrained weights" if pretrained else "random weights"


def _fmt(value) -> str:
    return "?" if value is None else f"{value:.4f}"
