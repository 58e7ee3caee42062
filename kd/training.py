"""Student training: everything train.py does, as one function over plain values."""

from __future__ import annotations

import dataclasses
import logging
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from torch.nn.parallel import DistributedDataParallel

from kd.cache import BUDGET_BYTES, cache_bytes, cache_paths, load_or_build_cache
from kd.checkpoint import atomic_torch_save, load_state_into, load_torch_checkpoint, save_weights
from kd.config import TaskConfig, load_task_config
from kd.data import Batches, TaskData, load_task_data
from kd.engine import (Precision, evaluate, fit, online_teachers, rng_state, select_device, select_precision,
                       seed_everything, set_rng_state)
from kd.distributed import World, broadcast, init_world, main_process_first, process_device, shutdown
from kd.errors import UserError
from kd.losses import KDLoss
from kd.models import count_parameters
from kd.runs import MetricsLog, create_run_dir, run_name, setup_logging, write_yaml
from kd.students import STUDENT_ARCHS, build_student, canonical_student_name
from kd.teachers import prepare_teachers

log = logging.getLogger("kd")
EVAL_BATCH_SIZE = 512


@dataclass(frozen=True)
class TrainSettings:
    """Every knob of a student training run; train.py's flags map onto these one to one."""

    task: str = "B"  # A, B, or the path of a task config file
    lr: float = 0.001
    batch_size: int = 32
    num_epochs: int = 100
    weight_decay: float = 0.0005
    temperature: float = 2.0
    alpha: float = 0.1
    scheduler_step: int = 30
    scheduler_gamma: float = 0.5
    student_model: str = "EfficientNet"
    seed: int = 42
    run: str = ""
    device: str = "auto"
    amp: bool = True
    data_dir: str | None = None
    output_dir: str = "runs"
    teacher_epochs: int | None = None
    teacher_weighting: str = "uniform"
    teacher_cache: str = "auto"  # auto | on | off
    teacher_cache_views: int = 4
    cache_dir: str = "cache"
    resume: str | None = None  # "auto", a run folder, or its checkpoint_last.pt
    teacher_weights: tuple[float, ...] | None = None  # for teacher_weighting="fixed"; default: the config's
    channels_last: bool = True
    compile: bool = False


def train_student(settings: TrainSettings) -> Path:
    """Distil the task's teachers into a student; returns the run folder.

    A run that fails before its first checkpoint leaves no folder behind. With `resume`, the run
    continues in its own folder with the settings it was started with. Under torchrun every
    process trains its shard of each batch; rank 0 alone logs and writes.
    """
    resume_dir = find_resume_dir(settings) if settings.resume else None
    if resume_dir is not None:
        settings = dataclasses.replace(read_run_settings(resume_dir), resume=str(resume_dir))
    task = load_task_config(settings.task)
    student_name = canonical_student_name(settings.student_model)
    device = select_device(settings.device)
    world = init_world(device)
    try:
        precision = select_precision(process_device(device, world), settings.amp)
        data = load_task_data(task, settings.data_dir)
        run_dir = resume_dir or (create_run_dir(settings.output_dir, run_name(
            task.name, student_name, settings.temperature, settings.alpha, settings.run)) if world.is_main else None)
        run_dir = broadcast(run_dir)
        setup_logging(run_dir / "train.log" if world.is_main else None, quiet=not world.is_main)
        _train_guarded(run_dir, settings, task, student_name, precision, data, world)
    finally:
        shutdown()
    return run_dir


def _train_guarded(run_dir: Path, settings, task, student_name, precision, data, world: World) -> None:
    try:
        try:
            _train_in(run_dir, settings, task, student_name, precision, data, world)
        except torch.OutOfMemoryError:
            raise UserError(f"{precision.device} ran out of memory at --batch_size {settings.batch_size}; "
                            "try a smaller --batch_size (the last finished epoch, if any, is kept)") from None
    except BaseException as err:
        if not world.is_main:
            raise
        if not (run_dir / "checkpoint_last.pt").exists():
            setup_logging(None)  # closes the log file before its folder goes
            shutil.rmtree(run_dir, ignore_errors=True)
        elif isinstance(err, KeyboardInterrupt):
            log.warning("interrupted; the last finished epoch is saved. Continue with: "
                        "python train.py --resume %s", run_dir)
        raise


def find_resume_dir(settings: TrainSettings) -> Path:
    """The run folder to continue: given, the checkpoint's folder, or (auto) the newest matching run."""
    if settings.resume != "auto":
        path = Path(settings.resume)
        run_dir = path.parent if path.is_file() else path
        if not (run_dir / "checkpoint_last.pt").is_file():
            raise UserError(f"cannot resume {settings.resume}: no checkpoint_last.pt there")
        return run_dir
    task = load_task_config(settings.task)
    name = run_name(task.name, canonical_student_name(settings.student_model), settings.temperature,
                    settings.alpha, settings.run)
    candidates = [d for d in Path(settings.output_dir).glob(f"{name}*")
                  if _is_repeat_suffix(d.name[len(name):]) and (d / "checkpoint_last.pt").is_file()]
    if not candidates:
        raise UserError(f"--resume auto: no run named {name} with a checkpoint in {settings.output_dir}")
    return max(candidates, key=lambda d: (d / "checkpoint_last.pt").stat().st_mtime)


def _is_repeat_suffix(suffix: str) -> bool:
    """'' or '-N': the suffixes create_run_dir gives repeated run names."""
    return suffix == "" or (suffix.startswith("-") and suffix[1:].isdigit())


def read_run_settings(run_dir: Path) -> TrainSettings:
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())["settings"]
        return TrainSettings(**saved)
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise UserError(f"cannot resume {run_dir}: its config.yaml is unreadable ({err})") from None


def _train_in(run_dir: Path, settings: TrainSettings, task: TaskConfig, student_name: str,
              precision: Precision, data: TaskData, world: World) -> None:
    device = precision.device
    log.info("task %s: %s | train %d, val %d, test %d images (%s)", task.name, task.description,
             len(data.train), len(data.val), len(data.test), data.source)
    log.info("device %s, precision %s, %d process(es)", device, precision.name, world.size)
    if not settings.resume and world.is_main:
        write_yaml(_resolved_config(settings, task, student_name, precision, data.source, world),
                   run_dir / "config.yaml")

    ensemble = None
    if settings.alpha > 0:
        with main_process_first(world):  # rank 0 trains missing teachers; the others load them
            ensemble, _ = prepare_teachers(task, data, precision, settings.teacher_epochs)
        if settings.channels_last:
            ensemble.to(memory_format=torch.channels_last)
    else:
        log.info("alpha = 0: hard labels only, the teachers are not used")
    with main_process_first(world):
        train_batches, teachers = _teacher_source(settings, task, data, ensemble, precision, world)

    seed_everything(settings.seed)
    student = build_student(student_name, task).to(device)
    log.info("student %s (%s): %.2fM parameters", student_name, STUDENT_ARCHS[student_name],
             count_parameters(student) / 1e6)
    trained = _wrap_for_training(student, settings, device, world)
    optimizer = torch.optim.Adam(student.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, settings.scheduler_step, settings.scheduler_gamma)
    val_batches = Batches(data.val, EVAL_BATCH_SIZE, device)
    criterion = KDLoss(settings.temperature, settings.alpha, settings.teacher_weighting,
                       fixed_weights=fixed_teacher_weights(settings.teacher_weights, task))

    checkpoints = RunCheckpoints(run_dir, student, optimizer, scheduler, precision,
                                 _student_metadata(task, student_name, settings))
    metrics = MetricsLog(run_dir) if world.is_main else None
    if settings.resume:
        history = checkpoints.restore()
        if metrics:
            metrics.rewrite(history)
        log.info("resuming %s after epoch %d", run_dir, checkpoints.epoch)

    def after_epoch(row):
        if world.is_main:
            checkpoints.save(row)  # first: a run killed in between repeats this epoch, rows included
            metrics.write(row)

    try:
        fit(trained, train_batches, val_batches, optimizer=optimizer, scheduler=scheduler, criterion=criterion,
            epochs=settings.num_epochs, start_epoch=checkpoints.epoch, precision=precision, teachers=teachers,
            teacher_names=ensemble.names if ensemble else (), on_epoch=after_epoch, desc=f"student {student_name}")
    finally:
        if metrics:
            metrics.close()
    if world.is_main:
        checkpoints.finish(Batches(data.test, EVAL_BATCH_SIZE, device))


def fixed_teacher_weights(weights, task: TaskConfig) -> list[float]:
    """The 'fixed' scheme's weights: given ones (one per teacher, not all zero) or the config's."""
    if weights is None:
        return [t.weight for t in task.teachers]
    if len(weights) != len(task.teachers) or min(weights) < 0 or sum(weights) <= 0:
        raise UserError(f"--teacher_weights needs {len(task.teachers)} non-negative values, not all zero "
                        f"(teachers: {', '.join(t.name for t in task.teachers)}); got {list(weights)}")
    return list(weights)


def _wrap_for_training(student: nn.Module, settings: TrainSettings, device: torch.device, world: World) -> nn.Module:
    """channels_last, DistributedDataParallel and torch.compile, as asked; the checkpoints keep `student`."""
    if settings.channels_last:
        student.to(memory_format=torch.channels_last)
    model = student if world.size == 1 else DistributedDataParallel(
        student, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if settings.compile else model


def _teacher_source(settings: TrainSettings, task: TaskConfig, data: TaskData, ensemble, precision: Precision,
                    world: World):
    """(training batches, teacher logits per batch): replayed from the cache, run online, or None."""
    def batches(views):
        return Batches(data.train, settings.batch_size, precision.device, shuffle=True, augment=task.augment,
                       seed=settings.seed, views=views, pool_seed=task.data.split_seed, rank=world.rank,
                       world_size=world.size)

    if ensemble is None:
        return batches(None), None
    if settings.teacher_cache != "off":
        pooled = batches(settings.teacher_cache_views)
        paths = cache_paths([task.teacher_checkpoint(t) for t in task.teachers], pooled, Path(settings.cache_dir))
        if _use_cache(settings, pooled, paths, task.num_classes):
            return pooled, load_or_build_cache(list(ensemble.models), paths, pooled, precision)
    return batches(None), online_teachers(ensemble)


def _use_cache(settings: TrainSettings, pooled: Batches, paths: list[Path], num_classes: int) -> bool:
    if settings.teacher_cache == "on":
        return True
    size = cache_bytes(len(paths), pooled.num_views, len(pooled.split), num_classes)
    if size > BUDGET_BYTES:
        log.info("teacher-logit cache off: %.1f GB exceeds the %.1f GB budget", size / 1e9, BUDGET_BYTES / 1e9)
        return False
    if any(not p.is_file() for p in paths) and settings.num_epochs < pooled.num_views:
        log.info("teacher-logit cache off: building it costs %d teacher passes over the data, more than this "
                 "%d-epoch run; --teacher_cache on builds it for later runs", pooled.num_views, settings.num_epochs)
        return False
    return True


class RunCheckpoints:
    """checkpoint_last.pt every epoch: model, optimizer, scheduler, grad scaler, RNG states and the
    metrics history, all a resumed run needs to continue bit for bit; checkpoint_best.pt (weights
    only) and student.safetensors on a new best validation accuracy."""

    def __init__(self, run_dir: Path, model, optimizer, scheduler, precision: Precision, metadata: dict):
        self.run_dir, self.model, self.optimizer = run_dir, model, optimizer
        self.scheduler, self.precision, self.metadata = scheduler, precision, metadata
        self.best_val_acc, self.best_epoch, self.epoch = -1.0, 0, 0
        self.history: list[dict] = []

    def _weights(self) -> dict:
        return {"model": self.model.state_dict(), "epoch": self.epoch, "best_val_acc": self.best_val_acc,
                "best_epoch": self.best_epoch, "metadata": self.metadata}

    def _full_state(self) -> dict:
        return {**self._weights(), "optimizer": self.optimizer.state_dict(), "history": self.history,
                "scheduler": self.scheduler.state_dict(), "scaler": self.precision.scaler.state_dict(),
                "rng": rng_state()}

    def save(self, row: dict) -> None:
        self.epoch = row["epoch"]
        self.history.append(row)
        if row["val_acc"] > self.best_val_acc:
            self.best_val_acc, self.best_epoch = row["val_acc"], row["epoch"]
            self.metadata.update(val_acc=row["val_acc"], epoch=row["epoch"])
            atomic_torch_save(self._weights(), self.run_dir / "checkpoint_best.pt")
            save_weights(self.model, self.run_dir / "student.safetensors", self.metadata)
        atomic_torch_save(self._full_state(), self.run_dir / "checkpoint_last.pt")

    def restore(self) -> list[dict]:
        """Load checkpoint_last.pt into the model, optimizer, scheduler, scaler and RNGs; return the history."""
        state = load_torch_checkpoint(self.run_dir / "checkpoint_last.pt")
        load_state_into(self.model, state["model"], f"{self.run_dir / 'checkpoint_last.pt'}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.epoch, self.history = state["epoch"], state["history"]
        self.best_val_acc, self.best_epoch = state["best_val_acc"], state["best_epoch"]
        self.metadata.update({k: v for k, v in state["metadata"].items() if k in ("val_acc", "epoch")})
        return self.history

    def finish(self, test_batches) -> float:
        """Report the best checkpoint's test accuracy (selection used validation only)."""
        self.model.load_state_dict(load_torch_checkpoint(self.run_dir / "checkpoint_best.pt")["model"])
        test_acc = evaluate(self.model, test_batches, self.precision)["acc"]
        self.metadata["test_acc"] = test_acc
        save_weights(self.model, self.run_dir / "student.safetensors", self.metadata)
        log.info("best epoch %d: val acc %.4f, test acc %.4f", self.best_epoch, self.best_val_acc, test_acc)
        return test_acc


def _student_metadata(task: TaskConfig, student_name: str, settings: TrainSettings) -> dict:
    return {"student": student_name, "arch": STUDENT_ARCHS[student_name], "task": task.name,
            "classes": list(task.classes), "input_size": task.data.input_size,
            "channels": task.data.channels, "temperature": settings.temperature, "alpha": settings.alpha}


def _resolved_config(settings, task, student_name, precision, data_source, world: World) -> dict:
    return {"settings": {**dataclasses.asdict(settings), "student_model": student_name},
            "task": task.to_dict(), "data_source": data_source, "device": str(precision.device),
            "processes": world.size, "global_batch_size": settings.batch_size * world.size,
            "precision": precision.name, "torch": torch.__version__, "python": platform.python_version()}
