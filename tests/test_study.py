import csv
import dataclasses
import json
import statistics

import pytest
import torch
import torch.nn as nn

from kd.experiments import study
from kd.checkpoint import load_weights, save_weights
from kd.experiments.study import (StudyPlan, budget_settings, check_plan, finished_runs, or_dash, parse_overrides,
                      remove_interrupted_runs, summarize, teachers_key, verdict, confidence_interval)
from kd.config import load_task_config
from kd.data import load_task_data
from kd.errors import UserError
from kd.teachers import load_teacher
from kd.training import TrainSettings
from tests.conftest import load_benchmark, write_task



def row(student, arm, seed, acc, **extra):
    return {"task": "T", "student": student, "arm": arm, "seed": seed, "alpha": 0.0 if arm == "alpha0" else 0.5,
            "teachers": "" if arm == "alpha0" else "t1", "test_acc": acc, "wall_s": 10.0, "built": "", **extra}


def test_summary_statistics_on_hand_made_rows():
    alpha0 = {1: 0.900, 2: 0.910, 3: 0.920}
    arms = {"uniform": {1: 0.920, 2: 0.925, 3: 0.930},      # +2.0, +1.5, +1.0: a clear gain
            "entropy": {1: 0.905, 2: 0.905, 3: 0.930},      # +0.5, -0.5, +1.0: mean 0.33 < sd
            "confidence": {1: 0.880, 2: 0.890, 3: 0.905}}   # -2.0, -2.0, -1.5: a clear loss
    rows = [row("S", "alpha0", s, a) for s, a in alpha0.items()]
    rows += [row("S", arm, s, a) for arm, accs in arms.items() for s, a in accs.items()]
    stats = {a.arm: a for a in summarize(rows)["S"]}

    assert list(stats) == ["alpha0", "uniform", "entropy", "confidence"]  # ARMS order
    base = stats["alpha0"]
    assert base.mean == pytest.approx(91.0) and base.sd == pytest.approx(1.0)
    assert base.verdict == "baseline" and base.paired == {} and base.gain is None
    uniform = stats["uniform"]
    assert uniform.mean == pytest.approx(92.5) and uniform.sd == pytest.approx(0.5)
    assert uniform.paired == pytest.approx({1: 2.0, 2: 1.5, 3: 1.0})
    assert uniform.paired_mean == pytest.approx(1.5) and uniform.paired_sd == pytest.approx(0.5)
    assert uniform.gain == pytest.approx(1.5) and uniform.verdict == "gain"
    assert stats["entropy"].paired_mean == pytest.approx(1 / 3) and stats["entropy"].verdict == "within noise"
    assert stats["confidence"].verdict == "loss"
    unpaired = summarize([row("S", "uniform", 4, 0.9)])["S"][0]  # a seed without labels only: nothing to judge
    assert unpaired.paired == {} and unpaired.verdict == "-"


def test_table_numbers_have_no_negative_zero():
    assert or_dash(-1e-15, "+.2f") == "+0.00" and or_dash(-0.004, ".2f") == "0.00"
    assert or_dash(-0.5, "+.2f") == "-0.50" and or_dash(None, ".2f") == "-"


def test_verdict_rule():
    # the 95% interval mean +- t(0.975, n-1) sd / sqrt(n); t = 12.71 for 2 pairs, 4.30 for 3
    assert verdict([0.6, 0.6]) == "gain"             # no spread: the interval is the point 0.6
    assert verdict([0.4, 0.5]) == "within noise"     # 0.45 +- 0.64: two seeds decide little
    assert verdict([0.4, 0.5, 0.45]) == "gain"       # 0.45 +- 0.12
    assert verdict([3.0, -1.0]) == "within noise"    # 1.0 +- 25.4
    assert verdict([-0.8, -0.7]) == "loss"           # -0.75 +- 0.64
    assert verdict([5.0]) == "within noise"          # one pair has no spread to compare with
    assert confidence_interval([2.0, 1.5, 1.0]) == pytest.approx((1.5 - 1.2421, 1.5 + 1.2421), abs=1e-4)


def test_rows_of_another_budget_or_alpha_are_not_reused_but_alpha0_serves_any_teachers_setting():
    base = TrainSettings(task="x", num_epochs=3, alpha=0.5, device="cpu")
    budget = json.loads(json.dumps(study.budget_of(base)))
    other = {**budget, "num_epochs": 4}
    older = {k: v for k, v in budget.items() if k != "compile"}  # a row written before a field existed
    rows = [row("S", "uniform", 1, 0.9, budget=budget), row("S", "uniform", 2, 0.9, budget=other),
            row("S", "uniform", 3, 0.9, budget=older), row("S", "alpha0", 1, 0.8, budget=budget),
            {**row("S", "uniform", 4, 0.9, budget=budget), "alpha": 0.3}]
    assert set(finished_runs(rows, "T", base, "t1")) == {("S", "uniform", 1), ("S", "uniform", 3),
                                                         ("S", "alpha0", 1)}
    assert set(finished_runs(rows, "T", TrainSettings(task="x", num_epochs=3, alpha=0.3, device="cpu"), "t1")) == {
        ("S", "uniform", 4), ("S", "alpha0", 1)}  # alpha0 serves every --alpha
    hotter = TrainSettings(task="x", num_epochs=3, alpha=0.5, temperature=4.0, teacher_cache_views=20, device="cpu")
    assert set(finished_runs(rows, "T", hotter, "t1")) == {("S", "alpha0", 1)}  # and every teachers' setting


def test_kd_rows_count_only_beside_their_teachers(tmp_path, tiny_teachers):
    task = load_task_config(str(write_task(tmp_path, tiny_teachers)))
    key = teachers_key(task)
    base = TrainSettings(task="x", alpha=0.5, device="cpu")
    budget = json.loads(json.dumps(study.budget_of(base)))
    rows = [row("S", "alpha0", 1, 0.8, budget=budget), row("S", "uniform", 1, 0.9, budget=budget, teachers=key)]
    assert set(finished_runs(rows, "T", base, key)) == {("S", "alpha0", 1), ("S", "uniform", 1)}

    checkpoint = task.teacher_checkpoint(task.teachers[0])
    save_weights(nn.Linear(2, 2), checkpoint, {"arch": "retrained"})  # other weights under the same name
    assert teachers_key(task) not in (key, None)
    assert set(finished_runs(rows, "T", base, teachers_key(task))) == {("S", "alpha0", 1)}
    checkpoint.unlink()
    assert teachers_key(task) is None and set(finished_runs(rows, "T", base, None)) == {("S", "alpha0", 1)}


def test_interrupted_run_folders_are_removed_finished_ones_kept(tmp_path):
    name = "TaskT_MobileNetV3_T2.0_a0.5_uniform_s1"
    interrupted, finished, other = tmp_path / name, tmp_path / f"{name}-2", tmp_path / f"{name}0"
    for folder in (interrupted, finished, other):
        folder.mkdir()
        (folder / "checkpoint_last.pt").write_bytes(b"")
    save_weights(nn.Linear(2, 2), interrupted / "student.safetensors", {"val_acc": 0.5})
    save_weights(nn.Linear(2, 2), finished / "student.safetensors", {"val_acc": 0.5, "test_acc": 0.5})
    remove_interrupted_runs(tmp_path, name)
    assert not interrupted.exists() and finished.exists() and other.exists()


def test_overrides_are_checked_against_train_settings():
    assert parse_overrides(["teacher_epochs=5", "amp=false", "data_dir=x", "teacher_weights=[1, 2]"]) == {
        "teacher_epochs": 5, "amp": False, "data_dir": "x", "teacher_weights": (1, 2)}
    assert budget_settings({"lr": 0.1}, {"amp": False}) == {"lr": 0.1, "amp": False}
    for overrides, message in (({"label_smoothin": 0.1}, "no such training setting"), ({"lr": 1.0}, "use --lr"),
                               ({"seed": 3}, "sets it for each run")):
        with pytest.raises(UserError, match=message):
            budget_settings({"lr": 0.1}, overrides)


@pytest.mark.parametrize("pair, message", [
    ("stride_reduction=x", "--set stride_reduction=x: 'x' is not a valid int"),
    ("stride_reduction=4", "--set stride_reduction=4: must be 0 to 3, got 4"),
    ("amp=3", "--set amp=3: expected true or false"),
    ("lr_schedule=linear", "--set lr_schedule=linear: choose from step, cosine"),
    ("teacher_weights=[1, -2]", r"--set teacher_weights=\(1, -2\): must be >= 0.0, got -2.0"),
])
def test_override_values_pass_the_checks_of_train_pys_flags(pair, message):
    with pytest.raises(UserError, match=message):
        budget_settings({"lr": 0.1}, parse_overrides([pair]))


def test_good_override_values_come_out_as_train_py_would_read_them():
    given = ["stride_reduction=2", "teacher_epochs=null", "lr_schedule=cosine", "teacher_weights=[1, 2]",
             "amp=false"]
    assert budget_settings({}, parse_overrides(given)) == {
        "stride_reduction": 2, "teacher_epochs": None, "lr_schedule": "cosine", "teacher_weights": (1.0, 2.0),
        "amp": False}


@pytest.mark.parametrize("argv, code, words", [
    (["--arms", "alpha0", "bogus"], 2, "bogus"),
    (["--seeds"], 2, "--seeds"),
    (["--students", "VGG"], 2, "VGG"),
    (["--set", "no_such_field=1"], 1, "no_such_field"),
])
def test_bad_input_exits_with_one_line(argv, code, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark("kd_study").main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == code
    assert len(err.splitlines()) == 1 and words in err


def test_study_records_summarises_and_resumes(tmp_path, tiny_teachers, tiny_students, capsys, monkeypatch):
    out = tmp_path / "study"
    argv = ["--config", str(write_task(tmp_path, tiny_teachers)), "--students", "mobilenetv3", "--seeds", "1", "2",
            "--arms", "alpha0", "uniform", "--num_epochs", "1", "--batch_size", "64", "--lr", "0.01", "--alpha", "0.5",
            "--device", "cpu", "--set", f"cache_dir={tmp_path / 'cache'}", "teacher_cache_views=2",
            "--output_dir", str(out)]
    script = load_benchmark("kd_study")
    script.main(argv)
    printed = capsys.readouterr().out

    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert sorted((r["arm"], r["seed"]) for r in rows) == [("alpha0", "1"), ("alpha0", "2"), ("uniform", "1"),
                                                           ("uniform", "2")]
    for r in rows:
        meta = load_weights(out / r["run_dir"] / "student.safetensors")[1]
        assert float(r["test_acc"]) == meta["test_acc"] and float(r["val_acc"]) == meta["val_acc"]
        assert r["student"] == "MobileNetV3" and r["epochs"] == "1" and float(r["alpha"]) == (
            0.0 if r["arm"] == "alpha0" else 0.5)
    assert [r["built"] for r in rows if r["arm"] == "uniform"] == ["cache", ""]  # the teachers were there

    acc = {(r["arm"], int(r["seed"])): 100 * float(r["test_acc"]) for r in rows}
    summary = (out / "summary.md").read_text()
    for seed in (1, 2):
        assert f"s{seed} {acc['uniform', seed] - acc['alpha0', seed]:+.2f}" in summary
    assert f"| uniform | {statistics.fmean([acc['uniform', 1], acc['uniform', 2]]):.2f} ± " in summary
    teachers = json.loads((out / "teachers.json").read_text())
    assert set(teachers["teachers"]) == {"resnet", "effnet"}
    task = load_task_config(argv[1])
    test = load_task_data(task).test
    with torch.no_grad():  # the ensemble's rule, computed here from the teachers' outputs
        probs = sum((load_teacher(spec, task)[0].eval()(test.images.float() / 255) / 2.0).softmax(dim=1)
                    for spec in task.teachers)
    expected = (probs.argmax(dim=1) == test.labels).float().mean().item()
    assert teachers["ensemble"]["test_acc"] == pytest.approx(expected, abs=1e-6)
    assert f"{100 * teachers['ensemble']['test_acc']:.2f}%" in summary
    assert "epochs 1," in summary and "kd_study.py --config" in summary
    assert (out / "study.png").stat().st_size > 0
    assert "## MobileNetV3" in printed and printed.count("test acc") >= 4

    def must_not_train(settings):
        raise AssertionError(f"trained again: {settings.run}")

    folders = sorted(p.name for p in (out / "runs").iterdir())
    monkeypatch.setattr(study, "train_student", must_not_train)
    script.main(argv)
    assert "0 to train" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "runs").iterdir()) == folders
    assert len(list(csv.DictReader((out / "runs.csv").open()))) == 4
    assert (out / "summary.md").read_text() == summary

    script.main([*argv, "--arms", "alpha0"])  # a narrower plan still reports every run of this budget
    narrower = (out / "summary.md").read_text()
    assert "2 of 2 planned runs" in narrower and "its 2 other run(s) at this budget" in narrower
    assert f"| uniform | {statistics.fmean([acc['uniform', 1], acc['uniform', 2]]):.2f} ± " in narrower


def test_alpha_0_is_refused_for_the_kd_arms_before_any_run():
    plan = StudyPlan("A", students=("MobileNetV3",), arms=("alpha0", "uniform"), settings={"alpha": 0.0})
    with pytest.raises(UserError, match="--alpha 0 would make every KD arm a copy of alpha0"):
        check_plan(plan)
    check_plan(dataclasses.replace(plan, arms=("alpha0",)))


def test_each_method_has_an_arm_uniformly_weighted_and_one_with_the_label_aware_weighting(tmp_path):
    from kd.experiments.study import arm_settings

    base = TrainSettings(task="A", alpha=0.6)
    for arm, weighting in (("dkd", "uniform"), ("dkd_confidence", "confidence"), ("ls_confidence", "confidence")):
        settings = arm_settings(base, "MobileNetV3", arm, 2, tmp_path)
        assert (settings.kd_loss, settings.teacher_weighting, settings.teacher_cache, settings.alpha) == (
            arm.split("_")[0], weighting, "auto", 0.6)
