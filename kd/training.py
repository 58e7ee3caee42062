"""Student training: everything train.py does, as one function over plain values."""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import shutil
from collections.abc import Callable, Collection
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from torch.nn.parallel import DistributedDataParallel

from kd.cache import (BUDGET_BYTES, DISK_BUDGET_BYTES, TeacherLogitCache, cache_bytes, on_disk, repeated_views_note,
                      teacher_identity)
from kd.checkpoint import (atomic_torch_save, atomic_write, load_state_into, load_torch_checkpoint, load_weights,
                           save_weights)
from kd.config import TaskConfig, TeacherSpec, load_task_config, normalisable
from kd.data import TaskData, load_task_data
from kd.engine import (Mixup, Precision, evaluate, fit, online_teachers, rng_state, select_device, select_precision,
                       seed_everything, set_rng_state)
from kd.distributed import World, broadcast, init_world, main_process_first, process_device, shutdown
from kd.errors import UserError
from kd.losses import KDLoss
from kd.models import count_parameters
from kd.settings import TrainSettings
from kd.runs import MetricsLog, create_run_dir, log_to_file, run_name, setup_logging, write_yaml
from kd.students import STUDENT_ARCHS, build_student, canonical_student_name, with_stride_reduction
from kd.teachers import TeacherEnsemble, build_teacher, load_teachers, teacher_accuracies, teacher_build

log = logging.getLogger("kd")
EVAL_BATCH_SIZE = 512


@dataclass(frozen=True)
class Trainee:
    """What a run trains: a student, or a teacher trained from its recipe by the same machinery."""

    role: str  # "student" or "teacher": names the run's weights file, <role>.safetensors
    label: str  # for the log and the progress bar, e.g. "student MobileNetV3"
    build: Callable[[], nn.Module]  # a fresh model with random (or pretrained) weights
    metadata: dict  # saved with the weights; val/test accuracy and epoch are added


@dataclass(frozen=True)
class RunHooks:
    """What a caller that runs many trainings (the tuner) changes in one: the run itself is the same."""

    on_epoch: Callable[[dict], None] | None = None  # after each epoch is saved; may raise to stop the run
    score_test: bool = True  # report the best checkpoint's test accuracy at the end
    quiet: bool = False  # console: warnings only and no progress bars (train.log keeps everything)


def train_student(settings: TrainSettings, given: Collection[str] | None = None, hooks: RunHooks = RunHooks()) -> Path:
    """Distil the task's teachers into a student; returns the run folder.

    Missing teachers are trained first, each in its own run (see `ensure_teachers`). A run that
    fails before its first checkpoint leaves no folder behind. With `resume`, the run continues in
    its own folder with the settings it was started with, except a larger `num_epochs` among the
    `given` settings (the names set explicitly; default: those that differ from the defaults), which
    trains on; the other given settings that differ from the run's are named in a warning. Under
    torchrun every process trains its shard of each batch; rank 0 alone logs and writes. `hooks`
    observe the epochs, skip the test split or quieten the console.
    """
    resume_dir = find_resume_dir(settings) if settings.resume else None
    ignored = []
    if resume_dir is not None:
        settings, ignored = resumed_settings(read_run_settings(resume_dir), settings, given, resume_dir)
    student_name = canonical_student_name(settings.student_model)
    settings = dataclasses.replace(settings, student_model=student_name)  # config.yaml keeps the canonical name
    with _session(settings, hooks.quiet) as (task, data, precision, world):
        task = with_stride_reduction(task, student_name, settings.stride_reduction)
        ensemble = ensure_teachers(task, data, precision, world, settings.teacher_epochs) if settings.alpha > 0 \
            else None
        run_dir = resume_dir or (create_run_dir(settings.output_dir, run_name(
            task.name, student_name, settings.temperature, settings.alpha, settings.run)) if world.is_main else None)
        trainee = Trainee("student", f"student {student_name}", partial(build_student, student_name, task),
                          _student_metadata(task, student_name, settings))
        run_dir = broadcast(run_dir)  # every process returns the run folder, not only rank 0
        if ignored:
            log.warning("--resume continues %s with the settings it was started with; ignored: %s", run_dir,
                        "; ".join(ignored))
        run_training(run_dir, settings, task, trainee, precision, data, world, ensemble, hooks)
        return run_dir


def train_teachers(settings: TrainSettings) -> Path:
    """Train the task's missing teachers (each in its own resumable run) and report all of them;
    returns the folder of the first teacher's checkpoint. train.py --teachers_only."""
    with _session(settings) as (task, data, precision, world):
        ensemble = ensure_teachers(task, data, precision, world, settings.teacher_epochs)
        if world.is_main:
            log_teachers(ensemble, task)
            _, accuracy = teacher_accuracies(dict(zip(ensemble.names, ensemble.models)),
                                          data.test.batches(EVAL_BATCH_SIZE, precision.device), precision,
                                          settings.temperature)
            log.info("uniform ensemble (T = %g): test acc %.2f%%", settings.temperature, 100 * accuracy)
        return task.teacher_checkpoint(task.teachers[0]).parent


def prepare_teachers(settings: TrainSettings) -> None:
    """Train the missing teachers and compute every view of their logit cache that runs of these
    settings train on (unless the cache is off): what many runs share, done once before them."""
    with _session(settings) as (task, data, precision, world):
        ensemble = ensure_teachers(task, data, precision, world, settings.teacher_epochs)
        _, teachers = _teacher_source(settings, task, data, ensemble, precision, world)
        if isinstance(teachers, TeacherLogitCache):
            teachers.fill(range(min(settings.num_epochs, len(teachers.batches.pool))))


@contextmanager
def _session(settings: TrainSettings, quiet: bool = False):
    """What every training command sets up first: the task, its data, the device and its precision,
    and the process group under torchrun (shut down on the way out, whatever happens)."""
    task = load_task_config(settings.task)
    fixed_teacher_weights(settings.teacher_weights, task)  # wrong weights stop before any training
    device = select_device(settings.device)
    world = init_world(device)
    try:
        setup_logging(quiet=quiet or not world.is_main)
        precision = select_precision(process_device(device, world), settings.amp)
        yield task, load_data(task, settings), precision, world
    finally:
        shutdown()


def load_data(task: TaskConfig, settings: TrainSettings) -> TaskData:
    """The task's splits, read from where and how the settings say."""
    return load_task_data(task, settings.data_dir, settings.data_storage, settings.num_workers)


def ensure_teachers(task: TaskConfig, data: TaskData, precision: Precision, world: World,
                    teacher_epochs: int | None = None) -> TeacherEnsemble:
    """Load the task's teachers, first training each missing one with its recipe through `run_training`.

    A teacher's run folder sits beside its checkpoint (see `teacher_run_dir`); a teacher run that was
    interrupted continues from its last finished epoch the next time its checkpoint is needed.
    """
    for spec in task.teachers:
        if not task.teacher_checkpoint(spec).exists():
            train_teacher(spec, task, data, precision, world, teacher_epochs)
    return load_teachers(task).to(precision.device)


def log_teachers(ensemble: TeacherEnsemble, task: TaskConfig) -> None:
    for spec, model in zip(task.teachers, ensemble.models):
        meta = ensemble.metadata[spec.name]
        log.info("teacher %-16s %-22s %6.2fM params  val acc %s  test acc %s  (%s)", spec.name, spec.arch,
                 count_parameters(model) / 1e6, _fmt(meta.get("val_acc")), _fmt(meta.get("test_acc")),
                 task.teacher_checkpoint(spec))


def teacher_run_dir(task: TaskConfig, spec: TeacherSpec) -> Path:
    checkpoint = task.teacher_checkpoint(spec)
    return checkpoint.parent / f"{checkpoint.stem}_run"


def train_teacher(spec: TeacherSpec, task: TaskConfig, data: TaskData, precision: Precision, world: World,
                  teacher_epochs: int | None = None) -> None:
    """Train one missing teacher with its recipe (alpha 0, AdamW, cosine schedule) and save it to its
    checkpoint path; an interrupted teacher run is resumed."""
    path, run_dir = task.teacher_checkpoint(spec), teacher_run_dir(task, spec)
    settings = teacher_settings(spec, task, teacher_epochs)
    if (run_dir / "checkpoint_last.pt").is_file():
        settings = dataclasses.replace(read_run_settings(run_dir), resume=str(run_dir))
        log.warning("TEACHER CHECKPOINT MISSING: %s. Continuing the interrupted training of teacher %s (%s) "
                    "in %s.", path, spec.name, spec.arch, run_dir)
    else:
        log.warning("TEACHER CHECKPOINT MISSING: %s. Training teacher %s (%s) for %d epoch(s) with its recipe, "
                    "starting from %s; its run folder is %s.", path, spec.name, spec.arch, settings.num_epochs,
                    _start_weights(task.pretrained_weights(spec)), run_dir)
        if world.is_main:
            shutil.rmtree(run_dir, ignore_errors=True)  # a start that never finished an epoch
            run_dir.mkdir(parents=True)
    trainee = Trainee("teacher", f"teacher {spec.name}",
                      partial(build_teacher, spec, task, pretrained=task.pretrained_weights(spec)),
                      {"arch": spec.arch, "classes": list(task.classes), "task": task.name, "teacher": spec.name,
                       "recipe": dataclasses.asdict(spec.recipe), "pretrained": str(task.pretrained_weights(spec))})
    run_training(run_dir, settings, task, trainee, precision, data, world)
    with main_process_first(world):
        if world.is_main:
            atomic_write(path, lambda tmp: shutil.copyfile(run_dir / "teacher.safetensors", tmp))
    meta = load_weights(path)[1]
    log.warning("Trained teacher %s: val acc %.4f, test acc %.4f, saved to %s", spec.name, meta["val_acc"],
                meta["test_acc"], path)


def teacher_settings(spec: TeacherSpec, task: TaskConfig, teacher_epochs: int | None) -> TrainSettings:
    recipe = spec.recipe
    return TrainSettings(task=task.name, lr=recipe.lr, batch_size=recipe.batch_size,
                         num_epochs=teacher_epochs or recipe.epochs, weight_decay=recipe.weight_decay, alpha=0.0,
                         seed=recipe.seed, student_model="", optimizer="adamw", lr_schedule="cosine",
                         label_smoothing=recipe.label_smoothing)


def run_training(run_dir: Path, settings: TrainSettings, task: TaskConfig, trainee: Trainee, precision: Precision,
                 data: TaskData, world: World, ensemble: TeacherEnsemble | None = None,
                 hooks: RunHooks = RunHooks()) -> None:
    """Train `trainee` in `run_dir`: the one run function for students and teachers. A run that fails
    before its first checkpoint leaves no folder; an interrupted one says how to continue."""
    try:
        with log_to_file(run_dir / "train.log" if world.is_main else None):
            try:
                _train_in(run_dir, settings, task, trainee, precision, data, world, ensemble, hooks)
            except torch.OutOfMemoryError:
                raise UserError(f"{precision.device} ran out of memory at --batch_size {settings.batch_size}; "
                                "try a smaller --batch_size (the last finished epoch, if any, is kept)") from None
    except BaseException as err:
        if world.is_main:
            _after_failure(run_dir, trainee, err)
        raise


def _after_failure(run_dir: Path, trainee: Trainee, err: BaseException) -> None:
    if not (run_dir / "checkpoint_last.pt").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
    elif isinstance(err, KeyboardInterrupt) and trainee.role == "teacher":
        log.warning("interrupted; the teacher's last finished epoch is saved in %s. Run the same command again "
                    "to continue its training.", run_dir)
    elif isinstance(err, KeyboardInterrupt):
        log.warning("interrupted; the last finished epoch is saved. Continue with: "
                    "python train.py --resume %s", run_dir)


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


RESUME_CHANGEABLE = ("num_epochs", "resume")  # what a resumed run takes from the command line


def resumed_settings(saved: TrainSettings, requested: TrainSettings, given: Collection[str] | None,
                     run_dir: Path) -> tuple[TrainSettings, list[str]]:
    """The run's own settings, with a newly given num_epochs; and the other given settings that differ
    from the run's, as 'flag value (run: value)' for the warning."""
    fields = [f.name for f in dataclasses.fields(TrainSettings)]
    defaults = TrainSettings()
    given = [name for name in fields if (name in given if given is not None
                                         else getattr(requested, name) != getattr(defaults, name))]
    ignored = [f"--{name} {_flag_value(getattr(requested, name))} (run: {_flag_value(getattr(saved, name))})"
               for name in given if name not in RESUME_CHANGEABLE and getattr(requested, name) != getattr(saved, name)]
    epochs = requested.num_epochs if "num_epochs" in given else saved.num_epochs
    return dataclasses.replace(saved, resume=str(run_dir), num_epochs=epochs), ignored


def _flag_value(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def read_run_settings(run_dir: Path) -> TrainSettings:
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())["settings"]
        return TrainSettings(**saved)
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise UserError(f"cannot resume {run_dir}: its config.yaml is unreadable ({err})") from None


def _train_in(run_dir: Path, settings: TrainSettings, task: TaskConfig, trainee: Trainee, precision: Precision,
              data: TaskData, world: World, ensemble: TeacherEnsemble | None, hooks: RunHooks) -> None:
    device = precision.device
    log.info("task %s: %s | train %d, val %d, test %d images (%s)", task.name, task.description,
             len(data.train), len(data.val), len(data.test), data.source)
    log.info("data: %s", data.storage)
    log.info("device %s, precision %s, %d process(es)", device, precision.name, world.size)
    fingerprint = data.train.fingerprint
    if settings.resume:
        _check_same_data(run_dir, fingerprint)
    elif world.is_main:
        write_yaml(_resolved_config(settings, task, trainee, precision, data.source, world, fingerprint),
                   run_dir / "config.yaml")
    if ensemble is not None:
        log_teachers(ensemble, task)
    if ensemble is not None and settings.channels_last:
        ensemble.to(memory_format=torch.channels_last)
    if ensemble is None and trainee.role == "student":
        log.info("alpha = 0: hard labels only, the teachers are not used")
    train_batches, teachers = _teacher_source(settings, task, data, ensemble, precision, world)

    seed_everything(settings.seed)
    model = trainee.build().to(device)
    log.info("%s: %.2fM parameters", trainee.label, count_parameters(model) / 1e6)
    trained = _wrap_for_training(model, settings, device, world)
    optimizer = make_optimizer(settings, model.parameters())
    scheduler = make_scheduler(settings, optimizer)
    val_batches = data.val.batches(EVAL_BATCH_SIZE, device)
    criterion = KDLoss(settings.temperature, settings.alpha, settings.teacher_weighting,
                       fixed_weights=fixed_teacher_weights(settings.teacher_weights, task),
                       label_smoothing=settings.label_smoothing)

    checkpoints = RunCheckpoints(run_dir, model, optimizer, scheduler, precision, trainee)
    metrics = MetricsLog(run_dir) if world.is_main else None
    if settings.resume:
        history = checkpoints.restore()
        if metrics:
            metrics.rewrite(history)
        _extend_to(settings.num_epochs, run_dir, checkpoints, world)
        log.info("resuming %s after epoch %d of %d", run_dir, checkpoints.epoch, settings.num_epochs)

    def after_epoch(row):
        if world.is_main:
            checkpoints.save(row)  # first: a run killed in between repeats this epoch, rows included
            metrics.write(row)
        if hooks.on_epoch:
            hooks.on_epoch(row)

    try:
        fit(trained, train_batches, val_batches, optimizer=optimizer, scheduler=scheduler, criterion=criterion,
            epochs=settings.num_epochs, start_epoch=checkpoints.epoch, precision=precision, teachers=teachers,
            teacher_names=ensemble.names if ensemble else (), on_epoch=after_epoch, desc=trainee.label,
            progress=not hooks.quiet, mixup=Mixup(settings.mixup, task.num_classes) if settings.mixup else None)
    finally:
        if metrics:
            metrics.close()
    if world.is_main and hooks.score_test:
        checkpoints.finish(data.test.batches(EVAL_BATCH_SIZE, device))


def make_optimizer(settings: TrainSettings, parameters) -> torch.optim.Optimizer:
    """Adam (the weight decay added to the gradients, the contract's default) or AdamW (decoupled)."""
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[settings.optimizer]
    return kind(parameters, lr=settings.lr, weight_decay=settings.weight_decay)


def make_scheduler(settings: TrainSettings, optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """StepLR (--scheduler_step, --scheduler_gamma) or a cosine decay to zero over the run's epochs.

    The cosine is written in closed form (a LambdaLR of the epoch), so a resumed run given more epochs
    follows the longer cosine from where it stands instead of continuing the finished one.
    """
    if settings.lr_schedule == "cosine":
        total = settings.num_epochs
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5 * (1 + math.cos(math.pi * epoch / total)))
    return torch.optim.lr_scheduler.StepLR(optimizer, settings.scheduler_step, settings.scheduler_gamma)


def _extend_to(num_epochs: int, run_dir: Path, checkpoints: "RunCheckpoints", world: World) -> None:
    """Resume with a changed epoch count: check it, set the restored optimizer's learning rate to the
    schedule's value for the next epoch, and record the new count in config.yaml."""
    if num_epochs < checkpoints.epoch:
        raise UserError(f"{run_dir} has trained {checkpoints.epoch} epochs already; --num_epochs {num_epochs} "
                        "would end before them (give a larger count to train on)")
    scheduler = checkpoints.scheduler
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        for group, base, factor in zip(checkpoints.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
    if not world.is_main:
        return
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    if config["settings"]["num_epochs"] != num_epochs:
        log.info("training %s on to %d epochs (it was started for %d)", run_dir, num_epochs,
                 config["settings"]["num_epochs"])
        config["settings"]["num_epochs"] = num_epochs
        atomic_write(config_path, lambda tmp: write_yaml(config, Path(tmp)))


def fixed_teacher_weights(weights, task: TaskConfig) -> list[float]:
    """The 'fixed' scheme's weights: given ones (one per teacher, not all zero) or the config's."""
    if weights is None:
        return [t.weight for t in task.teachers]
    if len(weights) != len(task.teachers) or not normalisable(weights):
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
        return data.train.batches(settings.batch_size, precision.device, shuffle=True, augment=task.augment,
                                  seed=settings.seed, views=views, pool_seed=task.data.split_seed, rank=world.rank,
                                  world_size=world.size, drop_last=True)

    if ensemble is None:
        return batches(None), None
    if settings.mixup:
        if settings.teacher_cache == "on":
            raise UserError("--mixup blends images the teacher-logit cache has no logits for; use --teacher_cache "
                            "auto or off (the teachers then run online)")
        log.info("the teachers run online on the blended images of --mixup (the logit cache holds none)")
        return batches(None), online_teachers(ensemble)
    if settings.teacher_cache != "off":
        pooled = batches(settings.teacher_cache_views or settings.num_epochs)
        size = cache_bytes(len(task.teachers), pooled.num_views, len(pooled.split), task.num_classes)
        if _use_cache(settings, pooled, size):
            if note := repeated_views_note(settings.num_epochs, pooled):
                log.info(note)  # not a warning: a tuner's trials and every DDP process would repeat it
            identities = [teacher_identity(task.teacher_checkpoint(t), teacher_build(t, task)) for t in task.teachers]
            log.info("teacher-logit cache: %d teachers x %d views x %d images, %.1f MB %s; each view computed the "
                     "first epoch that trains on it, then kept (%s)", len(identities), pooled.num_views,
                     len(pooled.split), size / 1e6, "on disk" if on_disk(pooled) else "in memory", settings.cache_dir)
            return pooled, TeacherLogitCache(list(ensemble.models), identities, pooled, precision,
                                             Path(settings.cache_dir), world)
    return batches(None), online_teachers(ensemble)


def _use_cache(settings: TrainSettings, pooled, size: int) -> bool:
    """Whether the pool's views of all teachers' logits (`size` bytes) fit: in BUDGET_BYTES of memory, or
    on disk for streamed data (`on` insists on the latter, and on memory beyond the budget)."""
    if on_disk(pooled):
        too_large = _disk_shortage(settings, size)
        if too_large and settings.teacher_cache == "on":
            raise UserError(f"the teacher-logit cache would take {too_large}; use fewer --teacher_cache_views, "
                            "another --cache_dir or --teacher_cache off")
    elif settings.teacher_cache == "on":
        return True
    else:
        too_large = f"{size / 1e9:.1f} GB exceeds the {BUDGET_BYTES / 1e9:.1f} GB budget" if size > BUDGET_BYTES \
            else None
    if too_large:
        log.info("teacher-logit cache off: %s", too_large)
        return False
    return True


def _disk_shortage(settings: TrainSettings, size: int) -> str | None:
    """Why a cache on disk (streamed data) cannot be written: over DISK_BUDGET_BYTES or the free space of
    --cache_dir; None when it fits (views already there count as space to write: an upper bound)."""
    Path(settings.cache_dir).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(settings.cache_dir).free
    if size <= DISK_BUDGET_BYTES and size <= free:
        return None
    return (f"{size / 1e9:.1f} GB on disk ({free / 1e9:.1f} GB free in {settings.cache_dir}, budget "
            f"{DISK_BUDGET_BYTES / 1e9:.0f} GB)")


class RunCheckpoints:
    """checkpoint_last.pt every epoch: model, optimizer, scheduler, grad scaler, RNG states and the
    metrics history, all a resumed run needs to continue bit for bit; checkpoint_best.pt (weights
    only) and student.safetensors on a new best validation accuracy."""

    def __init__(self, run_dir: Path, model, optimizer, scheduler, precision: Precision, trainee: Trainee):
        self.run_dir, self.model, self.optimizer = run_dir, model, optimizer
        self.scheduler, self.precision, self.metadata = scheduler, precision, dict(trainee.metadata)
        self.weights_path = run_dir / f"{trainee.role}.safetensors"
        self.metadata["params"] = count_parameters(model)
        self.best_val_acc, self.best_val_loss, self.best_epoch, self.epoch = -1.0, float("inf"), 0, 0
        self.history: list[dict] = []

    def _weights(self) -> dict:
        return {"model": self.model.state_dict(), "epoch": self.epoch, "best_val_acc": self.best_val_acc,
                "best_val_loss": self.best_val_loss, "best_epoch": self.best_epoch, "metadata": self.metadata}

    def _full_state(self) -> dict:
        return {**self._weights(), "optimizer": self.optimizer.state_dict(), "history": self.history,
                "scheduler": self.scheduler.state_dict(), "scaler": self.precision.scaler.state_dict(),
                "rng": rng_state()}

    def save(self, row: dict) -> None:
        self.epoch = row["epoch"]
        self.history.append(row)
        if self._is_best(row):
            self.best_val_acc, self.best_val_loss, self.best_epoch = row["val_acc"], row["val_loss"], row["epoch"]
            self.metadata.update(val_acc=row["val_acc"], epoch=row["epoch"])
            atomic_torch_save(self._weights(), self.run_dir / "checkpoint_best.pt")
            save_weights(self.model, self.weights_path, self.metadata)
        atomic_torch_save(self._full_state(), self.run_dir / "checkpoint_last.pt")

    def _is_best(self, row: dict) -> bool:
        """Higher validation accuracy; at equal accuracy (common on a small validation split that a good
        model gets all right) the lower validation loss, not the earlier epoch."""
        return (row["val_acc"], -row["val_loss"]) > (self.best_val_acc, -self.best_val_loss)

    def restore(self) -> list[dict]:
        """Load checkpoint_last.pt into the model, optimizer, scheduler, scaler and RNGs; return the history."""
        state = load_torch_checkpoint(self.run_dir / "checkpoint_last.pt")
        load_state_into(self.model, state["model"], f"{self.run_dir / 'checkpoint_last.pt'}")
        self.optimizer.load_state_dict(state["optimizer"])
        scheduler_state = state["scheduler"]
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):  # also an earlier release's cosine
            scheduler_state = {"lr_lambdas": [None] * len(self.scheduler.lr_lambdas), **scheduler_state}
        self.scheduler.load_state_dict(scheduler_state)
        self.precision.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.epoch, self.history = state["epoch"], state["history"]
        self.best_val_acc, self.best_epoch = state["best_val_acc"], state["best_epoch"]
        self.best_val_loss = state.get("best_val_loss", float("inf"))  # absent from earlier releases' checkpoints
        self.metadata.update({k: v for k, v in state["metadata"].items() if k in ("val_acc", "epoch")})
        return self.history

    def finish(self, test_batches) -> float:
        """Report the best checkpoint's test accuracy (selection used validation only)."""
        self.model.load_state_dict(load_torch_checkpoint(self.run_dir / "checkpoint_best.pt")["model"])
        test_acc = evaluate(self.model, test_batches, self.precision)["acc"]
        self.metadata["test_acc"] = test_acc
        save_weights(self.model, self.weights_path, self.metadata)
        log.info("best epoch %d: val acc %.4f, test acc %.4f", self.best_epoch, self.best_val_acc, test_acc)
        return test_acc


def _student_metadata(task: TaskConfig, student_name: str, settings: TrainSettings) -> dict:
    return {"student": student_name, "arch": STUDENT_ARCHS[student_name], "task": task.name,
            "classes": list(task.classes), "input_size": task.data.input_size,
            "channels": task.data.channels, "temperature": settings.temperature, "alpha": settings.alpha}


def _check_same_data(run_dir: Path, fingerprint: str) -> None:
    """A resumed run must see the training images it started with (runs of earlier releases recorded none)."""
    saved = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("data_fingerprint")
    if saved is not None and saved != fingerprint:
        raise UserError(f"cannot resume {run_dir}: its training data changed since the run started (files added, "
                        "removed or modified); start a new run, or restore the data")


def _resolved_config(settings, task, trainee: Trainee, precision, data_source, world: World, fingerprint) -> dict:
    return {"settings": dataclasses.asdict(settings), "trains": {"role": trainee.role, "label": trainee.label},
            "task": task.to_dict(), "data_source": data_source, "data_fingerprint": fingerprint,
            "device": str(precision.device),
            "processes": world.size, "global_batch_size": settings.batch_size * world.size,
            "precision": precision.name, "torch": torch.__version__, "python": platform.python_version()}


def _start_weights(pretrained: bool | Path) -> str:
    if isinstance(pretrained, Path):
        return f"the pretrained weights in {pretrained}"
    return "timm's pretrained weights" if pretrained else "random weights"


def _fmt(value) -> str:
    return "?" if value is None else f"{value:.4f}"
