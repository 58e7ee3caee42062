"""Student training: everything train.py does, as one function over plain values.

The story of a run: check what it is given (task, data, output folder, teacher files, the run it
resumes), train the teachers that are missing, write the run's record (kd.record), then train epoch
after epoch, checkpointing each (kd.resume), and report the best checkpoint's test accuracy.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import shutil
from collections.abc import Callable, Collection
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from kd.cache import TeacherLogitCache, file_sha256, open_teacher_cache
from kd.checkpoint import load_weights
from kd.files import atomic_write
from kd.config import Recipe, TaskConfig, TeacherSpec, load_task_config, normalisable
from kd.data import TaskData, load_task_data
from kd.distributed import World, broadcast, init_world, main_process_first, process_device, shutdown
from kd.engine import (EVAL_BATCH_SIZE, Mixup, Precision, WeightAverage, fit, online_teachers, seed_everything,
                       select_device, select_precision, Warmup)
from kd.errors import UserError
from kd.distillers import make_distiller
from kd.builds import ModelBuild
from kd.models import count_parameters
from kd.record import (LAST_CHECKPOINT, RunRecord, check_output_dir, create_run_dir, new_record, read_record,
                       resume_target, run_name, write_record)
from kd.resume import RunCheckpoints, extend_to, resumed_settings
from kd.runs import MetricsLog, log_to_file, setup_logging
from kd.settings import TrainSettings, canonical_student_name, settings_problem
from kd.streaming import FileSplit
from kd.students import student_build, with_stride_reduction
from kd.teachers import TeacherEnsemble, load_teacher, teacher_accuracies, teacher_build

log = logging.getLogger("kd")


@dataclass(frozen=True)
class Trainee:
    """What a run trains: a student, or a teacher trained from its recipe by the same machinery."""

    role: str  # "student" or "teacher": names the run's weights file, <role>.safetensors
    label: str  # for the log and the progress bar, e.g. "student MobileNetV3"
    model: ModelBuild  # how the network is built; recorded in config.yaml and with its weights
    metadata: dict  # saved with the weights; val/test accuracy and epoch are added
    pretrained: bool | Path = False  # where a new model's weights start (see kd.models.create_model)

    def build(self) -> nn.Module:
        return self.model.create(self.pretrained)


@dataclass(frozen=True)
class RunHooks:
    """What a caller that runs many trainings (the tuner) changes in one: the run itself is the same."""

    on_start: Callable[[Path], None] | None = None  # given the run folder before the first epoch
    on_epoch: Callable[[dict], None] | None = None  # after each epoch is saved; may raise to stop the run
    score_test: bool = True  # report the best checkpoint's test accuracy at the end
    quiet: bool = False  # console: warnings only and no progress bars (train.log keeps everything)


def train_student(settings: TrainSettings, given: Collection[str] | None = None, hooks: RunHooks = RunHooks()) -> Path:
    """Distil the task's teachers into a student; returns the run folder.

    Missing teachers are trained first, each in its own run (see `ensure_teachers`), after everything
    the run is given has been checked. A run that fails before its first checkpoint leaves no folder
    behind. With `resume`, the run continues in its own folder as its record says (its settings, task,
    student and teachers), except a larger `num_epochs` among the `given` settings (the names set
    explicitly; default: those that differ from the defaults), which trains on; the other given
    settings that differ from the run's are named in a warning. Under torchrun every process trains
    its shard of each batch; rank 0 alone logs and writes. `hooks` observe the run, skip the test
    split or quieten the console.
    """
    record, ignored = None, []
    if settings.resume:
        record = resume_target(settings.resume, _run_name(settings), settings.output_dir)
        settings, ignored = resumed_settings(record.settings, settings, given, record.run_dir)
        check_teachers_unchanged(record)
    student_name = canonical_student_name(settings.student_model)
    settings = dataclasses.replace(settings, student_model=student_name,  # config.yaml keeps the canonical name
                                   pretrained=record.settings.pretrained if record else start_weights(settings))
    with _session(settings, hooks.quiet, record.task if record else None) as (task, data, precision, world):
        if record is None:
            task = with_stride_reduction(task, student_name, settings.stride_reduction)
            check_output_dir(settings.output_dir)
        model = record.model if record else student_build(student_name, task, settings.test_time_flip)
        # a resumed run's weights come from its checkpoint; a new one's start weights are checked before any training
        trainee = Trainee("student", f"student {student_name}", model, _student_metadata(task, model, settings),
                          pretrained=False if record else _pretrained_path(settings.pretrained))
        if trainee.pretrained:
            trainee.build()
        ensemble = ensure_teachers(task, data, precision, world, settings.teacher_epochs) if settings.alpha > 0 \
            else None
        run_dir = record.run_dir if record else (create_run_dir(settings.output_dir, run_name(
            task.name, student_name, settings.temperature, settings.alpha, settings.run)) if world.is_main else None)
        run_dir = broadcast(run_dir)  # every process returns the run folder, not only rank 0
        if ignored:
            log.warning("--resume continues %s with the settings it was started with; ignored: %s", run_dir,
                        "; ".join(ignored))
        run_training(run_dir, settings, task, trainee, precision, data, world, ensemble, hooks)
        return run_dir


def start_weights(settings: TrainSettings) -> bool | str:
    """The student's start weights as the record keeps them: a weights file by its absolute path, checked
    to exist before anything is loaded."""
    if not isinstance(settings.pretrained, str):
        return settings.pretrained
    path = Path(settings.pretrained).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"--pretrained {settings.pretrained}: no such weights file")
    return str(path)


def _pretrained_path(pretrained: bool | str) -> bool | Path:
    return Path(pretrained) if isinstance(pretrained, str) else pretrained


def _run_name(settings: TrainSettings) -> str:
    """The folder name a run of these settings gets (--resume auto looks for it)."""
    return run_name(load_task_config(settings.task).name, canonical_student_name(settings.student_model),
                    settings.temperature, settings.alpha, settings.run)


def check_teachers_unchanged(record: RunRecord) -> None:
    """A resumed run distils the teachers it started with: each recorded checkpoint is there, unchanged."""
    for spec in record.task.teachers:
        path, recorded = record.task.teacher_checkpoint(spec), record.teacher_hashes.get(spec.name)
        if recorded is None:
            continue  # an earlier release's run, or one without teachers (alpha 0)
        if not path.is_file():
            raise UserError(f"cannot resume {record.run_dir}: teacher {spec.name}'s checkpoint {path} is gone")
        if file_sha256(path) != recorded:
            raise UserError(f"cannot resume {record.run_dir}: teacher {spec.name}'s checkpoint {path} changed since "
                            "the run started (another file, or retrained); restore it or start a new run")


def train_teachers(settings: TrainSettings) -> Path:
    """Train the task's missing teachers (each in its own resumable run) and report all of them;
    returns the folder of the first teacher's checkpoint. train.py --teachers_only."""
    with _session(settings) as (task, data, precision, world):
        ensemble = ensure_teachers(task, data, precision, world, settings.teacher_epochs)
        if world.is_main:
            log_teachers(ensemble, task)  # the accuracies each file's metadata records
            measured, accuracy = teacher_accuracies(dict(zip(ensemble.names, ensemble.models)),
                                                    data.test.batches(EVAL_BATCH_SIZE, precision.device), precision,
                                                    settings.temperature)
            for name, value in measured.items():  # of the weights as they are now (e.g. a half-precision copy)
                log.info("teacher %s: test acc %.2f%%, measured now", name, 100 * value)
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
def _session(settings: TrainSettings, quiet: bool = False, task: TaskConfig | None = None):
    """What every training command sets up first: the task (`task`, else the settings'), its data, the
    device and its precision, and the process group under torchrun (shut down on the way out)."""
    task = task or load_task_config(settings.task)
    if problem := settings_problem(settings):
        raise UserError(problem)
    fixed_teacher_weights(settings, task)  # wrong weights stop before any training
    device = select_device(settings.device)
    world = init_world(device, settings.dist_timeout)
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
    """The task's teachers, frozen: those with a checkpoint loaded (and so checked) first, then each
    missing one trained with its recipe through `run_training` and loaded.

    A teacher's run folder sits beside its checkpoint (see `teacher_run_dir`); a teacher run that was
    interrupted continues from its last finished epoch the next time its checkpoint is needed.
    """
    loaded = {spec.name: load_teacher(spec, task) for spec in task.teachers if task.teacher_checkpoint(spec).exists()}
    missing = [spec for spec in task.teachers if spec.name not in loaded]
    for spec in missing:
        _check_start_weights(spec, task)
    for spec in missing:
        train_teacher(spec, task, data, precision, world, teacher_epochs)
        loaded[spec.name] = load_teacher(spec, task)
    names = [spec.name for spec in task.teachers]
    return TeacherEnsemble({n: loaded[n][0] for n in names}, {n: loaded[n][1] for n in names}).to(precision.device)


def _check_start_weights(spec: TeacherSpec, task: TaskConfig) -> None:
    weights = task.pretrained_weights(spec)
    if isinstance(weights, Path) and not weights.is_file():
        raise UserError(f"teacher {spec.name}'s checkpoint {task.teacher_checkpoint(spec)} is missing, and the "
                        f"pretrained weights it would start from, {weights}, are not there either")


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
    checkpoint path; an interrupted teacher run is resumed as its record says."""
    path, run_dir = task.teacher_checkpoint(spec), teacher_run_dir(task, spec)
    settings, model = teacher_settings(spec.recipe, task, teacher_epochs), teacher_build(spec, task)
    resumed = (run_dir / LAST_CHECKPOINT).is_file()
    if resumed:
        record = read_record(run_dir)
        settings, model = dataclasses.replace(record.settings, resume=str(run_dir)), record.recorded_model or model
        log.warning("TEACHER CHECKPOINT MISSING: %s. Continuing the interrupted training of teacher %s (%s) "
                    "in %s.", path, spec.name, spec.arch, run_dir)
    else:
        log.warning("TEACHER CHECKPOINT MISSING: %s. Training teacher %s (%s) for %d epoch(s) with its recipe, "
                    "starting from %s; its run folder is %s.", path, spec.name, spec.arch, settings.num_epochs,
                    _start_weights(task.pretrained_weights(spec)), run_dir)
        if world.is_main:
            shutil.rmtree(run_dir, ignore_errors=True)  # a start that never finished an epoch
            run_dir.mkdir(parents=True)
    trainee = Trainee("teacher", f"teacher {spec.name}", model,
                      {"arch": spec.arch, "classes": list(task.classes), "task": task.name, "teacher": spec.name,
                       "recipe": dataclasses.asdict(spec.recipe), "pretrained": str(task.pretrained_weights(spec)),
                       "build": model.to_dict()},
                      pretrained=False if resumed else task.pretrained_weights(spec))  # resumed: its checkpoint's
    run_training(run_dir, settings, task, trainee, precision, data, world)
    with main_process_first(world):
        if world.is_main:
            atomic_write(path, lambda tmp: shutil.copyfile(run_dir / "teacher.safetensors", tmp))
    meta = load_weights(path)[1]
    log.warning("Trained teacher %s: val acc %.4f, test acc %.4f, saved to %s", spec.name, meta["val_acc"],
                meta["test_acc"], path)


# How every teacher trains; its recipe's fields that are also settings (lr, batch_size, ...) are its own.
TEACHER_SETTINGS = TrainSettings(alpha=0.0, student_model="", optimizer="adamw", lr_schedule="cosine")
_RECIPE_SETTINGS = {f.name for f in dataclasses.fields(Recipe)} & {f.name for f in dataclasses.fields(TrainSettings)}


def teacher_settings(recipe: Recipe, task: TaskConfig, teacher_epochs: int | None) -> TrainSettings:
    return dataclasses.replace(TEACHER_SETTINGS, task=task.name, num_epochs=teacher_epochs or recipe.epochs,
                               **{name: getattr(recipe, name) for name in _RECIPE_SETTINGS})


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
    if not (run_dir / LAST_CHECKPOINT).exists():
        shutil.rmtree(run_dir, ignore_errors=True)
    elif isinstance(err, KeyboardInterrupt) and trainee.role == "teacher":
        log.warning("interrupted; the teacher's last finished epoch is saved in %s. Run the same command again "
                    "to continue its training.", run_dir)
    elif isinstance(err, KeyboardInterrupt):
        log.warning("interrupted; the last finished epoch is saved. Continue with: "
                    "python train.py --resume %s", run_dir)


def _train_in(run_dir: Path, settings: TrainSettings, task: TaskConfig, trainee: Trainee, precision: Precision,
              data: TaskData, world: World, ensemble: TeacherEnsemble | None, hooks: RunHooks) -> None:
    device = precision.device
    log.info("task %s: %s | train %d, val %d, test %d images (%s)", task.name, task.description,
             len(data.train), len(data.val), len(data.test), data.source)
    log.info("data: %s", data.storage)
    log.info("device %s, precision %s, %d process(es)", device, precision.name, world.size)
    record = _open_record(run_dir, settings, task, trainee, precision, data, world, ensemble)
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
    if trainee.pretrained:
        log.info("%s starts from %s", trainee.label, _start_weights(trainee.pretrained))
    trained = _wrap_for_training(model, settings, device, world)
    average = WeightAverage(model, settings.ema_decay) if settings.ema_decay else None
    optimizer = make_optimizer(settings, model.parameters())
    scheduler = make_scheduler(settings, optimizer)
    val_batches = data.val.batches(EVAL_BATCH_SIZE, device)
    criterion = make_distiller(settings.kd_loss, settings.kd_params, temperature=settings.temperature,
                               alpha=settings.alpha, weighting=settings.teacher_weighting,
                               fixed_weights=fixed_teacher_weights(settings, task),
                               label_smoothing=settings.label_smoothing)

    checkpoints = RunCheckpoints(run_dir, model, optimizer, scheduler, precision, trainee.role, trainee.metadata,
                                 average)
    metrics = MetricsLog(run_dir) if world.is_main else None
    if settings.resume:
        history = checkpoints.restore()
        if metrics:
            metrics.rewrite(history)
        extend_to(settings.num_epochs, record, checkpoints, world.is_main)
        log.info("resuming %s after epoch %d of %d", run_dir, checkpoints.epoch, settings.num_epochs)
    if hooks.on_start:
        hooks.on_start(run_dir)

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
            progress=not hooks.quiet, mixup=Mixup(settings.mixup, task.num_classes) if settings.mixup else None,
            average=average, warmup=make_warmup(settings, len(train_batches)))
    finally:
        if metrics:
            metrics.close()
    if world.is_main and hooks.score_test:
        checkpoints.finish(data.test.batches(EVAL_BATCH_SIZE, device))


def _open_record(run_dir: Path, settings: TrainSettings, task: TaskConfig, trainee: Trainee, precision: Precision,
                 data: TaskData, world: World, ensemble: TeacherEnsemble | None) -> RunRecord:
    """A resumed run's record, checked against the data it is given; a new run's, written."""
    fingerprint = data.train.fingerprint
    if settings.resume:
        record = read_record(run_dir)
        saved = record.body.get("data_fingerprint")  # runs of earlier releases recorded none
        if saved is not None and saved != fingerprint:
            raise UserError(f"cannot resume {run_dir}: its training data changed since the run started (files "
                            "added, removed or modified); start a new run, or restore the data")
        return record
    teachers = {spec.name: {"arch": spec.arch, "checkpoint": str(task.teacher_checkpoint(spec)),
                            "sha256": file_sha256(task.teacher_checkpoint(spec))}
                for spec in task.teachers} if ensemble is not None else {}
    environment = {"data_source": data.source, "data_fingerprint": fingerprint, "device": str(precision.device),
                   "processes": world.size, "global_batch_size": settings.batch_size * world.size,
                   "precision": precision.name, "torch": torch.__version__, "python": platform.python_version()}
    body = new_record(settings, task, trainee.model, trainee.role, teachers, environment)
    if world.is_main:
        write_record(run_dir, body)
    return RunRecord(run_dir, body)


def make_optimizer(settings: TrainSettings, parameters) -> torch.optim.Optimizer:
    """Adam (the weight decay added to the gradients, the contract's default) or AdamW (decoupled)."""
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[settings.optimizer]
    return kind(parameters, lr=settings.lr, weight_decay=settings.weight_decay)


def make_warmup(settings: TrainSettings, steps_per_epoch: int) -> Warmup | None:
    if not settings.warmup_epochs:
        return None
    return Warmup(max(1, round(settings.warmup_epochs * steps_per_epoch)))


def make_scheduler(settings: TrainSettings, optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """StepLR (--scheduler_step, --scheduler_gamma) or a cosine decay to zero over the run's epochs.

    The cosine is written in closed form (a LambdaLR of the epoch), so a resumed run given more epochs
    follows the longer cosine from where it stands instead of continuing the finished one.
    """
    if settings.lr_schedule == "cosine":
        total = settings.num_epochs
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5 * (1 + math.cos(math.pi * epoch / total)))
    return torch.optim.lr_scheduler.StepLR(optimizer, settings.scheduler_step, settings.scheduler_gamma)


def fixed_teacher_weights(settings: TrainSettings, task: TaskConfig) -> list[float]:
    """The 'fixed' scheme's weights: given ones (one per teacher, not all zero) or the config's."""
    weights = settings.teacher_weights
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
    """(training batches, teacher logits per batch): replayed from the cache, run online, or None. With
    --mixup the cache holds the logits of a pool of blended views; a streamed folder's pool does not
    blend (kd.streaming), so there the teachers run online on each batch as kd.engine.Mixup blends it."""
    def batches(views, mixup=0.0):
        return data.train.batches(settings.batch_size, precision.device, shuffle=True, augment=task.augment,
                                  seed=settings.seed, views=views, pool_seed=task.data.split_seed, mixup=mixup,
                                  rank=world.rank, world_size=world.size, drop_last=True)

    if ensemble is None:
        return batches(None), None
    streamed_mixup = settings.mixup > 0 and isinstance(data.train, FileSplit)
    if streamed_mixup and settings.teacher_cache == "on":
        raise UserError("--mixup on a streamed image folder: its batches are blended as they come, which the "
                        "teacher-logit cache has no logits for; use --teacher_cache auto or off (the teachers "
                        "then run online)")
    if settings.teacher_cache != "off" and not streamed_mixup:
        pooled = batches(settings.teacher_cache_views or settings.num_epochs, settings.mixup)
        cache = open_teacher_cache(settings.teacher_cache, pooled, task, ensemble, precision, Path(settings.cache_dir),
                                   world, settings.num_epochs)
        if cache is not None:
            return pooled, cache
    if streamed_mixup:
        log.info("the teachers run online on the blended images of --mixup (a streamed folder's batches are "
                 "blended as they come, which the logit cache holds none of)")
    return batches(None), online_teachers(ensemble)


def _student_metadata(task: TaskConfig, model: ModelBuild, settings: TrainSettings) -> dict:
    return {"student": settings.student_model, "arch": model.arch, "task": task.name, "classes": list(task.classes),
            "input_size": model.input_size, "channels": model.channels, "temperature": settings.temperature,
            "alpha": settings.alpha, "pretrained": settings.pretrained, "build": model.to_dict()}


def _start_weights(pretrained: bool | Path) -> str:
    if isinstance(pretrained, Path):
        return f"the pretrained weights in {pretrained}"
    return "timm's pretrained weights" if pretrained else "random weights"


def _fmt(value) -> str:
    return "?" if value is None else f"{value:.4f}"
