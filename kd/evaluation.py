"""Evaluate a task's trained student against its teachers on the test split.

Everything here reads runs and checkpoints and never writes to them; results go to
evaluation/Task<name>/ (metrics.json and four PNG figures).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from kd import metrics as m
from kd import plots
from kd.batches import input_size
from kd.cache import file_sha256
from kd.cli import train_command
from kd.config import TaskConfig, load_task_config
from kd.data import Split, TaskData, load_task_data
from kd.engine import EVAL_BATCH_SIZE, Precision, collect_logits, select_device
from kd.errors import UserError
from kd.files import shown_path
from kd.distillers import make_distiller
from kd.models import count_parameters
from kd.report import write_json
from kd.runs import read_metrics
from kd.speed import Speed, SpeedSettings, measure_speed, sequential_speed
from kd.streaming import FileSplit
from kd.record import RunRecord, load_student, newest_run, open_run
from kd.settings import TrainSettings
from kd.teachers import load_teachers

log = logging.getLogger("kd")
FIGURES = ("sample_predictions.png", "confusion_matrix.png", "training_curves.png", "student_vs_teachers.png")
RUN_SETTINGS = ("student_model", "temperature", "alpha", "teacher_weighting", "kd_loss", "kd_params", "test_time_flip")


def select_run(task: TaskConfig, runs_root, hint: str, run_dir=None, checkpoint=None) -> tuple[RunRecord, Path]:
    """(record, student weights) of the run to evaluate: the folder given, the checkpoint's folder, or the
    newest run of the task; a run of another task is refused."""
    if run_dir is None and checkpoint is None:
        run_dir = newest_run(task.name, runs_root, hint).run_dir
    record, weights = open_run(run_dir, checkpoint)
    if record.task_name != task.name:
        raise UserError(f"{record.run_dir} is a run of task {record.task_name}, not of task {task.name}")
    return record, weights


def run_teachers(record: RunRecord, live: TaskConfig, hint: str) -> dict[str, nn.Module]:
    """The teachers the run distilled, as its record names them, frozen. Evaluation never trains: a
    missing checkpoint is an error whose message ends with `hint`, the training command. A task config
    whose teachers changed since, or a teacher file retrained since, is named in a warning."""
    task = record.task
    if [(t.name, t.arch) for t in live.teachers] != [(t.name, t.arch) for t in task.teachers]:
        log.warning("the task config's teachers changed since %s was trained (now %s); evaluating the teachers "
                    "it distilled: %s", record.run_dir, ", ".join(t.name for t in live.teachers),
                    ", ".join(t.name for t in task.teachers))
    missing = [str(task.teacher_checkpoint(s)) for s in task.teachers if not task.teacher_checkpoint(s).is_file()]
    if missing:
        raise UserError(f"teacher checkpoint(s) missing: {', '.join(missing)}; train.py trains and saves "
                        f"missing teachers: {hint}")
    for spec in task.teachers:
        recorded = record.teacher_hashes.get(spec.name)
        if recorded is not None and file_sha256(task.teacher_checkpoint(spec)) != recorded:
            log.warning("teacher %s's checkpoint %s changed since %s distilled it; its numbers are the new file's",
                        spec.name, task.teacher_checkpoint(spec), record.run_dir)
    return dict(zip([t.name for t in task.teachers], load_teachers(task).models))


def ensemble_probabilities(teacher_logits: torch.Tensor, labels: torch.Tensor, settings: TrainSettings,
                           fixed_weights) -> torch.Tensor:
    """The teachers' combined target (N, C), formed and weighted exactly as the run's method trained on it."""
    distiller = make_distiller(settings.kd_loss, settings.kd_params, temperature=settings.temperature,
                               alpha=settings.alpha, weighting=settings.teacher_weighting, fixed_weights=fixed_weights)
    return distiller.teacher_probabilities(teacher_logits, labels)


def evaluate_task(task: str, run_dir=None, checkpoint=None, device: str = "auto", output_dir=None,
                  runs_root: str | os.PathLike = "runs", speed: SpeedSettings = SpeedSettings()) -> dict:
    """Evaluate a task's student (newest run by default) and the teachers it distilled on the test split.

    Everything but the run's choice comes from the run's record: the student as trained, its teachers,
    classes and data. Writes metrics.json and the figures to output_dir (default evaluation/Task<name>)
    and returns the metrics. `task` is 'A', 'B' or the path of a task config.
    """
    started = time.perf_counter()
    live = load_task_config(task)
    hint = train_command(TrainSettings(task=task))
    record, weights = select_run(live, runs_root, hint, run_dir, checkpoint)
    config, settings = record.task, record.settings
    teachers = run_teachers(record, live, hint)
    student, student_meta = load_student(record, weights)
    precision = Precision(select_device(device), None)  # fp32: the reference numbers, on any device
    data = load_task_data(config, settings.data_dir, settings.data_storage, settings.num_workers)
    log.info("task %s: evaluating %s (%s) on %d test images, device %s", config.name, record.run_dir,
             weights.name, len(data.test), precision.device)
    models = {"student": student, **{f"teacher {name}": t for name, t in teachers.items()}}
    size = input_size(data.test)  # what the models are fed, not the (larger) decoded images
    speeds = measure_speeds(models, (config.data.channels, size, size), speed)  # on CPU, where models were loaded
    logits, labels = predict_test_split(models, data.test, precision)
    results = score_models(config, settings, logits, labels, models, speeds)
    out = Path(output_dir) if output_dir else Path("evaluation") / f"Task{config.name}"
    results["provenance"] = {**provenance(record.run_dir, weights, student_meta, data, precision, speed, started),
                             "output_dir": str(out)}
    write_outputs(out, results, config, record.run_dir, data.test, logits["student"])
    return results


def measure_speeds(models: dict[str, nn.Module], image_shape, settings: SpeedSettings) -> dict[str, Speed]:
    log.info("measuring CPU speed of %d models (%d thread(s))", len(models), settings.threads)
    speeds = {}
    for name, model in models.items():
        speeds[name] = measure_speed(model, tuple(image_shape), settings)
        log.info("%-20s %8.2f ms/image at batch %d, %8.0f images/s at batch %d", name, speeds[name].latency_ms,
                 settings.latency_batch, speeds[name].throughput, settings.throughput_batch)
    return speeds


def predict_test_split(models: dict[str, nn.Module], split: Split | FileSplit, precision: Precision):
    """({name: logits (N, C) on CPU}, labels (N,)) for every model on the test split."""
    batches = split.batches(EVAL_BATCH_SIZE, precision.device)
    logits = {}
    for name, model in models.items():
        model.to(precision.device)
        logits[name], labels = collect_logits(model, tqdm(batches, desc=name, leave=False), precision)
    return logits, labels


def score_models(config: TaskConfig, settings: TrainSettings, logits: dict, labels: torch.Tensor,
                 models: dict[str, nn.Module], speeds: dict[str, Speed]) -> dict:
    """The metrics.json body: student, teachers and ensemble numbers."""
    student_pred = logits["student"].argmax(dim=1)

    def entry(name: str) -> dict:
        probs = logits[name].softmax(dim=1)
        return {"params": count_parameters(models[name]), "accuracy": m.accuracy(labels, probs.argmax(dim=1)),
                "ece": m.expected_calibration_error(probs, labels), **asdict(speeds[name])}

    teachers = {}
    for spec in config.teachers:
        name = f"teacher {spec.name}"
        agreement = m.agreement(student_pred, logits[name].argmax(dim=1))
        teachers[spec.name] = {"arch": spec.arch, "checkpoint": shown_path(config.teacher_checkpoint(spec)),
                               **entry(name), "agreement_with_student": agreement}
    ensemble = score_ensemble(config, settings, logits, labels, student_pred, speeds)
    ensemble["params"] = sum(t["params"] for t in teachers.values())
    student = {"name": settings.student_model, **entry("student"),
               "agreement_with_ensemble": ensemble["agreement_with_student"],
               **m.classification_scores(labels, student_pred, config.classes),
               "confusion_matrix": m.confusion_matrix(labels, student_pred, config.num_classes).tolist()}
    return {"task": config.name, "description": config.description, "classes": list(config.classes),
            "training": {key: getattr(settings, key) for key in RUN_SETTINGS},
            "student": student, "teachers": teachers, "ensemble": ensemble}


def score_ensemble(config: TaskConfig, settings: TrainSettings, logits: dict, labels: torch.Tensor,
                   student_pred: torch.Tensor, speeds: dict[str, Speed]) -> dict:
    names = [f"teacher {t.name}" for t in config.teachers]
    # the run's --teacher_weights where it was given them, else the config's, as in training
    fixed = settings.teacher_weights or [t.weight for t in config.teachers]
    probs = ensemble_probabilities(torch.stack([logits[n] for n in names]), labels, settings, fixed)
    return {"weighting": settings.teacher_weighting, "temperature": settings.temperature, "kd_loss": settings.kd_loss,
            **({"weights": list(fixed)} if settings.teacher_weighting == "fixed" else {}),
            # the 'confidence' scheme weighs teachers by their loss on the true label: an optimistic number
            "weights_use_true_labels": settings.teacher_weighting == "confidence",
            "accuracy": m.accuracy(labels, probs.argmax(dim=1)),
            "agreement_with_student": m.agreement(student_pred, probs.argmax(dim=1)),
            **asdict(sequential_speed([speeds[n] for n in names]))}


def provenance(run_dir: Path, weights: Path, student_meta: dict, data: TaskData, precision: Precision,
               speed: SpeedSettings, started: float) -> dict:
    return {"run_dir": shown_path(run_dir), "checkpoint": shown_path(weights),
            "checkpoint_epoch": student_meta.get("epoch"), "checkpoint_val_acc": student_meta.get("val_acc"),
            "test_size": len(data.test), "data_source": data.source, "data_storage": data.storage,
            "device": str(precision.device),
            "precision": precision.name, "speed": {"device": "cpu", **asdict(speed)},
            "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - started, 1)}


def write_outputs(out: Path, results: dict, config: TaskConfig, run_dir: Path, test: Split | FileSplit,
                  student_logits: torch.Tensor) -> None:
    """The four figures, then metrics.json last, so a metrics.json always comes with its figures."""
    out.mkdir(parents=True, exist_ok=True)
    name = f"task {config.name}, student {results['student']['name']}"
    plots.plot_sample_predictions(test.image, test.labels, student_logits.softmax(dim=1), config.classes,
                                  out / FIGURES[0])
    plots.plot_confusion_matrix(results["student"]["confusion_matrix"], config.classes, out / FIGURES[1],
                                f"Confusion matrix, {name} (row-normalised)")
    rows = read_metrics(run_dir / "metrics.csv") if (run_dir / "metrics.csv").is_file() else []
    if rows:
        plots.plot_training_curves(rows, out / FIGURES[2], f"Training of {name} ({run_dir.name})")
    else:
        log.warning("%s has no metrics.csv rows: no training curves", run_dir)
    plots.plot_student_vs_teachers(model_points(results), out / FIGURES[3],
                                   f"Task {config.name}: student vs teachers on the test set")
    results["figures"] = [f for f in FIGURES if (out / f).is_file()]
    write_json(results, out / "metrics.json")


def model_points(results: dict) -> list[plots.ModelPoint]:
    student, ensemble = results["student"], results["ensemble"]
    mirrored = " (judged with mirror images)" if results["training"].get("test_time_flip") else ""
    points = [plots.ModelPoint(f"student {student['name']}{mirrored}", "student", student["params"],
                               student["accuracy"], student["latency_ms"])]
    points += [plots.ModelPoint(f"{name} ({t['arch']})", "teacher", t["params"], t["accuracy"], t["latency_ms"])
               for name, t in results["teachers"].items()]
    points.append(plots.ModelPoint(f"ensemble ({ensemble['weighting']})", "ensemble", ensemble["params"],
                                   ensemble["accuracy"], ensemble["latency_ms"]))
    return points
