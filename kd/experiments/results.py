"""The results page (docs/results.md) and the README's tables of results (the headline studies, the
methods, the techniques, task B beside the published table), made from the files under evaluation/,
never copied by hand: evaluation.py's summary, the teacher runs, the KD studies
(benchmarks/kd_study.py) and the tuning studies (tune.py).

    python -m kd.experiments.results           # rewrite docs/results.md and the README's tables
    python -m kd.experiments.results --check   # exit 1 when either is not what the files give
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from kd.experiments.study import (ARMS, BASELINE, TEACHER_ONLY, ArmStats, budget_of, confidence_interval, or_dash,
                                  read_rows, same_budget, summarize, verdict)
from kd.settings import TrainSettings

ROOT = Path(__file__).resolve().parents[2]
PAGE = Path("docs/results.md")
README = Path("README.md")
TABLE_START = "<!-- results table: made by python -m kd.experiments.results from evaluation/; do not edit -->"
TABLE_END = "<!-- end of the results table -->"
METHODS_START = "<!-- methods table: made by python -m kd.experiments.results from evaluation/; do not edit -->"
METHODS_END = "<!-- end of the methods table -->"
METHODS_STUDY = "TaskB_methods"  # the study of the README's methods table: every distillation method on task B
TECHNIQUES_START = "<!-- techniques table: made by python -m kd.experiments.results from evaluation/; do not edit -->"
TECHNIQUES_END = "<!-- end of the techniques table -->"
# Techniques on task B: each study is METHODS_STUDY's budget with one setting changed (the batch size with
# its scaled rate, or alpha with the temperature, counting as one), its runs paired by seed with
# METHODS_STUDY's of the same arm (the same start and teachers)
TECHNIQUE_STUDIES = ("TaskB_4ep_ema", "TaskB_4ep_ls01", "TaskB_4ep_flip", "TaskB_4ep_warmup", "TaskB_4ep_b512",
                     "TaskB_4ep_T4", "TaskB_4ep_a09_T4")
# The studies the README's table shows (the page shows every study): the quick start's recipe, train.py's
# defaults as a new user runs them, and task B's longest study of three seeds with the shipped teachers.
HEADLINES = ("TaskA_40ep_halved2_a09_T8_mixup", "TaskA_20ep_default_cache", "TaskB_20ep_flip")
PUBLISHED_START = "<!-- published table: made by python -m kd.experiments.results from evaluation/; do not edit -->"
PUBLISHED_END = "<!-- end of the published table -->"
# Task B's student studies the README sets beside the Fashion-MNIST benchmark table, by budget, and the rows
# of that table (the dataset's README) for the same or the nearest architecture, each shown once
PUBLISHED_STUDIES = ("TaskB_methods", "TaskB_8ep", "TaskB_20ep_flip", "TaskB_27ep_flip", "TaskB_27ep_flip_mixup")
PUBLISHED_ROWS = {"cs3darknet_s": "ResNet18: 94.9", "uniform": "MobileNet (v1): 95.0",
                  BASELINE: "2 Conv layers <100K: 92.5"}
ARM_NAMES = {BASELINE: "labels only", "uniform": "`kd`"}
# settings that say where or how fast a run ran, not what it learnt
NOT_RECIPE = ("device", "amp", "channels_last", "compile", "data_dir", "teacher_epochs", "teacher_weights")


@dataclass(frozen=True)
class Study:
    name: str
    task: str
    student: str
    budget: str  # the settings that differ from train.py's defaults, as flags
    teachers: str | None  # the distilling runs' teachers (runs.csv's content key); None: labels only
    test_images: int | None
    arms: list[ArmStats]
    runs: list[dict]  # runs.csv's rows of this experiment and student

    @property
    def best(self) -> ArmStats | None:
        """The distilling arm of the highest mean test accuracy (None: the study has only its baseline)."""
        return max((a for a in self.arms if a.arm != BASELINE), key=lambda a: a.mean, default=None)

    @property
    def baseline(self) -> ArmStats | None:
        return next((a for a in self.arms if a.arm == BASELINE), None)

    @property
    def seeds(self) -> int:
        return len(self.best.accuracies) if self.best else 0


def budget_flags(budget: dict) -> str:
    """The flags that set `budget` where it differs from train.py's defaults."""
    defaults = {**budget_of(TrainSettings()), "alpha": TrainSettings().alpha}  # as JSON values, like the rows'
    changed = {k: v for k, v in sorted(budget.items()) if k not in NOT_RECIPE and k in defaults and v != defaults[k]}
    return " ".join(flag_text(k, v) for k, v in changed.items())


def flag_text(name: str, value) -> str:
    """A setting as train.py takes it: a switch that is on by its name alone."""
    if value is True:
        return f"--{name}"
    return f"--{name} {value:g}" if isinstance(value, float) else f"--{name} {value}"


def full_budget(budget: dict) -> dict:
    """A row's budget with the settings added since it was written, at their defaults."""
    return {**budget_of(TrainSettings()), **budget}


def budget_groups(rows: list[dict]) -> list[tuple[dict, str | None, list[dict]]]:
    """A study folder's rows as (budget, teachers, rows) experiments: each one's distilling rows share their
    budget, alpha and teachers, and its labels-only rows are those of that budget (a labels-only run serves
    any setting of the teachers' term); of duplicate runs, the first."""
    def key(row):
        return json.dumps(full_budget(row["budget"]), sort_keys=True), row["alpha"], row["teachers"]

    distilling = [r for r in rows if r["arm"] != BASELINE]
    labels_only = [r for r in rows if r["arm"] == BASELINE]
    if not distilling:
        return [(full_budget(labels_only[0]["budget"]), None, labels_only)] if labels_only else []
    groups = []
    for budget_text, alpha, teachers in dict.fromkeys(map(key, distilling)):
        budget = json.loads(budget_text)
        members = [r for r in distilling if key(r) == (budget_text, alpha, teachers)]
        members += [r for r in labels_only if same_budget(r["budget"], budget, kd=False)]
        budget["alpha"] = alpha
        unique = {(r["student"], r["arm"], r["seed"]): r for r in reversed(members)}  # the first of duplicates
        groups.append((budget, teachers, list(reversed(unique.values()))))
    return groups


def read_studies(evaluation: Path) -> list[Study]:
    studies = []
    for folder in sorted((evaluation / "study").iterdir()):
        rows = read_rows(folder / "runs.csv")
        teachers_file = folder / "teachers.json"
        images = json.loads(teachers_file.read_text())["test_images"] if teachers_file.is_file() else None
        for budget, teachers, group in budget_groups(rows):
            budget = {**budget, "num_epochs": max(row["epochs"] for row in group)}
            for student, arms in summarize(group).items():
                runs = [row for row in group if row["student"] == student]
                studies.append(Study(folder.name, group[0]["task"], student, budget_flags(budget), teachers, images,
                                     arms, runs))
    return studies


def paired_text(arm: ArmStats) -> str:
    """The paired difference against labels only: its mean and 95% confidence interval, in points."""
    interval = confidence_interval(list(arm.paired.values()))
    if arm.paired_mean is None:
        return "-"
    if interval is None:
        return f"{or_dash(arm.paired_mean, '+.2f')} (one seed)"
    return f"{or_dash(arm.paired_mean, '+.2f')} [{or_dash(interval[0], '+.2f')}, {or_dash(interval[1], '+.2f')}]"


KD_ARMS = ("uniform", "uniform_online")  # the seed's loss, kd, from the cache or online: what a method is held against


def reference_arm(arm: ArmStats, arms: list[ArmStats]) -> ArmStats | None:
    """What an arm is held against besides labels only: another method against kd, another teacher
    weighting against its method uniformly weighted (so the label-aware `dist_confidence` against `dist`)."""
    spec = ARMS.get(arm.arm)
    if spec is None or not spec.kd or arm.arm in KD_ARMS:
        return None
    # another method, or kd weighted otherwise: against kd; another method weighted otherwise: against itself
    wanted = KD_ARMS if spec.weighting == "uniform" or spec.kd_loss == "kd" else (spec.kd_loss,)
    return next((a for a in arms if a.arm in wanted), None)


def versus_reference(arm: ArmStats, arms: list[ArmStats]) -> str:
    """The paired difference against the arm's reference_arm: mean [95% CI] points, and which arm it is."""
    reference = reference_arm(arm, arms)
    if reference is None:
        return "-"
    differences = [arm.accuracies[s] - reference.accuracies[s] for s in arm.accuracies if s in reference.accuracies]
    text = interval_text(differences)
    return text if text == "-" else f"{text} vs {reference.arm}"


def interval_text(differences: list[float]) -> str:
    """Paired differences as 'mean [95% CI]' in points; '-' below two pairs."""
    interval = confidence_interval(differences)
    if interval is None:
        return "-"
    return f"{statistics.fmean(differences):+.2f} [{interval[0]:+.2f}, {interval[1]:+.2f}]"


def accuracy_text(arm: ArmStats) -> str:
    return f"{arm.mean:.2f} ± {or_dash(arm.sd, '.2f')}"


def readme_table(studies: list[Study]) -> list[str]:
    lines = ["| task | student | budget (flags beyond the defaults) | arm | seeds | test acc % (mean ± sd) | "
             "vs labels only, paired: mean [95% CI] pts | verdict | test images |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in HEADLINES:
        study = most_seeds(studies, name)  # a folder may hold several experiments (other teachers, budgets)
        for arm in (study.baseline, study.best):
            if arm is not None:
                lines.append(f"| {study.task} | {study.student} | `{study.budget}` | {arm.arm} | "
                             f"{len(arm.accuracies)} | {accuracy_text(arm)} | {paired_text(arm)} | "
                             f"{arm.verdict} | {study.test_images or '-'} |")
    return lines


def students_section(evaluation: Path) -> list[str]:
    summary = evaluation / "summary.json"
    if not summary.is_file():
        return []
    lines = ["## The evaluated students (`python evaluation.py`)", "",
             "| task | student | test acc % | best teacher | its test acc % | ensemble % | run | test images |",
             "|---|---|---|---|---|---|---|---|"]
    for task in json.loads(summary.read_text())["tasks"]:
        if task.get("status") != "ok":
            continue
        metrics = json.loads((evaluation / f"Task{task['task']}" / "metrics.json").read_text())
        provenance = metrics["provenance"]
        lines.append(f"| {task['task']} | {task['student']} | {100 * task['student_acc']:.2f} | "
                     f"{task['best_teacher']} | {100 * task['best_teacher_acc']:.2f} | "
                     f"{100 * task['ensemble_acc']:.2f} | `{Path(provenance['run_dir']).name}` | "
                     f"{provenance['test_size']} |")
    return lines + ["", "One seed each; figures and metrics.json in evaluation/Task<name>/.", ""]


BEST_EPOCH = re.compile(r"best epoch (\d+): val acc ([\d.]+), test acc ([\d.]+)")


EPOCH_SECONDS = re.compile(r"epoch \d+/\d+ .*\| ([\d.]+)s$", re.MULTILINE)


@dataclass(frozen=True)
class TeacherRun:
    name: str
    arch: str
    epochs: int
    best_epoch: int
    val_acc: float  # percent, of the best epoch, as test_acc
    test_acc: float
    epoch_seconds: list[float]  # as logged, in order


def teacher_runs(evaluation: Path) -> list[TeacherRun]:
    """The finished teacher runs under evaluation/teacher_runs/, from their logs and task configs."""
    runs = []
    for folder in sorted(p for p in (evaluation / "teacher_runs").glob("*") if (p / "train.log").is_file()):
        log = (folder / "train.log").read_text()
        found = BEST_EPOCH.findall(log)
        if not found:
            continue
        epoch, val, test = found[-1]
        config = yaml.safe_load(next(folder.glob("*.yaml")).read_text())
        runs.append(TeacherRun(folder.name, ", ".join(t["arch"] for t in config["teachers"]),
                               sum(1 for _ in (folder / "metrics.csv").open()) - 1, int(epoch), 100 * float(val),
                               100 * float(test), [float(s) for s in EPOCH_SECONDS.findall(log)]))
    return runs


def teachers_section(evaluation: Path) -> list[str]:
    runs = teacher_runs(evaluation)
    if not runs:
        return []
    lines = ["## Teachers trained by their recipes (`train.py --teachers_only`)", "",
             "| run | architecture | epochs | best epoch | val acc % | test acc % |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.arch} | {r.epochs} | {r.best_epoch} | {r.val_acc:.2f} | {r.test_acc:.2f} |"
              for r in runs]
    return lines + ["", "One seed each; the log, metrics and task config of each run in evaluation/teacher_runs/.", ""]


def studies_section(studies: list[Study]) -> list[str]:
    lines = ["## KD studies (`benchmarks/kd_study.py`)", "",
             "Each arm trains the student once per seed at the study's budget; alpha0 is labels only (`--alpha 0`). "
             "The paired difference is the arm minus alpha0 on the same seed; \"gain\" or \"loss\" only where its "
             "95% confidence interval (Student's t) excludes zero. Each study's summary.md in evaluation/study/ "
             "has the per-seed figures, wall times and the command that reproduces it. A folder whose runs "
             "distilled other teachers (runs.csv's content key of their checkpoints) or ran other budgets shows "
             "one table for each.", ""]
    for study in studies:
        teachers = f"; teachers {study.teachers}" if study.teachers else ""
        lines += [f"### {study.name}: task {study.task}, {study.student}", "",
                  f"Budget: `{study.budget or '(train.py defaults)'}`{teachers}; test images: "
                  f"{study.test_images or '-'}.", "", *study_table(study), ""]
    return lines


def study_table(study: Study) -> list[str]:
    """A row per arm: its accuracy, its paired difference against labels only and, where the study has
    one for any arm, against its reference_arm."""
    compared = any(reference_arm(a, study.arms) for a in study.arms)
    lines = ["| arm | seeds | test acc % (mean ± sd) | vs alpha0, paired: mean [95% CI] pts | verdict |"
             + (" vs its reference arm, paired: mean [95% CI] pts |" if compared else ""),
             "|---|---|---|---|---|" + ("---|" if compared else "")]
    return lines + [f"| {a.arm} | {len(a.accuracies)} | {accuracy_text(a)} | {paired_text(a)} | {a.verdict} |"
                    + (f" {versus_reference(a, study.arms)} |" if compared else "") for a in study.arms]


def tuning_section(evaluation: Path) -> list[str]:
    files = sorted((evaluation / "tune").glob("*/best.yaml"))
    if not files:
        return []
    lines = ["## Tuning studies (`tune.py`)", "",
             "Settings chosen on validation accuracy; test accuracy read once at the end, then confirmed over "
             "seeds against train.py's defaults at the same budget.", ""]
    for path in files:
        best = yaml.safe_load(path.read_text())
        settings = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in best["best"]["settings"].items())
        lines += [f"### {best['study']}", "",
                  f"Trials: {best['trials']['complete']} complete, {best['trials']['pruned']} pruned. Best: "
                  f"{settings}; val {100 * best['best']['val_acc']:.2f}%, test {100 * best['best']['test_acc']:.2f}% "
                  f"(defaults: test {100 * best['defaults']['test_acc']:.2f}%).", "",
                  f"Command: `{' '.join(best['best']['command'].split())}`", ""]
        confirmation = best.get("confirmation")
        if confirmation:
            per_seed = confirmation["test_acc_percent"]
            differences = [v["tuned"] - v["defaults"] for v in per_seed.values()]
            interval = confidence_interval(differences)
            ci = "" if interval is None else f" [{interval[0]:+.2f}, {interval[1]:+.2f}]"
            lines += [f"Confirmation over seeds {', '.join(map(str, per_seed))}: tuned "
                      f"{confirmation['tuned_mean']:.2f} ± {confirmation['tuned_sd']:.2f}%, defaults "
                      f"{confirmation['defaults_mean']:.2f} ± {confirmation['defaults_sd']:.2f}%; paired "
                      f"{confirmation['paired_mean']:+.2f}{ci} pts: {verdict(differences)}.", ""]
    return lines


def results_page(evaluation: Path, studies: list[Study]) -> str:
    lines = ["# Results", "",
             "Made by `python -m kd.experiments.results` from the files under evaluation/ (a test checks that "
             "this page and the README's tables are what those files give); the discussion of how each was "
             "measured, and earlier releases' figures, are in CHANGELOG.md. Every accuracy is on the test "
             "split, which no choice looked at. All on 2-core x86 CPU machines.", "",
             *students_section(evaluation), *teachers_section(evaluation), *studies_section(studies),
             *tuning_section(evaluation)]
    return "\n".join(lines).rstrip() + "\n"


def with_table(readme: str, table: list[str], markers: tuple[str, str] = (TABLE_START, TABLE_END)) -> str:
    """The README with the text between the two markers replaced by `table`."""
    start_marker, end_marker = markers
    start, end = readme.find(start_marker), readme.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"{README} lacks the table markers {start_marker!r} ... {end_marker!r}")
    return readme[:start + len(start_marker)] + "\n" + "\n".join(table) + "\n" + readme[end:]


def methods_table(studies: list[Study]) -> list[str]:
    """The README's table of every distillation method: METHODS_STUDY's experiment of the most seeds."""
    study = most_seeds(studies, METHODS_STUDY)
    return [f"Task {study.task}, {study.student}, `{study.budget}`, {study.test_images} test images:", "",
            *study_table(study)]


def published_table(evaluation: Path, studies: list[Study]) -> list[str]:
    """Task B's evaluated teachers (each with the training run that made its checkpoint), their ensemble
    and the student's arms of PUBLISHED_STUDIES, each beside PUBLISHED_ROWS' row for its architecture or
    arm where it first appears. The flags every student row shares are said once, above the table."""
    metrics = json.loads((evaluation / "TaskB" / "metrics.json").read_text())
    params = {t["arch"]: t["params"] for t in metrics["teachers"].values()}
    params[metrics["student"]["name"]] = metrics["student"]["params"]
    unshown = dict(PUBLISHED_ROWS)
    rows = [("model", "trained here", "seeds", "wall time a run", "test acc %", "published row"), ("---",) * 6]
    logged = teacher_runs(evaluation)
    for teacher in metrics["teachers"].values():
        rows.append((f"teacher {teacher['arch']} ({params[teacher['arch']] / 1e6:.2f}M)",
                     *teacher_cells(teacher, logged), unshown.pop(teacher["arch"], "")))
    ensemble = metrics["ensemble"]
    rows.append((f"their {ensemble['weighting']} ensemble (T {ensemble['temperature']:g})", "", "", "",
                 f"{100 * ensemble['accuracy']:.2f}", ""))
    students = [(study, arm, runs, arm_flags(runs[0]))
                for study in (most_seeds(studies, name) for name in PUBLISHED_STUDIES)
                for arm in study.arms if arm.arm in ARM_NAMES
                for runs in [[r for r in study.runs if r["arm"] == arm.arm]]]
    shared = [f for f in students[0][3] if all(f in flags for *_, flags in students)]
    for study, arm, runs, all_flags in students:
        size = f" ({params[study.student] / 1e6:.2f}M)" if study.student in params else ""
        flags = " ".join(f for f in all_flags if f not in shared)
        rows.append((f"student {study.student}{size}, {ARM_NAMES[arm.arm]}", f"`{flags}` ({study.name})",
                     str(len(arm.accuracies)), wall_text(runs), accuracy_text(arm), unshown.pop(arm.arm, "")))
    return [f"Every student row also has `{' '.join(shared)}`:", "", *("| " + " | ".join(r) + " |" for r in rows)]


def teacher_cells(teacher: dict, runs: list[TeacherRun]) -> tuple[str, str, str, str]:
    """What trained an evaluated teacher, from the run of its architecture whose logged test accuracy is
    the checkpoint's (to a hundredth of a point): epochs, seeds, time, test accuracy. Its time is what the
    logged epochs add up to, and the fastest quarter's pace, which an epoch run beside other work does not
    slow: a run paused or crowded part of the way counts both."""
    accuracy = 100 * teacher["accuracy"]
    run = next((r for r in runs if r.arch == teacher["arch"] and abs(r.test_acc - accuracy) < 0.005), None)
    if run is None or not run.epoch_seconds:
        return "no training log in evaluation/teacher_runs/", "1", "-", f"{accuracy:.2f}"
    quiet = statistics.quantiles(run.epoch_seconds, n=4)[0] if len(run.epoch_seconds) > 1 else run.epoch_seconds[0]
    return (f"{run.epochs} epochs, its recipe", "1", f"{sum(run.epoch_seconds) / 60:.0f} min as logged; about "
            f"{run.epochs * quiet / 60:.0f} min at its fastest quarter's {quiet:.0f} s an epoch", f"{accuracy:.2f}")


def most_seeds(studies: list[Study], name: str) -> Study:
    """A study folder's experiment of the most seeds; of equals, the latest in runs.csv (an earlier one
    may have learnt from teachers since retrained)."""
    found = sorted(reversed([s for s in studies if s.name == name]), key=lambda s: -s.seeds)
    if not found:
        raise ValueError(f"evaluation/study/{name} holds no study for the README")
    return found[0]


def arm_flags(row: dict) -> list[str]:
    """The flags a run trained with; a labels-only run's without the teachers' term's."""
    flags = run_flags(row)
    if row["arm"] != BASELINE:
        return flags
    return [f for f in flags if f.split()[0].removeprefix("--") not in TEACHER_ONLY]


BUILT = {"teachers": "trained the teachers", "cache": "computed the teachers' logits"}  # runs.csv's built column


def wall_text(runs: list[dict]) -> str:
    """The time a run took, those of the runs that first paid for the teachers or their logits apart."""
    replays = [r["wall_s"] for r in runs if not r["built"]]
    builders = [r for r in runs if r["built"]]
    parts = [minutes(replays)] if replays else []
    if builders:
        what = " and ".join(BUILT.get(word, word)
                            for word in dict.fromkeys(" ".join(r["built"] for r in builders).split()))
        parts.append(f"{minutes([r['wall_s'] for r in builders])} for the run{'s' * (len(builders) > 1)} that "
                     f"also {what}")
    return "; ".join(parts)


def minutes(seconds: list[float]) -> str:
    """The range of `seconds` in minutes: to a tenth from under ten minutes, whole ones above."""
    digits = 1 if min(seconds) < 600 else 0
    low, high = (f"{value / 60:.{digits}f}" for value in (min(seconds), max(seconds)))
    return f"{low} min" if low == high else f"{low}-{high} min"


def technique_rows(technique: list[dict], reference: list[dict]) -> list[str]:
    """One line per arm of a technique study: what its flags add to the reference's budget, its validation
    and test accuracy against the reference's runs of the same arm and seed, and a distilling arm's test
    accuracy against labels only on the same seed (mean [95% CI] points); the verdict is validation's,
    where choices are made."""
    def key(row):
        return row["student"], row["arm"], row["seed"], row["teachers"]

    before = {key(r): r for r in reversed(reference)}  # the first of duplicates
    lines = []
    for student, arm in dict.fromkeys((r["student"], r["arm"]) for r in technique):
        mine = [r for r in technique if (r["student"], r["arm"]) == (student, arm)]
        pairs = [(r, before[key(r)]) for r in mine if key(r) in before]
        if not pairs:
            continue
        differences = {metric: [100 * (new[metric] - old[metric]) for new, old in pairs]
                       for metric in ("val_acc", "test_acc")}
        cells = [cell for metric, diffs in differences.items()
                 for cell in (f"{statistics.fmean(100 * new[metric] for new, _ in pairs):.2f}", interval_text(diffs))]
        added = " ".join(flag for flag in run_flags(pairs[0][0]) if flag not in run_flags(pairs[0][1]))
        lines.append(f"| `{added}` | {student} | {arm} | {len(pairs)} | {' | '.join(cells)} | "
                     f"{versus_labels_only(mine, technique + reference)} | {verdict(differences['val_acc'])} |")
    return lines


def run_flags(row: dict) -> list[str]:
    """The flags beyond train.py's defaults that a run trained with, alpha included."""
    return re.findall(r"--\S+(?: (?!--)\S+)?", budget_flags({**full_budget(row["budget"]), "alpha": row["alpha"]}))


def versus_labels_only(runs: list[dict], candidates: list[dict]) -> str:
    """Distilling runs' test accuracy against the first labels-only run of `candidates` of the same student,
    seed and budget (a labels-only run serves any setting of the teachers' term), as mean [95% CI] points."""
    if runs[0]["arm"] == BASELINE:
        return "-"
    differences = []
    for run in runs:
        budget = full_budget(run["budget"])
        match = next((c for c in candidates if c["arm"] == BASELINE and (c["student"], c["seed"]) ==
                      (run["student"], run["seed"]) and same_budget(c["budget"], budget, kd=False)), None)
        if match is not None:
            differences.append(100 * (run["test_acc"] - match["test_acc"]))
    return interval_text(differences)


def techniques_table(evaluation: Path) -> list[str]:
    """The README's table of short-budget techniques on task B (TECHNIQUE_STUDIES against METHODS_STUDY)."""
    reference = read_rows(evaluation / "study" / METHODS_STUDY / "runs.csv")
    lines = [f"Each against the same seeds' runs without it (study {METHODS_STUDY}, the methods table's budget):", "",
             "| flags added | student | arm | seeds | val acc % | vs without, val: mean [95% CI] pts | test acc % | "
             "vs without, test: mean [95% CI] pts | vs labels only, test: mean [95% CI] pts | "
             "verdict (on validation) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in TECHNIQUE_STUDIES:
        rows = read_rows(evaluation / "study" / name / "runs.csv")
        if rows:
            lines += technique_rows(rows, reference)
    return lines


def expected_files(root: Path = ROOT) -> dict[Path, str]:
    evaluation = root / "evaluation"
    studies = read_studies(evaluation)
    readme = with_table((root / README).read_text(), readme_table(studies))
    readme = with_table(readme, methods_table(studies), (METHODS_START, METHODS_END))
    readme = with_table(readme, techniques_table(evaluation), (TECHNIQUES_START, TECHNIQUES_END))
    readme = with_table(readme, published_table(evaluation, studies), (PUBLISHED_START, PUBLISHED_END))
    return {root / PAGE: results_page(evaluation, studies), root / README: readme}


def stale_files(expected: dict[Path, str]) -> list[Path]:
    """The files of `expected` whose text on disk is not what the files under evaluation/ give."""
    return [path for path, text in expected.items() if not path.is_file() or path.read_text() != text]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 when a file is stale")
    args = p.parse_args(argv)
    expected = expected_files()
    stale = stale_files(expected)
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is stale: run python -m kd.experiments.results", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(expected[path])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
