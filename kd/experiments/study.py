"""A measured accuracy study: each KD arm against alpha = 0 at the same budget, over seeds, per student.

Every run goes through kd.training.train_student. runs.csv gets one row per finished run as soon as
the run ends, so a killed study loses at most the run in progress and a rerun trains only the runs
that runs.csv lacks at the same budget. summary.md and study.png are rebuilt from runs.csv on every
invocation; teachers.json holds the teachers' and their ensemble's test accuracy.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import hashlib
import io
import json
import math
import re
import shlex
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib as mpl
import torch
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import t as student_t

from kd.cache import file_sha256
from kd.checkpoint import load_weights
from kd.files import atomic_write
from kd.cli import add_training_arguments
from kd.config import TASK_CONFIGS, TaskConfig, load_task_config
from kd.distillers import METHODS
from kd.engine import EVAL_BATCH_SIZE, Precision, select_device
from kd.errors import UserError
from kd.plots import STYLE, label_ticks_apart
from kd.report import write_json
from kd.record import run_name
from kd.teachers import load_teacher, teacher_accuracies
from kd.settings import STUDENT_ARCHS, TrainSettings, canonical_student_name
from kd.students import check_test_time_flip
from kd.training import load_data, train_student


@dataclass(frozen=True)
class Arm:
    kd: bool  # False: alpha = 0, hard labels only, no teachers
    weighting: str = "uniform"
    cache: str = "off"
    kd_loss: str = "kd"  # the distillation method (kd.distillers.METHODS)


ARMS = {
    "alpha0": Arm(kd=False),
    "uniform": Arm(True, "uniform", "on"),
    "entropy": Arm(True, "entropy", "on"),
    "confidence": Arm(True, "confidence", "on"),
    # against "uniform": does the cache cost accuracy against online teachers?
    "uniform_online": Arm(True, "uniform", "off"),
    # every other distillation method, uniformly weighted: an arm of its own name, from the cache where
    # the run can use one (a streamed folder's runs with mixup run the teachers online)
    **{name: Arm(True, "uniform", "auto", name) for name in METHODS if name != "kd"},
    # and with the label-aware weighting (as CA-MKD), which "confidence" gives kd
    **{f"{name}_confidence": Arm(True, "confidence", "auto", name) for name in METHODS if name != "kd"},
}
BASELINE = "alpha0"
DEFAULT_SEEDS = (1, 2, 3)
BUDGET_FLAGS = ("num_epochs", "lr", "batch_size", "temperature", "alpha", "weight_decay", "scheduler_step",
                "scheduler_gamma", "device")
RUN_KEYS = ("task", "student_model", "seed", "run", "teacher_weighting", "teacher_cache", "kd_loss", "output_dir",
            "resume")
# Where files go changes no result, and alpha is a column of its own (alpha0 rows serve every --alpha).
NOT_BUDGET = RUN_KEYS + ("alpha", "cache_dir")
# What only the teachers' term reads: an alpha0 row serves every value of these
TEACHER_ONLY = ("temperature", "teacher_epochs", "teacher_cache_views", "teacher_weights", "kd_params")
COLUMNS = ("task", "student", "arm", "seed", "alpha", "weighting", "cache", "teachers", "epochs", "wall_s",
           "best_epoch", "val_acc", "test_acc", "threads", "built", "run_dir", "budget")
CSV_TYPES = {"seed": int, "alpha": float, "epochs": int, "wall_s": float, "best_epoch": int, "val_acc": float,
             "test_acc": float, "threads": int, "budget": json.loads}
VERDICT_RULE = ('Verdict: d_s = arm minus alpha0 on the same seed s, in points; the 95% confidence interval of '
                'their mean is mean(d) +- t(0.975, n - 1) * sd(d) / sqrt(n) (Student\'s t, sd the sample standard '
                'deviation); "gain" where the whole interval is above zero, "loss" where it is below, otherwise '
                '"within noise" (so also with fewer than 2 paired seeds: add seeds where an interval is too wide to '
                'decide); "-" where no seed of the arm has an alpha0 run to pair with.')


@dataclass(frozen=True)
class StudyPlan:
    task: str  # A, B or the path of a task config file
    students: tuple[str, ...] = tuple(STUDENT_ARCHS)
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    arms: tuple[str, ...] = tuple(ARMS)
    settings: dict = field(default_factory=dict)  # TrainSettings values every run shares (see budget_settings)
    output_dir: str | None = None  # default: evaluation/study/Task<name>


@dataclass(frozen=True)
class ArmStats:
    """One arm of one student; accuracies and differences in percentage points."""

    arm: str
    accuracies: dict[int, float]  # seed -> test accuracy
    sd: float | None
    wall_s: float
    built: bool  # a run of this arm first trained the teachers or built the cache
    gain: float | None  # mean accuracy minus alpha0's
    paired: dict[int, float]  # seed -> this arm minus alpha0 on that seed
    paired_mean: float | None
    paired_sd: float | None
    verdict: str

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies.values())


def parse_overrides(pairs) -> dict:
    """KEY=VALUE strings -> {key: value}; values are read as YAML (true, null, 0.1, [1, 2]), and 1e-3 as a number."""
    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE, got {pair!r}")
        overrides[key.strip()] = _read_value(text)
    return overrides


def _read_value(text: str):
    value = yaml.safe_load(text)
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            return value
    return value


def budget_settings(flags: dict, overrides: dict) -> dict:
    """The TrainSettings values every run shares: the budget flags, plus --set overrides of other fields."""
    names = [f.name for f in dataclasses.fields(TrainSettings)]
    for key in overrides:
        if key not in names:
            raise UserError(f"--set {key}: no such training setting; choose from "
                            f"{', '.join(n for n in names if n not in RUN_KEYS and n not in flags)}")
        if key in flags:
            raise UserError(f"--set {key}: use --{key}")
        if key in RUN_KEYS:
            raise UserError(f"--set {key}: the study sets it for each run (--task/--config, --students, --seeds, "
                            "--arms, --output_dir)")
    parser = argparse.ArgumentParser()
    add_training_arguments(parser)
    actions = {action.dest: action for action in parser._actions}
    return {**flags, **{key: checked_override(actions.get(key), key, value) for key, value in overrides.items()}}


def checked_override(action: argparse.Action | None, key: str, value):
    """A --set value as train.py's flag of that name (`action`; None where train.py has none) would take it,
    through the flag's own type, range and choice checks, so a bad value stops the study before its first
    run, not inside it."""
    if action is None or (value is None and action.default is None):
        return value
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        if not isinstance(value, bool):
            raise UserError(f"--set {key}={value}: expected true or false")
        return value
    values = value if isinstance(value, tuple) else (value,)
    try:
        checked = tuple(action.type(str(v)) if action.type else v for v in values)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
        raise UserError(f"--set {key}={value}: {err}") from None
    if action.choices is not None and any(v not in action.choices for v in checked):
        raise UserError(f"--set {key}={value}: choose from {', '.join(map(str, action.choices))}")
    return checked if isinstance(value, tuple) else checked[0]


def run_study(plan: StudyPlan) -> str:
    """Train the planned runs runs.csv lacks, measure the teachers, write summary.md and study.png;
    returns the summary (markdown)."""
    plan = check_plan(plan)
    task = load_task_config(plan.task)
    base = base_settings(plan)
    check_test_time_flip(task, base.test_time_flip)
    out = study_folder(plan, task)
    table = out / "runs.csv"
    planned = planned_runs(plan)
    finished = finished_runs(read_rows(table), task.name, base, teachers_key(task))
    todo = [key for key in planned if key not in finished]
    print(f"task {task.name}: {len(planned)} runs planned, {len(planned) - len(todo)} already in {table}, "
          f"{len(todo)} to train", flush=True)
    for i, (student, arm, seed) in enumerate(todo, 1):
        row = train_arm(task, base, student, arm, seed, out)
        append_row(table, row)
        print(f"[{i}/{len(todo)}] {arm} {student} seed {seed}: test acc {row['test_acc']:.2%} in "
              f"{row['wall_s']:.0f}s", flush=True)
    teachers = measure_teachers(task, base, out / "teachers.json")
    done = finished_runs(read_rows(table), task.name, base, teachers_key(task))
    rows = [done[key] for key in planned if key in done]
    others = [row for key, row in done.items() if key not in planned]  # earlier studies' runs at this budget
    stats = summarize(rows + others)
    summary = format_study_summary(task, plan, base, out, rows, len(planned), stats, teachers, len(others))
    atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(summary))
    plot_study(stats, teachers, out / "study.png", f"Task {task.name}: test accuracy per arm, mean ± sd over seeds "
                                                   f"({base.num_epochs} epochs)")
    return summary


def check_plan(plan: StudyPlan) -> StudyPlan:
    """Unknown arms or students, or nothing to run, are the user's to fix; duplicates are dropped."""
    unknown = [arm for arm in plan.arms if arm not in ARMS]
    if unknown:
        raise UserError(f"unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    for name, values in (("students", plan.students), ("seeds", plan.seeds), ("arms", plan.arms)):
        if not values:
            raise UserError(f"no {name} given; pass at least one to --{name}")
    if plan.settings.get("alpha") == 0 and any(ARMS[arm].kd for arm in plan.arms):
        raise UserError("--alpha 0 would make every KD arm a copy of alpha0; give the KD arms' alpha (> 0)")
    students = tuple(dict.fromkeys(canonical_student_name(s) for s in plan.students))
    return dataclasses.replace(plan, students=students, seeds=tuple(dict.fromkeys(plan.seeds)),
                               arms=tuple(dict.fromkeys(plan.arms)))


def base_settings(plan: StudyPlan) -> TrainSettings:
    """The shared settings, on a named device: 'auto' would make rows from different machines look alike."""
    settings = TrainSettings(task=plan.task, **plan.settings)
    return dataclasses.replace(settings, device=select_device(settings.device).type)


def study_folder(plan: StudyPlan, task: TaskConfig) -> Path:
    return Path(plan.output_dir) if plan.output_dir else Path("evaluation") / "study" / f"Task{task.name}"


def planned_runs(plan: StudyPlan) -> list[tuple[str, str, int]]:
    """(student, arm, seed), seed by seed within a student so a stopped study leaves complete pairs."""
    return [(student, arm, seed) for student in plan.students for seed in plan.seeds for arm in plan.arms]


def arm_settings(base: TrainSettings, student: str, arm: str, seed: int, runs_dir: Path) -> TrainSettings:
    spec = ARMS[arm]
    return dataclasses.replace(base, student_model=student, seed=seed, run=f"{arm}_s{seed}",
                               output_dir=str(runs_dir), alpha=base.alpha if spec.kd else 0.0,
                               teacher_weighting=spec.weighting, teacher_cache=spec.cache, kd_loss=spec.kd_loss)


def train_arm(task: TaskConfig, base: TrainSettings, student: str, arm: str, seed: int, out: Path) -> dict:
    """Train one run through train_student and return its runs.csv row."""
    settings = arm_settings(base, student, arm, seed, out / "runs")
    remove_interrupted_runs(out / "runs", run_name(task.name, student, settings.temperature, settings.alpha,
                                                   settings.run))
    before = one_off_files(task, base)
    started = time.perf_counter()
    run_dir = train_student(settings)
    seconds = time.perf_counter() - started
    _, meta = load_weights(run_dir / "student.safetensors")
    built = [kind for kind, files in one_off_files(task, base).items() if files - before[kind]]
    spec = ARMS[arm]
    return {"task": task.name, "student": student, "arm": arm, "seed": seed, "alpha": settings.alpha,
            "weighting": spec.weighting if spec.kd else "none", "cache": spec.cache if spec.kd else "none",
            "teachers": teachers_key(task) if spec.kd else "",
            "epochs": settings.num_epochs, "wall_s": round(seconds, 2), "best_epoch": meta["epoch"],
            "val_acc": meta["val_acc"], "test_acc": meta["test_acc"], "threads": torch.get_num_threads(),
            "built": " ".join(built), "run_dir": run_dir.relative_to(out).as_posix(),
            "budget": json.dumps(budget_of(base), sort_keys=True)}


def one_off_files(task: TaskConfig, base: TrainSettings) -> dict[str, set[Path]]:
    """Teacher checkpoints and cache files: the first run that writes them pays for them in its wall time."""
    teachers = {task.teacher_checkpoint(spec) for spec in task.teachers}
    return {"teachers": {path for path in teachers if path.is_file()},
            "cache": set(Path(base.cache_dir).glob("*.safetensors"))}


def remove_interrupted_runs(runs_dir: Path, name: str) -> None:
    """Remove folders of this run name (name, name-2, ...) that have no final test accuracy: a killed
    study left them. Finished ones stay, since rows of another budget may point at them."""
    for folder in runs_dir.glob(f"{glob.escape(name)}*"):
        if re.fullmatch(re.escape(name) + r"(-\d+)?", folder.name) and "test_acc" not in run_metadata(folder):
            shutil.rmtree(folder)


def run_metadata(run_dir: Path) -> dict:
    try:
        return load_weights(run_dir / "student.safetensors")[1]
    except UserError:  # not written yet, or unreadable: the run did not finish
        return {}


def budget_of(settings: TrainSettings) -> dict:
    """The settings a row's result depends on besides its student, arm and seed, as JSON values."""
    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(settings).items() if k not in NOT_BUDGET}))


def same_budget(saved: dict, budget: dict, kd: bool = True) -> bool:
    """Settings TrainSettings gained after a row was written count at their defaults; a labels-only row
    (`kd` false) serves any setting of the teachers' term."""
    saved = {**budget_of(TrainSettings()), **saved}
    if not kd:
        saved, budget = ({k: v for k, v in b.items() if k not in TEACHER_ONLY} for b in (saved, budget))
    return saved == budget


def teachers_key(task: TaskConfig) -> str | None:
    """Names the task's teacher checkpoints by content, so a KD row counts only beside the teachers it
    learnt from; None while one is missing."""
    paths = [task.teacher_checkpoint(spec) for spec in task.teachers]
    if not all(path.is_file() for path in paths):
        return None
    listing = "\n".join(f"{spec.name} {file_sha256(path)}" for spec, path in zip(task.teachers, paths))
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def finished_runs(rows: list[dict], task_name: str, base: TrainSettings,
                  teachers: str | None) -> dict[tuple[str, str, int], dict]:
    """Rows of this task and budget by (student, arm, seed), KD rows only of the `teachers` (teachers_key);
    of duplicates, the first."""
    budget = budget_of(base)
    found = {}
    for row in rows:
        arm = ARMS.get(row["arm"])
        if (row["task"] == task_name and arm is not None and row["alpha"] == (base.alpha if arm.kd else 0.0)
                and (not arm.kd or row["teachers"] == teachers) and same_budget(row["budget"], budget, arm.kd)):
            found.setdefault((row["student"], row["arm"], row["seed"]), row)
    return found


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise UserError(f"{path} does not have this study's columns ({', '.join(COLUMNS)}); "
                            "move it away or pass another --output_dir")
        return [{key: CSV_TYPES.get(key, str)(value) for key, value in row.items()} for row in reader]


def append_row(path: Path, row: dict) -> None:
    """Add a row by rewriting the file atomically: a kill leaves the old table or the new one, never half a row."""
    old = path.read_text() if path.is_file() else ""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    if not old:
        writer.writeheader()
    writer.writerow(row)
    atomic_write(path, lambda tmp: Path(tmp).write_text(old + text.getvalue()))


def measure_teachers(task: TaskConfig, base: TrainSettings, path: Path) -> dict | None:
    """Each teacher's and the uniform ensemble's test accuracy, kept in `path` and measured again only
    when a checkpoint or T changes; None while a teacher checkpoint is missing."""
    checkpoints = {spec.name: task.teacher_checkpoint(spec) for spec in task.teachers}
    if not all(p.is_file() for p in checkpoints.values()):
        return None
    hashes = {name: file_sha256(p) for name, p in checkpoints.items()}
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("temperature") == base.temperature and \
            {name: t["sha256"] for name, t in saved.get("teachers", {}).items()} == hashes:
        return saved
    measured = score_teachers(task, base)
    for name, entry in measured["teachers"].items():
        entry.update(checkpoint=_relative(checkpoints[name]), sha256=hashes[name])
    write_json(measured, path)
    return measured


def score_teachers(task: TaskConfig, base: TrainSettings) -> dict:
    """Test accuracy of each teacher and of argmax(mean_k softmax(z_k / T)), in fp32."""
    device = torch.device(base.device)
    precision = Precision(device, None)
    test = load_data(task, base).test
    batches = test.batches(EVAL_BATCH_SIZE, device)
    models = {spec.name: load_teacher(spec, task)[0].to(device) for spec in task.teachers}
    teachers, ensemble = teacher_accuracies(models, batches, precision, base.temperature)
    return {"task": task.name, "temperature": base.temperature, "test_images": len(test), "device": base.device,
            "teachers": {spec.name: {"arch": spec.arch, "test_acc": teachers[spec.name]} for spec in task.teachers},
            "ensemble": {"rule": "argmax of the mean over teachers of softmax(z / T)", "test_acc": ensemble}}


def _relative(path: Path) -> str:
    """The path from the working directory where it lies below it, so the study's files name no machine."""
    try:
        return Path(path).resolve().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)


def summarize(rows: list[dict]) -> dict[str, list[ArmStats]]:
    """Per student (in row order), per arm (in ARMS order): the statistics of the summary table."""
    by_student: dict[str, list[dict]] = {}
    for row in rows:
        by_student.setdefault(row["student"], []).append(row)
    return {student: [arm_stats(arm, student_rows) for arm in ARMS if any(r["arm"] == arm for r in student_rows)]
            for student, student_rows in by_student.items()}


def arm_stats(arm: str, rows: list[dict]) -> ArmStats:
    """`rows`: one student's rows of every arm, whose alpha0 rows are the baseline."""
    own = [r for r in rows if r["arm"] == arm]
    accuracies = {r["seed"]: 100 * r["test_acc"] for r in own}
    baseline = {r["seed"]: 100 * r["test_acc"] for r in rows if r["arm"] == BASELINE}
    paired = {} if arm == BASELINE else {s: accuracies[s] - baseline[s] for s in sorted(accuracies) if s in baseline}
    gain = None
    if baseline and arm != BASELINE:
        gain = statistics.fmean(accuracies.values()) - statistics.fmean(baseline.values())
    return ArmStats(arm, accuracies, sample_sd(accuracies.values()), statistics.fmean(r["wall_s"] for r in own),
                    any(r["built"] for r in own), gain, paired,
                    statistics.fmean(paired.values()) if paired else None, sample_sd(paired.values()),
                    "baseline" if arm == BASELINE else verdict(list(paired.values())) if paired else "-")


def sample_sd(values) -> float | None:
    values = list(values)
    return statistics.stdev(values) if len(values) > 1 else None


def confidence_interval(differences: list[float]) -> tuple[float, float] | None:
    """The 95% confidence interval of the mean of paired differences (Student's t); None below 2 pairs."""
    if len(differences) < 2:
        return None
    mean, n = statistics.fmean(differences), len(differences)
    half = student_t.ppf(0.975, n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return mean - half, mean + half


def verdict(differences: list[float]) -> str:
    """See VERDICT_RULE."""
    interval = confidence_interval(differences)
    if interval is not None and interval[0] > 0:
        return "gain"
    if interval is not None and interval[1] < 0:
        return "loss"
    return "within noise"


def format_study_summary(task: TaskConfig, plan: StudyPlan, base: TrainSettings, out: Path, rows: list[dict],
                   planned: int, stats: dict[str, list[ArmStats]], teachers: dict | None, others: int = 0) -> str:
    threads = sorted({r["threads"] for r in rows}) or [torch.get_num_threads()]
    extras = [f"{k}={v}" for k, v in plan.settings.items() if k not in BUDGET_FLAGS]
    lines = [f"# KD study, task {task.name}", "",
             f"Budget of every run: epochs {base.num_epochs}, lr {base.lr:g}, batch size {base.batch_size}, "
             f"T {base.temperature:g}, alpha {base.alpha:g} (KD arms; alpha0 uses 0), weight decay "
             f"{base.weight_decay:g}, scheduler step {base.scheduler_step} gamma {base.scheduler_gamma:g}, "
             f"device {base.device}, torch threads {', '.join(map(str, threads))}"
             + (f"; also {', '.join(extras)}" if extras else "") + ".", "",
             f"Reproduce (trains only what runs.csv lacks): `{reproduce_command(plan, base, out)}`", "",
             f"{len(rows)} of {planned} planned runs are in runs.csv"
             + (f"; the tables also show its {others} other run(s) at this budget (other students, arms or seeds)"
                if others else "") + ". Test accuracy is that of each run's "
             "best-validation checkpoint. Arms: alpha0 = labels only; uniform, entropy, confidence = KD with that "
             "teacher weighting from the teacher-logit cache "
             f"({base.teacher_cache_views or base.num_epochs} views per image"
             f"{', each blended with a partner: mixup' if base.mixup else ''}); "
             "uniform_online = uniform KD with the teachers run online on fresh augmentation"
             f"{' (and, as alpha0, on batches each blended by one lam)' if base.mixup else ''}; "
             + ", ".join(name for name in METHODS if name != "kd") + " = that distillation method (--kd_loss), "
             "uniformly weighted, from the cache, and <method>_confidence the same with "
             "the confidence weighting. KD runs count only "
             "beside the teacher checkpoints they learnt from (runs.csv's teachers column), those below.", "",
             VERDICT_RULE, ""]
    for student, arms in stats.items():
        lines += [f"## {student}", "", *format_table(arms), ""]
    if any(a.built for arms in stats.values() for a in arms):
        lines += ["\\* one of these runs first trained the teachers or built the teacher-logit cache; its wall "
                  "time includes that.", ""]
    lines += format_teachers(teachers, stats)
    return "\n".join(lines) + "\n"


def format_table(arms: list[ArmStats]) -> list[str]:
    lines = ["| arm | test acc % (mean ± sd) | n | wall s (mean) | gain vs alpha0 (pts) | "
             "paired diffs per seed (pts) | paired mean ± sd | 95% CI | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a in arms:
        paired = ", ".join(f"s{seed} {d:+.2f}" for seed, d in a.paired.items()) or "-"
        interval = confidence_interval(list(a.paired.values()))
        ci = "-" if interval is None else f"{or_dash(interval[0], '+.2f')} .. {or_dash(interval[1], '+.2f')}"
        lines.append(f"| {a.arm} | {a.mean:.2f} ± {or_dash(a.sd, '.2f')} | {len(a.accuracies)} | "
                     f"{a.wall_s:.1f}{'*' if a.built else ''} | {or_dash(a.gain, '+.2f')} | {paired} | "
                     f"{or_dash(a.paired_mean, '+.2f')} ± {or_dash(a.paired_sd, '.2f')} | {ci} | {a.verdict} |")
    return lines


def or_dash(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    text = format(value, spec)
    # a difference that rounds to zero (-1e-15, -0.004) is no loss: never print "-0.00"
    return text.replace("-", "+" if "+" in spec else "", 1) if float(text) == 0 else text


def format_teachers(teachers: dict | None, stats: dict[str, list[ArmStats]]) -> list[str]:
    if teachers is None:
        return ["Teachers: not measured; their checkpoints do not exist yet (the first KD run trains them)."]
    ensemble = 100 * teachers["ensemble"]["test_acc"]
    scores = ", ".join(f"{name} ({t['arch']}) {100 * t['test_acc']:.2f}%" for name, t in teachers["teachers"].items())
    gaps = []
    for student, arms in stats.items():
        best = max(arms, key=lambda a: a.mean)
        gaps.append(f"{student} {best.arm} {best.mean:.2f}% ({best.mean - ensemble:+.2f} pts)")
    return [f"Teachers on the test split ({teachers['test_images']} images): {scores}; uniform ensemble "
            f"(argmax of the mean softmax(z/T), T={teachers['temperature']:g}): {ensemble:.2f}%.", "",
            f"Best arm per student against the ensemble: {'; '.join(gaps) or '-'}."]


def reproduce_command(plan: StudyPlan, base: TrainSettings, out: Path) -> str:
    task = ["--task", plan.task.upper()] if plan.task.upper() in TASK_CONFIGS else ["--config", plan.task]
    parts = ["python", "benchmarks/kd_study.py", *task, "--students", *plan.students,
             "--seeds", *map(str, plan.seeds), "--arms", *plan.arms]
    parts += [item for key in BUDGET_FLAGS for item in (f"--{key}", str(getattr(base, key)))]
    for key, value in plan.settings.items():
        if key not in BUDGET_FLAGS:
            parts += ["--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return shlex.join([*parts, "--output_dir", str(out)])


def plot_study(stats: dict[str, list[ArmStats]], teachers: dict | None, path: Path, title: str) -> None:
    """Per student, each arm's mean test accuracy with a ±sd bar and its seeds as dots; the ensemble dashed."""
    arms = [arm for arm in ARMS if any(a.arm == arm for arms in stats.values() for a in arms)]
    width = 0.8 / max(len(arms), 1)
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(max(8, 3 + 0.45 * len(arms) * len(stats)), 5), layout="constrained")
        FigureCanvasAgg(fig)  # rendered by Agg, without pyplot: no GUI backend, no global figure state
        ax = fig.subplots()
        labelled = set()
        for i, student in enumerate(stats):
            for a in stats[student]:
                x = i - 0.4 + width * (arms.index(a.arm) + 0.5)
                color = f"C{list(ARMS).index(a.arm)}"
                ax.errorbar([x], [a.mean], yerr=[a.sd or 0.0], fmt="o", capsize=4, color=color, markersize=7,
                            label=None if a.arm in labelled else a.arm)
                labelled.add(a.arm)
                ax.scatter([x] * len(a.accuracies), list(a.accuracies.values()), s=14, color=color, alpha=0.4)
        if teachers is not None:
            ensemble = 100 * teachers["ensemble"]["test_acc"]
            ax.axhline(ensemble, color="0.3", linestyle="--", label=f"teacher ensemble ({ensemble:.2f}%)")
        ax.set_xticks(range(len(stats)), list(stats))
        ax.set_xlim(-0.6, len(stats) - 0.4)
        ax.margins(y=0.08)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
        label_ticks_apart(ax)
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the points fill the axes
        ax.set_title(title)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
