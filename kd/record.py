"""The run record: what a run was trained as, written once when it starts, read by all that comes after.

A run folder holds config.yaml, its record: the resolved settings, the task config as it was (with
absolute paths), how the model is built (kd.builds.ModelBuild), the teachers' checkpoint hashes and
when the run was created. The model's weights carry the same build in their metadata. Resume,
evaluation, export, predict and the tuner rebuild a run's model from here, never from the task YAML
as it is now. This module also names, creates and finds runs: by folder, by name (--resume auto),
and the newest of a task.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from kd.builds import ModelBuild
from kd.config import TaskConfig, parse_task_config, read_yaml
from kd.errors import UserError
from kd.files import atomic_write
from kd.runs import write_yaml
from kd.settings import TrainSettings, canonical_student_name
from kd.students import student_build, with_stride_reduction

if TYPE_CHECKING:
    import torch.nn as nn

log = logging.getLogger("kd")
RECORD_FILE = "config.yaml"
LAST_CHECKPOINT = "checkpoint_last.pt"
STUDENT_WEIGHTS = ("student.safetensors", "checkpoint_best.pt")  # both hold the best-validation weights


def run_name(task: str, student: str, temperature: float, alpha: float, suffix: str = "") -> str:
    """Task<A|B>_<student>_T<temperature>_a<alpha>[_<suffix>]"""
    name = f"Task{task}_{student}_T{temperature}_a{alpha}"
    return f"{name}_{suffix}" if suffix else name


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """The folder runs are created in, made if needed; a UserError when it cannot be made or written."""
    base = Path(output_dir)
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output folder {base}: {err.strerror}; pass a writable --output_dir") from None
    if not os.access(base, os.W_OK):
        raise UserError(f"output folder {base} is not writable; pass a writable --output_dir")
    return base


def create_run_dir(output_dir: str | os.PathLike, name: str) -> Path:
    """Create output_dir/name; if it exists, use name-2, name-3, ... so no run is overwritten."""
    base = check_output_dir(output_dir)
    for i in range(1, 10_000):
        candidate = base / (name if i == 1 else f"{name}-{i}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        if i > 1:
            log.warning("%s already exists; this run writes to %s", base / name, candidate)
        return candidate
    raise UserError(f"too many runs named {name} in {base}")


def new_record(settings: TrainSettings, task: TaskConfig, model: ModelBuild, role: str, teachers: dict,
               environment: dict) -> dict:
    """The body of a new run's config.yaml. `teachers`: {name: {arch, checkpoint, sha256}} of those it
    distils (none for a teacher's own run); `environment`: device, precision, processes, versions, data."""
    return {"created": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            "settings": dataclasses.asdict(settings), "trains": role, "model": model.to_dict(),
            "task": task.to_dict(), "teachers": teachers, **environment}


def write_record(run_dir: Path, body: dict) -> None:
    atomic_write(Path(run_dir) / RECORD_FILE, lambda tmp: write_yaml(body, Path(tmp)))


@dataclass(frozen=True)
class RunRecord:
    """A run folder and its config.yaml, as train.py wrote it."""

    run_dir: Path
    body: dict

    @property
    def path(self) -> Path:
        return self.run_dir / RECORD_FILE

    @cached_property
    def settings(self) -> TrainSettings:
        try:
            return TrainSettings(**self.body["settings"])
        except (KeyError, TypeError) as err:
            raise UserError(f"{self.path}: its settings are unreadable ({err}); was it written by train.py?") from None

    @cached_property
    def task(self) -> TaskConfig:
        """The task the run was trained on: the copy in its record, not the task YAML as it is now."""
        raw = self.body.get("task")
        if not isinstance(raw, dict):
            raise UserError(f"{self.path} has no task section; was it written by train.py?")
        return parse_task_config(raw, f"{self.path}: task", root=self.run_dir)

    @property
    def task_name(self) -> str:
        return (self.body.get("task") or {}).get("name", self.body.get("settings", {}).get("task"))

    @property
    def recorded_model(self) -> ModelBuild | None:
        """How the run's model is built, where its record says (runs of earlier releases do not)."""
        return ModelBuild.from_dict(self.body["model"], str(self.path)) if "model" in self.body else None

    @cached_property
    def model(self) -> ModelBuild:
        """How the run's student is built. Runs of earlier releases recorded no build: theirs follows from
        their recorded task and settings, as those releases built it."""
        if (recorded := self.recorded_model) is not None:
            return recorded
        name = canonical_student_name(self.settings.student_model)
        return student_build(name, with_stride_reduction(self.task, name, self.settings.stride_reduction),
                             self.settings.test_time_flip)

    @property
    def teacher_hashes(self) -> dict[str, str]:
        """{teacher name: its checkpoint's SHA-256 when the run started} (empty for earlier releases' runs)."""
        return {name: entry["sha256"] for name, entry in (self.body.get("teachers") or {}).items()}

    @property
    def created(self) -> float:
        """When the run was created (seconds since the epoch): its record's time, which resuming keeps.
        Runs of earlier releases recorded none: their config.yaml's modification time."""
        stamp = self.body.get("created")
        return datetime.fromisoformat(stamp).timestamp() if stamp else self.path.stat().st_mtime

    def with_epochs(self, num_epochs: int) -> "RunRecord":
        """The record of this run trained on to `num_epochs` (written by the caller with `save`)."""
        body = {**self.body, "settings": {**self.body["settings"], "num_epochs": num_epochs}}
        return RunRecord(self.run_dir, body)

    def save(self) -> None:
        write_record(self.run_dir, self.body)


def read_record(run_dir: str | os.PathLike) -> RunRecord:
    """The record of a run folder; a UserError when the folder is not a run of this project."""
    run_dir = Path(run_dir)
    path = run_dir / RECORD_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder (it has no {RECORD_FILE}); pass a folder made by train.py")
    body = read_yaml(path)
    if not isinstance(body, dict) or not isinstance(body.get("settings"), dict):
        raise UserError(f"{path} has no settings; was it written by train.py?")
    return RunRecord(run_dir, body)


def student_weights(run_dir: Path) -> Path | None:
    """The run's best-validation student weights, or None while it has none yet."""
    return next((run_dir / n for n in STUDENT_WEIGHTS if (run_dir / n).is_file()), None)


def find_runs(root: str | os.PathLike, prefix: str) -> list[RunRecord]:
    """The runs in `root` whose folder name starts with `prefix`, the most recently created first."""
    records = [read_record(d) for d in Path(root).glob(f"{prefix}*") if (d / RECORD_FILE).is_file()]
    return sorted(records, key=lambda r: (r.created, r.run_dir.name), reverse=True)


def newest_run(task_name: str, runs_root: str | os.PathLike, hint: str) -> RunRecord:
    """The most recently created run of the task that has student weights.

    A newer run that has none yet (still in its first epoch) is skipped with a warning. `hint` is the
    command that trains one, for the error when there is none.
    """
    runs = find_runs(runs_root, f"Task{task_name}_")
    if not runs:
        raise UserError(f"no run of task {task_name} yet in {runs_root}: {hint}")
    for run in runs:
        if student_weights(run.run_dir):
            return run
        log.warning("skipping %s: no checkpoint yet (still training, or stopped in its first epoch)", run.run_dir)
    raise UserError(f"no run of task {task_name} in {runs_root} has a checkpoint yet (newest: "
                    f"{runs[0].run_dir.name}); wait for its first epoch or train one: {hint}")


def resume_target(resume: str, name: str, output_dir: str | os.PathLike) -> RunRecord:
    """The run --resume continues: a run folder, its checkpoint, or (auto) the most recently created run
    named `name` (or name-2, name-3, ...) in output_dir that has a checkpoint_last.pt."""
    if resume != "auto":
        path = Path(resume)
        run_dir = path.parent if path.is_file() else path
        if not (run_dir / LAST_CHECKPOINT).is_file():
            raise UserError(f"cannot resume {resume}: no {LAST_CHECKPOINT} there")
        return read_record(run_dir)
    candidates = [r for r in find_runs(output_dir, name)
                  if _is_repeat_suffix(r.run_dir.name[len(name):]) and (r.run_dir / LAST_CHECKPOINT).is_file()]
    if not candidates:
        raise UserError(f"--resume auto: no run named {name} with a checkpoint in {output_dir}")
    return candidates[0]


def _is_repeat_suffix(suffix: str) -> bool:
    """'' or '-N': the suffixes create_run_dir gives repeated run names."""
    return suffix == "" or (suffix.startswith("-") and suffix[1:].isdigit())


def open_run(run_dir=None, checkpoint=None) -> tuple[RunRecord, Path]:
    """(record, student weights) of the run folder given, or of the given checkpoint's folder."""
    if run_dir is None and checkpoint is None:
        raise UserError("pass a run folder (--run_dir) or a student checkpoint inside one (--checkpoint)")
    record = read_record(Path(run_dir) if run_dir else Path(checkpoint).parent)
    weights = Path(checkpoint) if checkpoint else student_weights(record.run_dir)
    if weights is None:
        raise UserError(f"{record.run_dir} has no {' or '.join(STUDENT_WEIGHTS)} yet; is it still in its first epoch?")
    return record, weights


def load_student(record: RunRecord, weights: Path) -> tuple[nn.Module, dict]:
    """The run's student as it was trained, with the weights of `weights`, in eval mode: (model, metadata).

    The network is built from the run's record; weights that say they were built otherwise (another
    run's, say) are refused with the difference named.
    """
    from kd.checkpoint import check_classes, load_state_into, load_weights  # torch: only to load a network

    state, meta = load_weights(weights)
    source = f"student checkpoint {weights}"
    check_classes(meta, record.task.classes, source)
    build = record.model
    if "build" in meta:
        differences = ModelBuild.from_dict(meta["build"], source).differences(build)
        if differences:
            named = ", ".join(f"{key} {mine} (the run's: {theirs})" for key, (mine, theirs) in differences.items())
            raise UserError(f"{source} was built otherwise than the run {record.run_dir} records: {named}")
    model = build.create()
    load_state_into(model, state, source)
    return model.eval(), meta


def open_run_student(run_dir=None, checkpoint=None) -> tuple[nn.Module, RunRecord, Path]:
    """A run's student as trained (eval mode, CPU), its record and the weights file it was loaded from."""
    record, weights = open_run(run_dir, checkpoint)
    return load_student(record, weights)[0], record, weights
