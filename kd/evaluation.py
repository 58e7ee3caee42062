"""Evaluate a task's trained student against its teachers on the test split.

Everything here reads runs and checkpoints and never writes to them; results go to
evaluation/Task<name>/ (metrics.json and four PNG figures).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from tqdm import tqdm

from kd import metrics as m
from kd import plots
from kd.checkpoint import check_classes, load_state_into, load_weights
from kd.cli import ArgumentParser
from kd.config import TASK_CONFIGS, TaskConfig, load_task_config, parse_task_config
from kd.data import Split, TaskData, load_task_data
from kd.engine import Precision, collect_logits, select_device
from kd.errors import UserError, run_cli
from kd.losses import compute_teacher_weights, teacher_target
from kd.models import count_parameters
from kd.report import format_task_result, write_json
from kd.runs import read_metrics, setup_logging
from kd.speed import Speed, SpeedSettings, measure_speed, sequential_speed
from kd.streaming import FileSplit
from kd.students import build_student, with_stride_reduction
from kd.teachers import load_teacher

log = logging.getLogger("kd")
EVAL_BATCH_SIZE = 1024
STUDENT_CHECKPOINTS = ("student.safetensors", "checkpoint_best.pt")  # both hold the best-validation weights
FIGURES = ("sample_predictions.png", "confusion_matrix.png", "training_curves.png", "student_vs_teachers.png")
RUN_SETTINGS = ("student_model", "temperature", "alpha", "teacher_weighting")


@dataclass(frozen=True)
class RunSelection:
    run_dir: Path
    checkpoint: Path
    settings: dict  # the `settings` block of the run's config.yaml


def student_checkpoint(run_dir: Path) -> Path | None:
    """The run's best-validation student weights, or None while it has none yet."""
    return next((run_dir / n for n in STUDENT_CHECKPOINTS if (run_dir / n).is_file()), None)


def train_command(task: str) -> str:
    """The command that trains a student (and any missing teacher) for task key or config path `task`."""
    builtin = task.upper() in TASK_CONFIGS
    return f"python train.py --task {task.upper()}" if builtin else f"python train.py --config {task}"


def find_latest_run(task_name: str, runs_root: str | os.PathLike, hint: str) -> Path:
    """The most recently started run of the task that has a student checkpoint.

    Runs are ordered by their config.yaml, written once when a run starts; a newer run that has
    no checkpoint yet (still in its first epoch) is skipped with a warning. `hint` is the command
    that trains one, for the error when there is none.
    """
    runs = sorted((d for d in Path(runs_root).glob(f"Task{task_name}_*") if (d / "config.yaml").is_file()),
                  key=lambda d: ((d / "config.yaml").stat().st_mtime, d.name), reverse=True)
    if not runs:
        raise UserError(f"no run of task {task_name} yet in {runs_root}: {hint}")
    for run in runs:
        if student_checkpoint(run):
            return run
        log.warning("skipping %s: no checkpoint yet (still training, or stopped in its first epoch)", run)
    raise UserError(f"no run of task {task_name} in {runs_root} has a checkpoint yet (newest: {runs[0].name}); "
                    f"wait for its first epoch or train one: {hint}")


def resolve_run(task: TaskConfig, runs_root, hint: str, run_dir=None, checkpoint=None) -> RunSelection:
    """Pick the run folder (given, the checkpoint's folder, or the newest) and its student checkpoint."""
    if run_dir is None:
        run_dir = Path(checkpoint).parent if checkpoint else find_latest_run(task.name, runs_root, hint)
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    checkpoint = Path(checkpoint) if checkpoint else student_checkpoint(run_dir)
    if checkpoint is None:
        raise UserError(f"{run_dir} has no {' or '.join(STUDENT_CHECKPOINTS)} yet; is it still in its first epoch?")
    return RunSelection(run_dir, checkpoint, read_run_settings(config, run_dir / "config.yaml", task))


def read_run_config(run_dir: Path) -> dict:
    """The run's config.yaml, as train.py wrote it."""
    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"{run_dir} is not a run folder (it has no config.yaml); pass a folder made by train.py")
    try:
        return yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{config_path}: not valid YAML ({err})") from None


def read_run_settings(config: dict, config_path: Path, task: TaskConfig) -> dict:
    settings = config.get("settings") or {}
    missing = [key for key in RUN_SETTINGS if key not in settings]
    if missing:
        raise UserError(f"{config_path} lacks settings.{', settings.'.join(missing)}; was it written by train.py?")
    run_task = (config.get("task") or {}).get("name", settings.get("task"))
    if run_task != task.name:
        raise UserError(f"{config_path.parent} is a run of task {run_task}, not of task {task.name}")
    return settings


def run_task(run_dir: Path) -> TaskConfig:
    """The task a run was trained on (classes, input, data), from the copy in its config.yaml."""
    raw = read_run_config(run_dir).get("task")
    if not isinstance(raw, dict):
        raise UserError(f"{run_dir}/config.yaml has no task section; was it written by train.py?")
    return parse_task_config(raw, f"{run_dir}/config.yaml: task", root=Path(run_dir))


def open_run_student(run_dir=None, checkpoint=None) -> tuple[nn.Module, TaskConfig, RunSelection]:
    """A run's student (eval mode, CPU) and the task it was trained on: the run folder given, or the
    folder of the given checkpoint."""
    if run_dir is None and checkpoint is None:
        raise UserError("pass a run folder (--run_dir) or a student checkpoint inside one (--checkpoint)")
    run_dir = Path(run_dir) if run_dir else Path(checkpoint).parent
    task = run_task(run_dir)
    run = resolve_run(task, runs_root=None, hint="", run_dir=run_dir, checkpoint=checkpoint)
    return load_student(run, task)[0], task, run


def load_student(run: RunSelection, task: TaskConfig) -> tuple[nn.Module, dict]:
    """The run's student architecture with the checkpoint's weights, in eval mode; (model, metadata)."""
    state, meta = load_weights(run.checkpoint)
    check_classes(meta, task.classes, f"student checkpoint {run.checkpoint}")
    name = run.settings["student_model"]
    model = build_student(name, with_stride_reduction(task, name, run.settings.get("stride_reduction")))
    load_state_into(model, state, f"student checkpoint {run.checkpoint}")
    return model.eval(), meta


def load_teachers(task: TaskConfig, hint: str) -> dict[str, nn.Module]:
    """Every teacher of the task, frozen. Evaluation never trains: a missing checkpoint is an error
    whose message ends with `hint`, the training command (which trains missing teachers first)."""
    missing = [str(task.teacher_checkpoint(s)) for s in task.teachers if not task.teacher_checkpoint(s).is_file()]
    if missing:
        raise UserError(f"teacher checkpoint(s) missing: {', '.join(missing)}; train.py trains and saves "
                        f"missing teachers: {hint}")
    return {spec.name: load_teacher(spec, task)[0] for spec in task.teachers}


def ensemble_probabilities(teacher_logits: torch.Tensor, labels: torch.Tensor, scheme: str,
                           temperature: float, fixed_weights) -> torch.Tensor:
    """The teachers' combined target p_T (N, C), weighted exactly as in training."""
    weights = compute_teacher_weights(scheme, teacher_logits, labels, temperature, fixed_weights)
    return teacher_target(teacher_logits, temperature, weights)


def evaluate_task(task: str, run_dir=None, checkpoint=None, device: str = "auto", output_dir=None,
                  runs_root: str | os.PathLike = "runs", speed: SpeedSettings = SpeedSettings()) -> dict:
    """Evaluate a task's student (newest run by default) and teachers on the test split.

    Writes metrics.json and the figures to output_dir (default evaluation/Task<name>) and returns
    the metrics. `task` is 'A', 'B' or the path of a task config.
    """
    started = time.perf_counter()
    config = load_task_config(task)
    hint = train_command(task)
    run = resolve_run(config, runs_root, hint, run_dir, checkpoint)
    teachers = load_teachers(config, hint)
    student, student_meta = load_student(run, config)
    precision = Precision(select_device(device), None)  # fp32: the reference numbers, on any device
    data = load_task_data(config, run.settings.get("data_dir"), run.settings.get("data_storage"),
                          run.settings.get("num_workers"))
    log.info("task %s: evaluating %s (%s) on %d test images, device %s", config.name, run.run_dir,
             run.checkpoint.name, len(data.test), precision.device)
    models = {"student": student, **{f"teacher {name}": t for name, t in teachers.items()}}
    speeds = measure_speeds(models, data.test.image_shape, speed)  # on CPU, where models were loaded
    logits, labels = predict_test_split(models, data.test, precision)
    results = score_models(config, run, logits, labels, models, speeds)
    out = Path(output_dir) if output_dir else Path("evaluation") / f"Task{config.name}"
    results["provenance"] = {**provenance(run, student_meta, data, precision, speed, started), "output_dir": str(out)}
    write_outputs(out, results, config, run, data.test, logits["student"])
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


def score_models(config: TaskConfig, run: RunSelection, logits: dict, labels: torch.Tensor,
                 models: dict[str, nn.Module], speeds: dict[str, Speed]) -> dict:
    """The metrics.json body: student, teachers and ensemble numbers."""
    settings = run.settings
    student_pred = logits["student"].argmax(dim=1)

    def entry(name: str) -> dict:
        probs = logits[name].softmax(dim=1)
        return {"params": count_parameters(models[name]), "accuracy": m.accuracy(labels, probs.argmax(dim=1)),
                "ece": m.expected_calibration_error(probs, labels), **asdict(speeds[name])}

    teachers = {}
    for spec in config.teachers:
        name = f"teacher {spec.name}"
        teachers[spec.name] = {"arch": spec.arch, "checkpoint": spec.checkpoint, **entry(name),
                               "agreement_with_student": m.agreement(student_pred, logits[name].argmax(dim=1))}
    ensemble = score_ensemble(config, settings, logits, labels, student_pred, speeds)
    ensemble["params"] = sum(t["params"] for t in teachers.values())
    student = {"name": settings["student_model"], **entry("student"),
               "agreement_with_ensemble": ensemble["agreement_with_student"],
               **m.classification_scores(labels, student_pred, config.classes),
               "confusion_matrix": m.confusion_matrix(labels, student_pred, config.num_classes).tolist()}
    return {"task": config.name, "description": config.description, "classes": list(config.classes),
            "training": {key: settings[key] for key in RUN_SETTINGS},
            "student": student, "teachers": teachers, "ensemble": ensemble}


def score_ensemble(config: TaskConfig, settings: dict, logits: dict, labels: torch.Tensor,
                   student_pred: torch.Tensor, speeds: dict[str, Speed]) -> dict:
    names = [f"teacher {t.name}" for t in config.teachers]
    # the run's --teacher_weights where it was given them, else the config's, as in training
    fixed = settings.get("teacher_weights") or [t.weight for t in config.teachers]
    probs = ensemble_probabilities(torch.stack([logits[n] for n in names]), labels, settings["teacher_weighting"],
                                   settings["temperature"], fixed)
    return {"weighting": settings["teacher_weighting"], "temperature": settings["temperature"],
            **({"weights": list(fixed)} if settings["teacher_weighting"] == "fixed" else {}),
            # the 'confidence' scheme weighs teachers by their loss on the true label: an optimistic number
            "weights_use_true_labels": settings["teacher_weighting"] == "confidence",
            "accuracy": m.accuracy(labels, probs.argmax(dim=1)),
            "agreement_with_student": m.agreement(student_pred, probs.argmax(dim=1)),
            **asdict(sequential_speed([speeds[n] for n in names]))}


def provenance(run: RunSelection, student_meta: dict, data: TaskData, precision: Precision,
               speed: SpeedSettings, started: float) -> dict:
    return {"run_dir": str(run.run_dir), "checkpoint": str(run.checkpoint),
            "checkpoint_epoch": student_meta.get("epoch"), "checkpoint_val_acc": student_meta.get("val_acc"),
            "test_size": len(data.test), "data_source": data.source, "data_storage": data.storage,
            "device": str(precision.device),
            "precision": precision.name, "speed": {"device": "cpu", **asdict(speed)},
            "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - started, 1)}


def write_outputs(out: Path, results: dict, config: TaskConfig, run: RunSelection, test: Split | FileSplit,
                  student_logits: torch.Tensor) -> None:
    """The four figures, then metrics.json last, so a metrics.json always comes with its figures."""
    out.mkdir(parents=True, exist_ok=True)
    name = f"task {config.name}, student {results['student']['name']}"
    plots.plot_sample_predictions(test.image, test.labels, student_logits.softmax(dim=1), config.classes,
                                  out / FIGURES[0])
    plots.plot_confusion_matrix(results["student"]["confusion_matrix"], config.classes, out / FIGURES[1],
                                f"Confusion matrix, {name} (row-normalised)")
    rows = read_metrics(run.run_dir / "metrics.csv") if (run.run_dir / "metrics.csv").is_file() else []
    if rows:
        plots.plot_training_curves(rows, out / FIGURES[2], f"Training of {name} ({run.run_dir.name})")
    else:
        log.warning("%s has no metrics.csv rows: no training curves", run.run_dir)
    plots.plot_student_vs_teachers(model_points(results), out / FIGURES[3],
                                   f"Task {config.name}: student vs teachers on the test set")
    results["figures"] = [f for f in FIGURES if (out / f).is_file()]
    write_json(results, out / "metrics.json")


def model_points(results: dict) -> list[plots.ModelPoint]:
    student, ensemble = results["student"], results["ensemble"]
    points = [plots.ModelPoint(f"student {student['name']}", "student", student["params"],
                               student["accuracy"], student["latency_ms"])]
    points += [plots.ModelPoint(f"{name} ({t['arch']})", "teacher", t["params"], t["accuracy"], t["latency_ms"])
               for name, t in results["teachers"].items()]
    points.append(plots.ModelPoint(f"ensemble ({ensemble['weighting']})", "ensemble", ensemble["params"],
                                   ensemble["accuracy"], ensemble["latency_ms"]))
    return points


def task_parser(task: str | None) -> argparse.ArgumentParser:
    """The flags of evaluation_task<a|b>.py (`task` A or B) and of evaluation_task.py (None: --config is required)."""
    name = task or "<name>"
    p = ArgumentParser(description=f"Evaluate task {name}'s student and teachers on the test split: "
                                   f"metrics.json and figures in evaluation/Task{name}/.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, required=task is None, metavar="YAML",
                   help="a task config file (the one the run was trained with)" + (f"; overrides task {task}"
                                                                                     if task else ""))
    p.add_argument("--run_dir", default=None,
                   help=f"run folder to evaluate (default: the newest Task{name}_* run with a checkpoint)")
    p.add_argument("--checkpoint", default=None,
                   help="student weights (default: the run's student.safetensors, else checkpoint_best.pt)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="device for the test-set pass; speed is always measured on CPU")
    p.add_argument("--output_dir", default=None, help=f"where results go (default: evaluation/Task{name})")
    p.add_argument("--runs_root", default="runs", help="folder holding the run folders")
    return p


def main_for_task(task: str | None = None, argv: list[str] | None = None) -> None:
    """The whole of evaluation_task<a|b>.py and evaluation_task.py: parse flags, evaluate, print a short result."""
    args = vars(task_parser(task).parse_args(argv))
    config = args.pop("config") or task

    def main():
        setup_logging()
        print(format_task_result(evaluate_task(config, **args)))

    run_cli(main)
