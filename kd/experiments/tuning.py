"""Choosing temperature, alpha, learning rate, weight decay and teacher weighting by measurement.

An Optuna study (a seeded multivariate TPE sampler, a median pruner on each epoch's validation
accuracy) whose trials are train.py runs through kd.training.train_student, the teachers and their
logit cache prepared once for all of them. The study lives in a database (an SQLite file in the output
folder unless a storage URL names another), so a killed search continues where it stopped and several
processes or machines can work on one study. Only the validation split guides the search; the test
split is read at the end, for the best trial and for train.py's default values of the searched
settings at the same budget.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import os
import shutil
import socket
import statistics
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from kd import plots
from kd.checkpoint import load_weights
from kd.files import atomic_write
from kd.cli import bounded_float, positive_float, train_command, unit_interval
from kd.config import TaskConfig, load_task_config
from kd.distillers import METHODS
from kd.engine import EVAL_BATCH_SIZE, NonFiniteLoss, evaluate, select_device, select_precision
from kd.errors import UserError
from kd.record import open_run_student, read_record
from kd.record import run_name
from kd.settings import WEIGHTING_SCHEMES, TrainSettings, canonical_student_name
from kd.students import check_test_time_flip
from kd.experiments.study import or_dash, run_metadata, sample_sd, verdict
from kd.experiments.tune_plan import TunePlan
from kd.training import RunHooks, load_data, prepare_teachers, train_student

log = logging.getLogger("kd")

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what --trials counts
HEARTBEAT_S = 30  # a trial whose process stopped beating for GRACE_S is failed and run again
GRACE_S = 120
MAX_RETRIES = 2
OPEN_ATTEMPTS, OPEN_RETRY_S = 3, 1.0  # tries at opening the study storage, seconds between
PRUNER_STARTUP_TRIALS = 3  # complete trials before the pruner compares; a median of fewer says little
SIGNIFICANT_DIGITS = 3  # searched numbers are rounded so the best command line reads well


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False

    def suggest(self, trial: optuna.Trial, name: str) -> float:
        value = trial.suggest_float(name, self.low, self.high, log=self.log)
        return min(max(float(f"{value:.{SIGNIFICANT_DIGITS}g}"), self.low), self.high)

    def describe(self):
        return {"low": self.low, "high": self.high, "log": self.log}

    def contains(self, value) -> bool:
        return self.low <= value <= self.high

    def may_exceed(self, value: float) -> bool:
        return self.high > value


@dataclass(frozen=True)
class Choices:
    values: tuple

    def suggest(self, trial: optuna.Trial, name: str):
        return trial.suggest_categorical(name, self.values)

    def describe(self):
        return list(self.values)

    def contains(self, value) -> bool:
        return value in self.values

    def may_exceed(self, value: float) -> bool:
        return any(v > value for v in self.values)


@dataclass(frozen=True)
class Fixed:
    """A searchable setting held at one value: given on the command line or in the search-space file."""

    value: object

    def suggest(self, trial: optuna.Trial, name: str):
        return self.value

    def describe(self):
        return self.value

    def may_exceed(self, value: float) -> bool:
        return self.value > value


DEFAULT_SPACE = {
    "temperature": FloatRange(1.0, 8.0, log=True),
    "alpha": FloatRange(0.0, 1.0),
    "lr": FloatRange(1e-4, 1e-2, log=True),
    "weight_decay": FloatRange(1e-6, 1e-2, log=True),
    "teacher_weighting": Choices(("uniform", "entropy", "confidence")),
    "kd_loss": Fixed("kd"),  # the distillation method: a list of kd.distillers.METHODS searches it
}
CHOICES = {"teacher_weighting": WEIGHTING_SCHEMES, "kd_loss": tuple(METHODS)}  # settings named, not numbers
# A method's own parameters (--kd_params), searchable where the space file names them; a trial passes
# each to the methods that take it.
METHOD_PARAMS = {name: spec for method in METHODS.values() for name, spec in method.params.items()}
VALUE_TYPES = {"temperature": positive_float, "alpha": unit_interval, "lr": positive_float,
               "weight_decay": bounded_float(0.0)}  # train.py's checks of the same flags


def check_value(name: str, value, source: str):
    """A searched setting's value, checked as train.py checks its flag."""
    if name in CHOICES:
        if value not in CHOICES[name]:
            raise UserError(f"{source}: {name} {value!r} is not one of {', '.join(CHOICES[name])}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{source}: {name} needs a number, got {value!r}")
    kind = VALUE_TYPES.get(name) or bounded_float(METHOD_PARAMS[name].minimum)
    try:
        return kind(str(value))
    except argparse.ArgumentTypeError as err:
        raise UserError(f"{source}: {name} {err}") from None


def parse_param(name: str, raw, source: str):
    """{low, high[, log]} a range, [a, b, ...] choices, a single value fixes the setting."""
    if isinstance(raw, list):
        if not raw:
            raise UserError(f"{source}: {name} has an empty list of choices")
        return Choices(tuple(dict.fromkeys(check_value(name, v, source) for v in raw)))
    if not isinstance(raw, dict):
        return Fixed(check_value(name, raw, source))
    if name in CHOICES:
        raise UserError(f"{source}: {name} takes a list of names, not a range")
    unknown = sorted(set(raw) - {"low", "high", "log"})
    if unknown or "low" not in raw or "high" not in raw:
        raise UserError(f"{source}: {name} needs {{low: ..., high: ...}} and optionally log: true"
                        + (f"; unknown key {unknown[0]!r}" if unknown else ""))
    low, high, log_scale = check_value(name, raw["low"], source), check_value(name, raw["high"], source), raw.get("log")
    if not low < high:
        raise UserError(f"{source}: {name} has an empty range [{low:g}, {high:g}]; give low < high, or one value "
                        "to fix it")
    if log_scale not in (None, True, False):
        raise UserError(f"{source}: {name}: log must be true or false, got {log_scale!r}")
    if log_scale and low <= 0:
        raise UserError(f"{source}: {name}: a log range needs low > 0, got {low:g}")
    return FloatRange(low, high, bool(log_scale))


def load_search_space(path: str | None, fixed: dict) -> dict:
    """DEFAULT_SPACE, with the ranges of a YAML file (see configs/search_space.yaml) and the settings
    fixed on the command line."""
    space = dict(DEFAULT_SPACE)
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except OSError as err:
            raise UserError(f"cannot read the search space {path}: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise UserError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(raw or {}, dict):
            raise UserError(f"{path}: expected a mapping of setting: range, choices or value")
        for name, value in (raw or {}).items():
            if name not in DEFAULT_SPACE and name not in METHOD_PARAMS:
                raise UserError(f"{path}: unknown parameter {name!r}; the search covers {', '.join(DEFAULT_SPACE)} "
                                f"and the methods' parameters {', '.join(METHOD_PARAMS)}")
            space[name] = parse_param(name, value, path)
    space.update({name: Fixed(check_value(name, value, "--" + name)) for name, value in fixed.items()})
    if all(isinstance(p, Fixed) for p in space.values()):
        raise UserError("nothing to search: every parameter is fixed")
    return space


def describe_space(space: dict) -> dict:
    return {name: param.describe() for name, param in space.items()}


def run_tuning(plan: TunePlan) -> str:
    """Run the trials the study lacks, then write its results; returns the summary (markdown)."""
    task = load_task_config(plan.settings.task)
    check_test_time_flip(task, plan.settings.test_time_flip)
    student = canonical_student_name(plan.settings.student_model)
    settings = dataclasses.replace(plan.settings, student_model=student, resume=None, run="")
    plan = dataclasses.replace(plan, settings=settings)
    name = plan.study_name or f"Task{task.name}_{student}"
    out = Path(plan.output_dir) if plan.output_dir else Path("evaluation") / "tune" / name
    if plan.storage is None:
        out.mkdir(parents=True, exist_ok=True)
    study = open_study(plan.storage or f"sqlite:///{out / 'study.db'}", name, plan)
    reclaim_killed_trials(study)
    if finished_count(study) < plan.trials:
        if plan.space["alpha"].may_exceed(0.0):
            prepare_teachers(settings)  # once: trials replay the cache it builds
        search(study, plan, task, out)
    return report(study, plan, task, out)


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study's database; trials beat a heartbeat so that one whose process died is failed and
    retried (RetryHeartbeatStaleTrialCallback) by the next process that starts a trial."""
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(OPEN_ATTEMPTS):
        try:
            with _stable_enough():
                return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                                  grace_period=GRACE_S, heartbeat_stale_trial_callback=retry_trial)
        except Exception as err:  # a driver's own errors, a malformed URL, a missing driver module
            # workers started at once on a new database race to create Optuna's tables: the loser's
            # next attempt finds them made
            if attempt == OPEN_ATTEMPTS - 1:
                raise UserError(f"cannot open the study storage {_safe_url(url)}: {_first_line(err)}") from None
            time.sleep(OPEN_RETRY_S)


@contextmanager
def _stable_enough():
    """Heartbeats and the multivariate TPE have been in Optuna since 2.x and are what this search needs;
    their 'experimental' label is not news to the user."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _safe_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even a URL: say so without echoing what might be a password
        return "(unparsable URL)"


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def retry_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a trial that was stopped from outside (killed, interrupted, lost its heartbeat) to run again
    with the same settings, at most MAX_RETRIES times."""
    with _stable_enough():
        RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(study, trial)


def retry_of(trial: FrozenTrial) -> int | None:
    with _stable_enough():
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def open_study(url: str, name: str, plan: TunePlan) -> optuna.Study:
    """Create the study (its first trial: the defaults) or load it; one started with other settings or
    another search space is refused."""
    # the bar and one line per trial tell the story; a trial's error stops the search with its own message
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(url)
    try:  # the database decides which of several workers starting at once creates the study
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
        enqueue_defaults(study, plan.space)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage)
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise UserError(f"study {name!r} in {_safe_url(url)} minimises its objective: not a study of this tool")
    identity = {"budget": study_budget(plan.settings, plan.space), "space": describe_space(plan.space)}
    if "budget" not in study.user_attrs:  # new, or made by other code: it takes this command's settings
        # "budget" marks a study whose settings are written, so it goes last: a worker that loads the study
        # between the two writes sees no marker and writes the same settings, instead of seeing no space
        for key in ("space", "budget"):
            study.set_user_attr(key, identity[key])
    else:
        saved = {k: study.user_attrs.get(k) for k in identity}
        # settings TrainSettings gained after the study was started count at their defaults
        saved["budget"] = {**study_budget(TrainSettings(), plan.space), **saved["budget"]}
        differences = _differences(saved, identity)
        if differences:
            raise UserError(f"study {name!r} in {_safe_url(url)} was started with other settings ({differences}); "
                            "run it with the same ones, or pass another --study_name")
    with _stable_enough():
        study.sampler = optuna.samplers.TPESampler(
            seed=plan.sampler_seed + len(study.trials),  # a continued study does not replay its first draws
            multivariate=True, n_startup_trials=min(10, max(3, plan.trials // 3)))
    warmup = plan.prune_warmup or max(1, plan.settings.num_epochs // 4)
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=warmup) \
        if plan.prune else optuna.pruners.NopPruner()
    return study


def study_budget(settings: TrainSettings, space: dict) -> dict:
    """The settings a trial's result depends on besides the searched ones, as JSON values."""
    skip = {"run", "output_dir", "resume", "cache_dir", "data_dir"} | {
        name for name, param in space.items() if not isinstance(param, Fixed)}
    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(settings).items() if k not in skip}))


def _differences(saved: dict, now: dict) -> str:
    changes = []
    for section in now:
        old, new = saved[section] or {}, now[section]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                changes.append(f"{section} {key}: {old.get(key)!r} then, {new.get(key)!r} now")
    return "; ".join(changes)


def enqueue_defaults(study: optuna.Study, space: dict) -> None:
    """Make train.py's defaults of the searched settings the study's first trial: the baseline that the
    tuned settings are compared with, run once whichever worker takes it (not when outside the space)."""
    defaults = {name: value for name, value in default_values(space).items() if not isinstance(space[name], Fixed)}
    if all(space[name].contains(value) for name, value in defaults.items()):
        study.enqueue_trial(defaults, user_attrs={"role": "defaults"})


def reclaim_killed_trials(study: optuna.Study) -> None:
    """Fail and retry at once the running trials of processes of this machine that no longer exist
    (killed with -9, a lost session); other machines' trials are left to the heartbeat."""
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker") or {}
        if worker.get("host") == host and not _alive(worker.get("pid")):
            study.tell(trial.number, state=TrialState.FAIL)
            retry_trial(study, trial)
            log.warning("trial %d was left running by a process that no longer exists; it runs again",
                        trial.number)


def _alive(pid) -> bool:
    if not isinstance(pid, int):  # not recorded by this tool: the heartbeat decides
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def search(study: optuna.Study, plan: TunePlan, task: TaskConfig, out: Path) -> None:
    """Run trials until the study holds plan.trials finished ones (with several workers, each stops then)."""
    bar = tqdm(total=plan.trials, initial=finished_count(study), desc="trials", unit="trial", dynamic_ncols=True)

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        bar.n = min(finished_count(study), plan.trials)
        best = _best(study)
        if best is not None:
            bar.set_postfix_str(f"best val acc {best.value:.2%} (trial {best.number})")
        bar.refresh()
        tqdm.write(trial_line(trial))

    try:
        study.optimize(lambda trial: objective(trial, plan, task, out), gc_after_trial=True,
                       callbacks=[MaxTrialsCallback(plan.trials, states=FINISHED), after_trial])
    finally:
        bar.close()


def objective(trial: optuna.Trial, plan: TunePlan, task: TaskConfig, out: Path) -> float:
    """Train one run with the trial's settings; its best validation accuracy. Each epoch's validation
    accuracy goes to the pruner, which may stop the run."""
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
    values = {name: param.suggest(trial, name) for name, param in plan.space.items()}
    settings = dataclasses.replace(trial_settings(plan, values), run=f"trial{trial.number}",
                                   output_dir=str(out / "trials"))
    trial.set_user_attr("settings", values)

    def record_run(run_dir: Path) -> None:  # the folder this trial trains in, whatever else `trials/` holds
        trial.set_user_attr("run_dir", run_dir.relative_to(out).as_posix())

    def report_epoch(row: dict) -> None:
        trial.report(row["val_acc"], row["epoch"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"val acc {row['val_acc']:.4f} after epoch {row['epoch']}")

    started = time.perf_counter()
    try:
        run_dir = train_student(settings, hooks=RunHooks(on_start=record_run, on_epoch=report_epoch,
                                                         score_test=False, quiet=True))
    except NonFiniteLoss as err:  # a diverged run is a hopeless one: the sampler learns from it
        raise optuna.TrialPruned(str(err)) from None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the next run of the search repeats this trial
        retry_trial(trial.study, _frozen(trial))
        raise
    finally:
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
    return float(load_weights(run_dir / "student.safetensors")[1]["val_acc"])


def _frozen(trial: optuna.Trial) -> FrozenTrial:
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def _best(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def trial_line(trial: FrozenTrial) -> str:
    values = trial.user_attrs.get("settings", trial.params)
    if trial.state == TrialState.PRUNED:  # its value is the last epoch's validation accuracy, if any
        score = f"pruned after epoch {len(trial.intermediate_values)}" + (
            f" (val acc {trial.value:.2%})" if trial.value is not None else "")
    else:
        score = f"val acc {trial.value:.2%}" if trial.value is not None else trial.state.name.lower()
    return (f"trial {trial.number}: {score} | {format_values(values)} | "
            f"{trial.user_attrs.get('seconds', 0):.0f}s")


def format_values(values: dict) -> str:
    return ", ".join(f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"
                     for name, value in values.items())


# -- results ---------------------------------------------------------------------------------------------------


def report(study: optuna.Study, plan: TunePlan, task: TaskConfig, out: Path) -> str:
    """trials.csv, the figures, best.yaml and summary.md; the test split is read here, and only here."""
    out.mkdir(parents=True, exist_ok=True)  # with --storage, a worker that ran no trial has none yet
    trials = study.get_trials(deepcopy=False)
    write_trials_csv(trials, out / "trials.csv")
    write_figures(study, trials, out)
    best = _best(study)
    if best is None:
        raise UserError(f"study {study.study_name!r} has no complete trial yet; run more --trials")
    result = {"study": study.study_name, "trials": _state_counts(trials),
              "best": {"trial": best.number, **trial_scores(best, out, plan.settings),
                       "command": train_command(trial_settings(plan, best.user_attrs["settings"]))}}
    baseline = next((t for t in trials if t.user_attrs.get("role") == "defaults" and t.state == TrialState.COMPLETE),
                    None)
    if baseline is not None:
        result["defaults"] = {"trial": baseline.number, **trial_scores(baseline, out, plan.settings)}
    if plan.confirm_seeds:
        result["confirmation"] = confirm(trial_settings(plan, best.user_attrs["settings"]),
                                         trial_settings(plan, default_values(plan.space)), plan.confirm_seeds,
                                         out / "confirm")
    atomic_write(out / "best.yaml", lambda tmp: Path(tmp).write_text(yaml.safe_dump(result, sort_keys=False)))
    summary = format_tuning_summary(result, plan, out)
    atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(summary))
    return summary


def write_figures(study: optuna.Study, trials: list[FrozenTrial], out: Path) -> None:
    points = [plots.TrialPoint(t.number, t.value if t.state == TrialState.COMPLETE else _last_value(t),
                               t.state == TrialState.COMPLETE, *(t.user_attrs.get("settings", {}).get(name)
                                                                 for name in ("temperature", "alpha")))
              for t in trials if t.state in FINISHED]
    plots.plot_tuning_history(points, out / "history.png", f"{study.study_name}: validation accuracy per trial")
    plots.plot_temperature_alpha(points, out / "temperature_alpha.png", f"{study.study_name}: temperature x alpha")
    plots.plot_importances(importances(study), out / "importance.png", f"{study.study_name}: what mattered")


def _last_value(trial: FrozenTrial) -> float | None:
    return trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None


def importances(study: optuna.Study) -> dict[str, float] | None:
    """fANOVA importances of the searched settings (seeded); None before there are enough complete trials
    with differing values."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return None
    try:
        return optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError):  # e.g. every complete trial has the same values
        return None


def default_values(space: dict) -> dict:
    """train.py's defaults of the searched settings (fixed ones keep their value): the baseline."""
    defaults = TrainSettings()
    return {name: param.value if isinstance(param, Fixed) else
            METHOD_PARAMS[name].default if name in METHOD_PARAMS else getattr(defaults, name)
            for name, param in space.items()}


def trial_scores(trial: FrozenTrial, out: Path, settings: TrainSettings) -> dict:
    return {"settings": trial.user_attrs["settings"], "val_acc": trial.value,
            "test_acc": test_accuracy(out / trial.user_attrs["run_dir"], settings)}


def trial_settings(plan: TunePlan, values: dict) -> TrainSettings:
    """The settings of a trial of `values`: the searched settings set, and the searched method parameters
    that its method takes added to --kd_params."""
    method = values.get("kd_loss", plan.settings.kd_loss)
    params = [f"{name}={value}" for name, value in values.items() if name in METHODS[method].params]
    fields = {name: value for name, value in values.items() if name not in METHOD_PARAMS}
    return dataclasses.replace(plan.settings, **fields, kd_params=(*plan.settings.kd_params, *params))


def test_accuracy(run_dir: Path, settings: TrainSettings) -> float:
    """The test accuracy of a run's best-validation student."""
    model, record, _ = open_run_student(run_dir)
    precision = select_precision(select_device(settings.device), settings.amp)
    test = load_data(record.task, record.settings).test.batches(EVAL_BATCH_SIZE, precision.device)
    return evaluate(model.to(precision.device), test, precision)["acc"]


def ensure_run(settings: TrainSettings, folder: Path, run: str) -> Path:
    """A finished run of `settings` named `run` in `folder`: the one there, or trained now (a run of other
    settings or an unfinished one under that name is replaced). One process at a time per folder."""
    settings = dataclasses.replace(settings, output_dir=str(folder), run=run)
    task = load_task_config(settings.task)
    run_dir = folder / run_name(task.name, settings.student_model, settings.temperature, settings.alpha, run)
    if run_dir.is_dir():
        if "test_acc" in run_metadata(run_dir) and read_record(run_dir).settings == settings:
            return run_dir
        shutil.rmtree(run_dir)
    return train_student(settings, hooks=RunHooks(quiet=True))


def run_scores(run_dir: Path) -> dict:
    meta = load_weights(run_dir / "student.safetensors")[1]
    return {"val_acc": meta["val_acc"], "test_acc": meta["test_acc"]}


def confirm(tuned: TrainSettings, defaults: TrainSettings, seeds: tuple[int, ...], folder: Path) -> dict:
    """Tuned against default settings over seeds: test accuracy per seed, in percent, and the verdict."""
    rows = {}
    for seed in seeds:
        rows[seed] = {role: 100 * run_scores(ensure_run(dataclasses.replace(settings, seed=seed), folder,
                                                         f"{role}_s{seed}"))["test_acc"]
                      for role, settings in (("tuned", tuned), ("defaults", defaults))}
    differences = [row["tuned"] - row["defaults"] for row in rows.values()]
    return {"test_acc_percent": rows, **{f"{role}_mean": statistics.fmean(r[role] for r in rows.values())
                                         for role in ("tuned", "defaults")},
            **{f"{role}_sd": sample_sd([r[role] for r in rows.values()]) for role in ("tuned", "defaults")},
            "paired_mean": statistics.fmean(differences), "paired_sd": sample_sd(differences),
            "verdict": verdict(differences)}


def _state_counts(trials: list[FrozenTrial]) -> dict:
    counts = {state.name.lower(): 0 for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    for trial in trials:
        if trial.state.name.lower() in counts:
            counts[trial.state.name.lower()] += 1
    return counts


def write_trials_csv(trials: list[FrozenTrial], path: Path) -> None:
    names = list(DEFAULT_SPACE)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["trial", "state", "val_acc", "epochs", "seconds", *names, "retry_of", "run_dir"])
    for t in trials:
        values = t.user_attrs.get("settings", {})
        writer.writerow([t.number, t.state.name.lower(), "" if t.value is None else f"{t.value:.6f}",
                         len(t.intermediate_values), t.user_attrs.get("seconds", ""),
                         *(values.get(name, "") for name in names),
                         _blank(retry_of(t)), t.user_attrs.get("run_dir", "")])
    atomic_write(path, lambda tmp: Path(tmp).write_text(text.getvalue()))


def _blank(value) -> object:
    return "" if value is None else value


def format_tuning_summary(result: dict, plan: TunePlan, out: Path) -> str:
    best, defaults, counts = result["best"], result.get("defaults"), result["trials"]
    seed = plan.settings.seed
    lines = [f"# Tuning {result['study']}", "",
             f"Search space: {_space_text(plan.space)}.",
             f"Every trial: `{train_command(trial_settings(plan, default_values(plan.space)))}` with the searched "
             "settings replaced.", "",
             f"Trials: {counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed "
             f"(trials.csv, history.png, importance.png, temperature_alpha.png in {out}).", "",
             f"Best trial {best['trial']}: {format_values(best['settings'])}; val acc {best['val_acc']:.2%}.", "",
             f"Test accuracy (seed {seed}, read once at the end): tuned **{best['test_acc']:.2%}**, "
             + (f"train.py's defaults ({format_values(defaults['settings'])}, trial {defaults['trial']}) "
                f"{defaults['test_acc']:.2%} (val {defaults['val_acc']:.2%}) at the same budget."
                if defaults else "train.py's defaults not measured: they lie outside the search space, or their "
                                 "trial did not complete (--confirm_seeds trains them)."), "",
             f"Train the tuned student: `{best['command']}`", ""]
    if "confirmation" in result:
        c = result["confirmation"]
        per_seed = ", ".join(f"s{s} {r['tuned'] - r['defaults']:+.2f}" for s, r in c["test_acc_percent"].items())
        lines += [f"Confirmation over seeds {', '.join(map(str, c['test_acc_percent']))} (test accuracy %, mean ± sd): "
                  f"tuned {c['tuned_mean']:.2f} ± {or_dash(c['tuned_sd'], '.2f')}, defaults {c['defaults_mean']:.2f} ± "
                  f"{or_dash(c['defaults_sd'], '.2f')}; paired differences {per_seed}, mean {c['paired_mean']:+.2f} ± "
                  f"{or_dash(c['paired_sd'], '.2f')} points: **{c['verdict']}**.", ""]
    return "\n".join(lines)


def _space_text(space: dict) -> str:
    def text(param) -> str:
        if isinstance(param, FloatRange):
            return f"[{param.low:g}, {param.high:g}]" + (" log" if param.log else "")
        if isinstance(param, Choices):
            return "{" + ", ".join(map(str, param.values)) + "}"
        return f"fixed {param.value}"
    return "; ".join(f"{name} {text(param)}" for name, param in space.items())
