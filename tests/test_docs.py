"""The manual is right: every command in README.md and docs/ parses with its script's parser, and the
results page and the README's results table are what the files under evaluation/ give."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

import evaluation
import train
import tune
from conftest import ROOT, load_benchmark
from kd import evaluation_cli
from kd import export, predict
from kd.cli import parse_with_recipe
from kd.experiments import results
from kd.experiments.study import summarize

MANUAL = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PARSERS = {
    "train.py": train.get_args_parser, "tune.py": tune.get_args_parser, "evaluation.py": evaluation.get_args_parser,
    "evaluation_taska.py": lambda: evaluation_cli.task_parser("A"),
    "evaluation_taskb.py": lambda: evaluation_cli.task_parser("B"),
    "evaluation_task.py": lambda: evaluation_cli.task_parser(None),
    "predict.py": predict.get_args_parser, "export.py": export.get_args_parser,
}
SCRIPT = re.compile(r"(?:^|\s)((?:benchmarks/)?\w+\.py)(\s|$)")


def shell_blocks(text: str):
    """The lines of each ```bash block, continuation lines joined."""
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
        yield from block.replace("\\\n", " ").splitlines()


def inline_commands(text: str):
    """Commands quoted in the text (`python train.py ...`), line breaks inside them joined."""
    for code in re.findall(r"`((?:python|torchrun) [^`]+)`", text):
        yield " ".join(code.split())


def commands() -> list[tuple[str, str]]:
    """(where, command line) of every python/torchrun command of a project script in the manual."""
    found = []
    for page in MANUAL:
        text = page.read_text()
        for line in [*shell_blocks(text), *inline_commands(text)]:
            words = shlex.split(line, comments=True)
            if words and words[0] in ("python", "torchrun") and SCRIPT.search(line):
                found.append((page.relative_to(ROOT).as_posix(), line.strip()))
    return found


def parser_for(script: str):
    if script.startswith("benchmarks/"):
        return load_benchmark(Path(script).stem).get_args_parser()
    return PARSERS[script]()


def test_the_manual_has_commands_of_every_script():
    scripts = {SCRIPT.search(line).group(1) for _, line in commands()}
    assert set(PARSERS) <= scripts and any(s.startswith("benchmarks/") for s in scripts)


BENCHMARKS = sorted(f"benchmarks/{path.name}" for path in (ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", [*PARSERS, *BENCHMARKS])
def test_every_scripts_help_can_be_shown(script):
    """--help formats each help string with %: a bare % in one (say "% of the peak") breaks --help alone."""
    assert "usage:" in parser_for(script).format_help()


@pytest.mark.parametrize("where, line", commands(), ids=lambda value: value[:80])
def test_every_command_in_the_manual_parses(where, line):
    words = shlex.split(line, comments=True)
    script = next(w for w in words if SCRIPT.fullmatch(f" {w}"))
    argv = [w for w in words[words.index(script) + 1:] if w != "..."]  # "...": flags the text leaves out
    parser = parser_for(script)
    try:
        parse_with_recipe(parser, argv) if script == "train.py" else parser.parse_args(argv)
    except SystemExit as err:
        pytest.fail(f"{where}: `{line}` does not parse (exit {err.code})")


def test_the_results_page_and_the_readme_table_are_current():
    stale = [path.relative_to(ROOT).as_posix() for path in results.stale_files(results.expected_files())]
    assert not stale, f"{stale} differ from what evaluation/ gives: run python -m kd.experiments.results"


def test_the_readme_is_a_manual_of_at_most_about_350_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 350


def row(arm, seed, acc, teachers="t1", **budget):
    return {"task": "A", "student": "MobileNetV3", "arm": arm, "seed": seed, "alpha": 0.0 if arm == "alpha0" else 0.6,
            "teachers": "" if arm == "alpha0" else teachers, "epochs": 20, "test_acc": acc, "wall_s": 1.0,
            "built": "", "budget": {"num_epochs": 20, "temperature": 2.0, **budget}}


def test_a_method_is_held_against_kd_and_another_weighting_against_its_method_uniformly_weighted():
    accuracies = {"alpha0": (0.90, 0.91, 0.92), "uniform": (0.93, 0.93, 0.94), "dist": (0.94, 0.95, 0.95),
                  "confidence": (0.92, 0.93, 0.93), "dist_confidence": (0.95, 0.95, 0.96)}
    rows = [row(arm, seed, acc) for arm, accs in accuracies.items() for seed, acc in enumerate(accs, 1)]
    arms = summarize(rows)["MobileNetV3"]
    # differences per seed: dist - uniform +1 +2 +1, confidence - uniform -1 0 -1, dist_confidence - dist
    # +1 0 +1; sd sqrt(1/3) each, so a half-width of t(0.975, 2) = 4.303 times 1/3
    assert {a.arm: results.versus_reference(a, arms) for a in arms} == {
        "alpha0": "-", "uniform": "-", "dist": "+1.33 [-0.10, +2.77] vs uniform",
        "confidence": "-0.67 [-2.10, +0.77] vs uniform", "dist_confidence": "+0.67 [-0.77, +2.10] vs dist"}


def test_a_study_folder_is_one_experiment_per_budget_and_teachers_with_the_labels_only_runs_of_its_budget():
    rows = [row("alpha0", 1, 0.90, temperature=8.0), row("alpha0", 2, 0.92, temperature=8.0),
            row("uniform", 1, 0.95, temperature=8.0), row("uniform", 2, 0.96, temperature=8.0),
            row("uniform", 1, 0.50, temperature=8.0),  # a duplicate: the first counts
            row("uniform", 1, 0.97, teachers="t2", temperature=8.0), row("uniform", 1, 0.91, lr=0.01)]
    groups = results.budget_groups(rows)
    assert [(b["temperature"], b["lr"], t, len(g)) for b, t, g in groups] == [
        (8.0, 0.001, "t1", 4), (8.0, 0.001, "t2", 3), (2.0, 0.01, "t1", 1)]  # labels only serves any temperature
    first = {(r["arm"], r["seed"]): r["test_acc"] for r in groups[0][2]}
    assert first[("uniform", 1)] == 0.95
    assert results.budget_flags({**groups[0][0], "num_epochs": 20}) == "--alpha 0.6 --num_epochs 20 --temperature 8"
    assert results.budget_flags({**groups[0][0], "test_time_flip": True}) == (
        "--alpha 0.6 --num_epochs 20 --temperature 8 --test_time_flip")


def test_a_technique_is_held_against_the_same_arm_and_seed_without_it_and_judged_on_validation():
    def scored(arm, seed, val, test, **budget):
        return {**row(arm, seed, test, **budget), "val_acc": val}

    reference = [scored("alpha0", s, v, t) for s, v, t in ((1, 0.90, 0.89), (2, 0.91, 0.90), (3, 0.92, 0.91))]
    technique = [scored("alpha0", s, v, t, ema_decay=0.999) for s, v, t in ((1, 0.91, 0.90), (2, 0.91, 0.92),
                                                                             (3, 0.93, 0.92))]
    # val differences +1 0 +1, test +1 +2 +1 points: sd sqrt(1/3), a half-width of 4.303 / 3
    assert results.technique_rows(technique, reference) == [
        "| `--ema_decay 0.999` | MobileNetV3 | alpha0 | 3 | 91.67 | +0.67 [-0.77, +2.10] | 91.33 | "
        "+1.33 [-0.10, +2.77] | - | within noise |"]
    flipped = [{**r, "budget": {**r["budget"], "test_time_flip": True}} for r in technique]  # a switch: its name
    assert results.technique_rows(flipped, reference)[0].startswith("| `--ema_decay 0.999 --test_time_flip` |")


def test_a_change_of_the_teachers_term_alone_is_held_against_the_reference_runs_of_kd_and_of_labels_only():
    def scored(arm, seed, val, test, alpha=None, **budget):
        return {**row(arm, seed, test, **budget), "val_acc": val, **({"alpha": alpha} if alpha else {})}

    reference = [scored("alpha0", s, 0.90, t) for s, t in ((1, 0.89), (2, 0.90), (3, 0.91))]
    reference += [scored("uniform", s, 0.92, t) for s, t in ((1, 0.90), (2, 0.91), (3, 0.92))]
    hotter = [scored("uniform", s, v, t, alpha=0.9, temperature=4.0)
              for s, v, t in ((1, 0.93, 0.91), (2, 0.92, 0.93), (3, 0.93, 0.93))]
    # against kd: val +1 0 +1, test +1 +2 +1; against labels only (the reference's, whose temperature
    # does not matter): test +2 +3 +2
    assert results.technique_rows(hotter, reference) == [
        "| `--alpha 0.9 --temperature 4` | MobileNetV3 | uniform | 3 | 92.67 | +0.67 [-0.77, +2.10] | 92.33 | "
        "+1.33 [-0.10, +2.77] | +2.33 [+0.90, +3.77] | within noise |"]
    longer = [{**r, "budget": {**r["budget"], "num_epochs": 40}} for r in hotter]  # another budget: no labels only
    assert results.technique_rows(longer, reference)[0].split(" | ")[-2] == "-"


def test_a_tuning_studys_confirmation_is_judged_from_its_seeds_not_the_verdict_it_stored(tmp_path):
    # +3 +3 +0 points: mean +2, an interval that holds zero, whatever verdict an older rule wrote down
    per_seed = {seed: {"tuned": 95.0 + gain, "defaults": 95.0} for seed, gain in ((1, 3.0), (2, 3.0), (3, 0.0))}
    best = {"study": "TaskA_tiny", "trials": {"complete": 4, "pruned": 1},
            "best": {"settings": {"lr": 0.005}, "val_acc": 0.97, "test_acc": 0.96, "command": "python train.py"},
            "defaults": {"test_acc": 0.95},
            "confirmation": {"test_acc_percent": per_seed, "tuned_mean": 97.0, "tuned_sd": 1.73,
                             "defaults_mean": 95.0, "defaults_sd": 0.0, "paired_mean": 2.0, "verdict": "gain"}}
    folder = tmp_path / "tune" / "TaskA_tiny"
    folder.mkdir(parents=True)
    (folder / "best.yaml").write_text(yaml.safe_dump(best))
    confirmation = results.tuning_section(tmp_path)[-2]
    assert confirmation.endswith("paired +2.00 [-2.30, +6.30] pts: within noise.")


def test_a_published_row_says_what_a_run_costs_apart_from_the_runs_that_built_the_teachers_logits():
    runs = [{**row("uniform", seed, 0.93, temperature=8.0), "wall_s": wall, "built": built}
            for seed, (wall, built) in enumerate([(2017.0, ""), (2034.0, ""), (6570.0, "cache")], 1)]
    assert results.wall_text(runs) == "34 min; 110 min for the run that also computed the teachers' logits"
    runs[1] = {**runs[1], "built": "teachers cache", "wall_s": 6780.0}
    assert results.wall_text(runs) == ("34 min; 110-113 min for the runs that also trained the teachers and "
                                       "computed the teachers' logits")
    assert results.wall_text(runs[:1]) == "34 min"
    assert results.minutes([570.0, 623.0]) == "9.5-10.4 min"  # to a tenth from under ten minutes
    assert results.arm_flags(runs[0]) == ["--alpha 0.6", "--num_epochs 20", "--temperature 8"]
    labels_only = {**runs[0], "arm": "alpha0", "alpha": 0.0}  # the teachers' term's settings do not apply
    assert results.arm_flags(labels_only) == ["--alpha 0", "--num_epochs 20"]


def test_a_teachers_cost_is_as_logged_and_at_its_fastest_quarters_pace_which_a_paused_epoch_does_not_slow(
        tmp_path):
    folder = tmp_path / "teacher_runs" / "TaskB_tiny"
    folder.mkdir(parents=True)
    (folder / "task.yaml").write_text(yaml.safe_dump({"teachers": [{"arch": "resnet10t"}]}))
    (folder / "metrics.csv").write_text("epoch,val_acc\n1,0.5\n2,0.6\n3,0.7\n")
    (folder / "train.log").write_text("".join(
        f"INFO teacher t epoch {e}/3  train loss 1.0 | val loss 1.0 acc 0.5 | lr 1e-3 | {s}s\n"
        for e, s in ((1, 100.0), (2, 2400.0), (3, 110.0))) + "INFO best epoch 3: val acc 0.7, test acc 0.69\n")
    [run] = results.teacher_runs(tmp_path)
    assert (run.arch, run.epochs, run.best_epoch, run.epoch_seconds) == ("resnet10t", 3, 3, [100.0, 2400.0, 110.0])
    assert (run.val_acc, run.test_acc) == pytest.approx((70.0, 69.0))
    teacher = {"arch": "resnet10t", "accuracy": 0.69}
    assert results.teacher_cells(teacher, [run]) == (
        "3 epochs, its recipe", "1", "44 min as logged; about 5 min at its fastest quarter's 100 s an epoch", "69.00")
    other = {"arch": "resnet10t", "accuracy": 0.70}  # a checkpoint no logged run made
    assert results.teacher_cells(other, [run])[0] == "no training log in evaluation/teacher_runs/"
