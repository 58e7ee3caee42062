"""Evaluation side: metrics, speed, figures, the summary, the task scripts and evaluate_task end to end.

Everything runs on CPU with tiny models and synthetic or 8x8 digit images.
"""

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from kd import metrics as m
from kd import plots
from kd.checkpoint import save_weights
from kd.config import load_task_config
from kd.errors import UserError
from kd.evaluation import ensemble_probabilities, evaluate_task
from kd.evaluation_cli import main_for_task, task_parser
from kd.files import shown_path
from kd.record import RunRecord, load_student
from kd.report import build_summary, format_evaluation_summary, last_line, task_row
from kd.settings import TrainSettings
from kd.speed import Speed, SpeedSettings, measure_speed, sequential_speed
from kd.students import build_student, student_build, with_stride_reduction
from kd.teachers import build_teacher
from tests.conftest import with_random_head

REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- metrics -------------------------------------------------------------------------------------

def test_accuracy_and_agreement_count_equal_entries():
    assert m.accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    assert m.accuracy(torch.tensor([3, 3]), torch.tensor([1, 3])) == 0.5
    assert m.agreement(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 0])) == 0.5
    with pytest.raises(ValueError):
        m.accuracy([0, 1], [0, 1, 2])


def test_confusion_matrix_rows_are_true_classes_and_absent_classes_stay_zero():
    counts = m.confusion_matrix([0, 0, 1, 2], [0, 1, 1, 0], num_classes=4)
    assert counts.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    rates = m.normalize_rows(counts)
    assert rates[0].tolist() == [0.5, 0.5, 0.0, 0.0]
    assert rates[3].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_classification_scores_match_hand_computed_values():
    scores = m.classification_scores([0, 0, 1, 1], [0, 1, 1, 1], ["a", "b", "never"])
    a, b, never = (scores["per_class"][k] for k in ("a", "b", "never"))
    assert (a["precision"], a["recall"], a["support"]) == (1.0, 0.5, 2)
    assert a["f1"] == pytest.approx(2 / 3)
    assert (b["precision"], b["recall"], b["f1"]) == (pytest.approx(2 / 3), 1.0, pytest.approx(0.8))
    assert never == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert scores["macro"]["f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)


def test_ece_on_a_constructed_case():
    # Two bins used: confidence 0.9 (accuracy 1/2) and 0.6 (accuracy 1), half the samples each:
    # ECE = 0.5 * |0.5 - 0.9| + 0.5 * |1.0 - 0.6| = 0.4
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    labels = np.array([0, 1, 1, 1])
    assert m.expected_calibration_error(probs, labels) == pytest.approx(0.4)
    assert m.expected_calibration_error(torch.tensor(probs), torch.tensor(labels)) == pytest.approx(0.4)


def test_ece_is_zero_when_confidence_matches_accuracy_and_bins_are_equal_width():
    confident_and_right = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert m.expected_calibration_error(confident_and_right, np.array([0, 1])) == 0.0
    # 0.62 and 0.65 share the bin (0.6, 0.667]; the bin's mean confidence 0.635 vs accuracy 0.5
    probs = np.array([[0.62, 0.38], [0.65, 0.35]])
    assert m.expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.135)


# --- the ensemble --------------------------------------------------------------------------------

def test_ensemble_uses_the_training_weighting():
    logits = torch.randn(2, 5, 3)
    labels = torch.zeros(5, dtype=torch.long)
    uniform = ensemble_probabilities(logits, labels, TrainSettings(temperature=1.0), None)
    assert torch.allclose(uniform, logits.softmax(dim=-1).mean(dim=0))
    only_first = ensemble_probabilities(logits, labels, TrainSettings(temperature=2.0, teacher_weighting="fixed"),
                                        [1.0, 0.0])
    assert torch.allclose(only_first, (logits[0] / 2.0).softmax(dim=-1))
    standardised = ensemble_probabilities(logits, labels, TrainSettings(temperature=1.0, kd_loss="ls"), None)
    z = (logits - logits.mean(-1, keepdim=True)) / (1e-7 + logits.std(-1, keepdim=True))
    assert torch.allclose(standardised, z.softmax(dim=-1).mean(dim=0))  # the target the ls method trains on


# --- speed ---------------------------------------------------------------------------------------

class Sleeper(nn.Module):
    """A model that takes a known time: 10 ms per call plus 1 ms per image."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        time.sleep(0.010 + 0.001 * len(x))
        return x


def test_measure_speed_times_a_call_per_image_and_restores_threads():
    threads = torch.get_num_threads()
    speed = measure_speed(Sleeper(), (1, 4, 4), SpeedSettings(warmup=1, runs=3, throughput_batch=40))
    assert speed.latency_ms == pytest.approx(11.0, rel=0.3)  # one image: 10 + 1 ms
    assert speed.throughput == pytest.approx(40 / 0.050, rel=0.3)  # 40 images in 10 + 40 ms
    assert torch.get_num_threads() == threads


def test_sequential_speed_adds_time_per_image():
    ensemble = sequential_speed([Speed(latency_ms=2.0, throughput=100.0), Speed(latency_ms=3.0, throughput=300.0)])
    assert ensemble.latency_ms == 5.0
    assert ensemble.throughput == pytest.approx(75.0)  # 1 / (1/100 + 1/300)


# --- figures -------------------------------------------------------------------------------------

def _assert_png(path: Path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000


def test_select_samples_is_fixed_and_ends_with_the_most_confident_mistakes():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    preds = np.array([1, 1, 0, 0, 1, 0, 1, 1])
    confidence = np.array([0.6, 0.9, 0.5, 0.5, 0.5, 0.7, 0.5, 0.5])
    chosen = plots.select_samples(labels, preds, confidence, count=5, mistakes=2, seed=3)
    assert chosen.tolist() == plots.select_samples(labels, preds, confidence, count=5, mistakes=2, seed=3).tolist()
    assert chosen[-2:].tolist() == [1, 5]  # wrong, confidence 0.9 then 0.7
    assert len(set(chosen.tolist())) == 5


def test_all_four_figures_are_written(tmp_path):
    rng = np.random.default_rng(0)
    names = ["T-shirt/top", "Trouser", "Ankle boot"]
    labels = rng.integers(0, 3, 30)
    probs = torch.softmax(torch.randn(30, 3), dim=1)
    images = rng.integers(0, 255, (30, 1, 8, 8), dtype=np.uint8)
    plots.plot_sample_predictions(images.__getitem__, labels, probs, names,
                                  tmp_path / "samples.png", count=8, mistakes=2, columns=4)
    plots.plot_confusion_matrix(m.confusion_matrix(labels, probs.argmax(1), 3), names, tmp_path / "cm.png", "cm")
    rows = [{"epoch": e, "train_loss": 1 / e, "train_ce": 0.8 / e, "val_loss": 0.9 / e, "train_acc": 0.5 + e / 10,
             "val_acc": 0.4 + e / 10} for e in (1, 2, 3)]
    plots.plot_training_curves(rows, tmp_path / "curves.png", "curves")
    points = [plots.ModelPoint("student", "student", 1_000, 0.9, 1.0),
              plots.ModelPoint("teacher", "teacher", 50_000, 0.95, 4.0),
              plots.ModelPoint("ensemble", "ensemble", 90_000, 0.96, 8.0)]
    plots.plot_student_vs_teachers(points, tmp_path / "versus.png", "versus")
    for name in ("samples.png", "cm.png", "curves.png", "versus.png"):
        _assert_png(tmp_path / name)


@pytest.mark.parametrize("low, high", [(0.983, 0.997), (0.90, 0.99), (0.5, 1.0)])
def test_accuracy_ticks_are_told_apart(low, high):
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    ax.set_ylim(low, high)
    plots.label_ticks_apart(ax, scale=100, suffix="%")
    labels = [ax.yaxis.get_major_formatter()(t, i) for i, t in enumerate(ax.get_yticks())]
    assert len(labels) >= 3 and len(set(labels)) == len(labels) and all(label.endswith("%") for label in labels)


# --- the summary ---------------------------------------------------------------------------------

def _fake_metrics(student_acc=0.9, student_params=1_000_000, student_throughput=1000.0) -> dict:
    return {"student": {"name": "MobileNetV3", "accuracy": student_acc, "params": student_params,
                        "throughput": student_throughput},
            "teachers": {"small": {"accuracy": 0.92, "params": 2_000_000, "throughput": 500.0},
                         "big": {"accuracy": 0.95, "params": 8_000_000, "throughput": 250.0}},
            "ensemble": {"accuracy": 0.96, "throughput": 100.0}}


def test_task_row_compares_the_student_with_the_best_teacher():
    row = task_row("A", _fake_metrics())
    assert row["best_teacher"] == "big"
    assert row["gap_vs_best_teacher_pp"] == pytest.approx(-5.0)
    assert row["size_ratio"] == 8.0
    assert row["speedup_vs_best_teacher"] == 4.0
    assert row["speedup_vs_ensemble"] == 10.0


def test_summary_keeps_the_reason_of_a_missing_or_failed_task():
    summary = build_summary({"A": _fake_metrics(), "B": "error: no run of task B yet: python train.py --task B"})
    assert summary["ok"] is False
    assert [r["status"] for r in summary["tasks"]] == ["ok", "failed"]
    table = format_evaluation_summary(summary)
    assert "FAILED: error: no run of task B yet: python train.py --task B" in table
    assert "90.00%" in table and "8.00x" in table
    assert build_summary({"A": _fake_metrics()})["ok"] is True
    assert build_summary({"B": ""})["tasks"][0]["reason"]  # a silent failure still says something


def test_last_line_skips_progress_bar_redraws_and_blank_lines():
    stderr = "loading\nstudent:  50%|#####     |\rstudent: 100%|##########|\r\nerror: teacher missing\n\n"
    assert last_line(stderr) == "error: teacher missing"
    assert last_line("") == ""


# --- the task scripts ----------------------------------------------------------------------------

def test_task_script_arguments():
    with pytest.raises(SystemExit) as help_exit:
        task_parser("A").parse_args(["--help"])
    assert help_exit.value.code == 0
    with pytest.raises(SystemExit) as bad_flag:
        main_for_task("B", ["--no_such_flag"])
    assert bad_flag.value.code == 2
    with pytest.raises(SystemExit) as bad_device:
        main_for_task("B", ["--device", "tpu"])
    assert bad_device.value.code == 2
    args = task_parser("A").parse_args(["--run_dir", "r", "--device", "cpu"])
    assert (args.run_dir, args.checkpoint, args.device, args.output_dir) == ("r", None, "cpu", None)


@pytest.mark.slow
def test_evaluation_py_with_no_runs_fails_with_one_line_per_task(tmp_path, monkeypatch, capfd):
    import evaluation

    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    # evaluation.py in this process (each task script is a process of its own, as always)
    status = evaluation.main(evaluation.get_args_parser().parse_args([
        "--runs_root", str(tmp_path / "runs"), "--output_dir", str(tmp_path / "evaluation"), "--device", "cpu"]))
    out, err = capfd.readouterr()
    assert status != 0
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 2, err
    for task, line in zip("AB", errors):
        assert line.startswith(f"error: no run of task {task} yet") and f"python train.py --task {task}" in line
        assert f"FAILED: {line}" in out
    summary = json.loads((tmp_path / "evaluation" / "summary.json").read_text())
    assert summary["ok"] is False and [r["task"] for r in summary["tasks"]] == ["A", "B"]


# --- evaluate_task end to end --------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_project(tmp_path_factory):
    """A task config over 8x8 digits with two random teachers, one of them the student's twin
    (same architecture and weights), and one finished run with a metrics.csv."""
    root = tmp_path_factory.mktemp("project")
    twin_path, other_path = root / "teachers" / "twin.safetensors", root / "teachers" / "other.safetensors"
    config = {"name": "T", "description": "tiny digits",
              "data": {"source": "digits", "input_size": 8, "channels": 1, "test_size": 0.2, "val_size": 0.15},
              "classes": [str(i) for i in range(10)], "normalization": {"mean": [0.3], "std": [0.37]},
              "augment": {},
              "teachers": [{"name": "twin", "arch": "mobilenetv3_small_100", "checkpoint": str(twin_path)},
                           {"name": "other", "arch": "test_resnet", "checkpoint": str(other_path)}]}
    config_path = root / "task_t.yaml"
    config_path.write_text(yaml.safe_dump(config))
    task = load_task_config(str(config_path))
    torch.manual_seed(0)
    student = with_random_head(build_student("MobileNetV3", task))  # models that disagree
    meta = {"classes": list(task.classes), "epoch": 2, "val_acc": 0.5}
    run = root / "runs" / "TaskT_MobileNetV3_T2.0_a0.5"
    save_weights(student, run / "student.safetensors", meta)
    save_weights(student, twin_path, {"arch": "mobilenetv3_small_100"})
    save_weights(with_random_head(build_teacher(task.teachers[1], task)), other_path, {"arch": "test_resnet"})
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"settings": {"task": str(config_path), "student_model": "MobileNetV3", "temperature": 2.0, "alpha": 0.5,
                      "teacher_weighting": "entropy", "data_dir": None}, "task": task.to_dict(),
         "model": student_build("MobileNetV3", task).to_dict()}))
    (run / "metrics.csv").write_text("epoch,lr,train_loss,train_ce,train_kd,train_acc,val_loss,val_acc,seconds\n"
                                     "1,0.001,2.3,2.2,0.1,0.1,2.3,0.1,1.0\n2,0.001,2.0,1.9,0.1,0.3,2.1,0.5,1.0\n")
    return {"config": str(config_path), "root": root, "run": run, "twin": twin_path}


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_evaluate_task_writes_metrics_and_figures_and_leaves_the_run_alone(fake_project, tmp_path, monkeypatch):
    before = _snapshot(fake_project["run"])
    monkeypatch.chdir(fake_project["root"])  # as from the project's root: metrics.json names its files from there
    out = tmp_path / "out"
    result = evaluate_task(fake_project["config"], device="cpu", output_dir=out,
                           runs_root=fake_project["root"] / "runs", speed=SpeedSettings(warmup=0, runs=1,
                                                                                       throughput_batch=4))
    assert _snapshot(fake_project["run"]) == before
    saved = json.loads((out / "metrics.json").read_text())
    assert sorted(saved["figures"]) == sorted(p.name for p in out.glob("*.png"))
    assert len(saved["figures"]) == 4
    for png in out.glob("*.png"):
        _assert_png(png)
    student, twin = saved["student"], saved["teachers"]["twin"]
    assert saved["provenance"]["test_size"] == 360 and saved["provenance"]["checkpoint_epoch"] == 2
    assert saved["provenance"]["run_dir"] == "runs/TaskT_MobileNetV3_T2.0_a0.5"
    assert saved["teachers"]["twin"]["checkpoint"] == "teachers/twin.safetensors"
    assert sum(c["support"] for c in student["per_class"].values()) == 360
    assert student["accuracy"] == pytest.approx(np.trace(student["confusion_matrix"]) / 360)
    # the twin teacher is the student: same predictions, accuracy and size
    assert (twin["agreement_with_student"], twin["accuracy"], twin["params"]) == (
        1.0, student["accuracy"], student["params"])
    assert saved["ensemble"]["weighting"] == "entropy"
    assert saved["ensemble"]["params"] == twin["params"] + saved["teachers"]["other"]["params"]
    assert result["student"]["accuracy"] == student["accuracy"]


def test_the_ensemble_is_weighted_with_the_runs_own_teacher_weights(fake_project, tmp_path):
    """A run trained with --teacher_weighting fixed --teacher_weights 1 0 learned from the first teacher
    alone; its evaluation's ensemble is that teacher (here the student's twin), not the config's mix."""
    run = tmp_path / "runs" / fake_project["run"].name
    shutil.copytree(fake_project["run"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["settings"].update(teacher_weighting="fixed", teacher_weights=[1.0, 0.0])
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    saved = evaluate_task(fake_project["config"], device="cpu", output_dir=tmp_path / "out", runs_root=run.parent,
                          speed=SpeedSettings(warmup=0, runs=1, throughput_batch=4))
    ensemble, twin = saved["ensemble"], saved["teachers"]["twin"]
    # equal up to a near-tie between classes (twin and student run in different memory formats)
    assert ensemble["weights"] == [1.0, 0.0] and ensemble["agreement_with_student"] >= 359 / 360
    assert ensemble["accuracy"] == pytest.approx(twin["accuracy"], abs=1 / 360)
    assert saved["teachers"]["other"]["agreement_with_student"] < 0.9  # so a mix would not agree


def test_the_student_is_rebuilt_as_its_run_records_it(fake_project, tmp_path):
    """A student trained with two halvings on a task whose default is one has the same weights' shapes
    either way: the run's record rebuilds the network that was trained, and weights that say they were
    built otherwise are refused, the difference named."""
    task = load_task_config(fake_project["config"])
    build = student_build("MobileNetV3", with_stride_reduction(task, "MobileNetV3", 2))
    torch.manual_seed(0)
    trained = with_random_head(build.create()).eval()
    weights = tmp_path / "student.safetensors"
    save_weights(trained, weights, {"classes": list(task.classes), "build": build.to_dict()})
    settings = {"student_model": "MobileNetV3", "stride_reduction": 2}
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        recorded = RunRecord(tmp_path, {"settings": settings, "task": task.to_dict(), "model": build.to_dict()})
        assert torch.allclose(load_student(recorded, weights)[0](x), trained(x), atol=1e-5)
        earlier_release = RunRecord(tmp_path, {"settings": settings, "task": task.to_dict()})  # no build recorded
        assert torch.allclose(load_student(earlier_release, weights)[0](x), trained(x), atol=1e-5)
    other = RunRecord(tmp_path, {"settings": settings, "task": task.to_dict(),
                                 "model": dataclasses.replace(build, stride_reduction=1).to_dict()})
    with pytest.raises(UserError, match=r"built otherwise .* stride_reduction 2 \(the run's: 1\)"):
        load_student(other, weights)


def test_evaluate_task_explains_a_missing_run_or_teacher(fake_project, tmp_path):
    train = re.escape(f"python train.py --config {fake_project['config']}")
    with pytest.raises(UserError, match=f"no run of task T yet.*{train}"):
        evaluate_task(fake_project["config"], runs_root=tmp_path, output_dir=tmp_path / "out")
    started = tmp_path / "TaskT_ResNet18_T2.0_a0.1"
    started.mkdir()
    (started / "config.yaml").write_text("settings: {}\n")
    with pytest.raises(UserError, match="has a checkpoint yet.*TaskT_ResNet18_T2.0_a0.1"):
        evaluate_task(fake_project["config"], runs_root=tmp_path, output_dir=tmp_path / "out")
    moved = fake_project["twin"].with_suffix(".moved")
    fake_project["twin"].rename(moved)
    try:
        with pytest.raises(UserError, match=f"missing: {re.escape(str(fake_project['twin']))}.*{train}"):
            evaluate_task(fake_project["config"], runs_root=fake_project["root"] / "runs", output_dir=tmp_path / "o")
    finally:
        moved.rename(fake_project["twin"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_a_report_names_files_under_the_working_directory_relative_to_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shown_path(tmp_path / "teachers" / "a.safetensors") == "teachers/a.safetensors"
    assert shown_path("/elsewhere/a.safetensors") == "/elsewhere/a.safetensors"
    assert shown_path("runs/x/student.safetensors") == "runs/x/student.safetensors"
    (tmp_path / "teachers").mkdir()
    (tmp_path / "shared").symlink_to(tmp_path / "teachers")  # a link is named as it was given, not its target
    assert shown_path(tmp_path / "shared" / "a.safetensors") == "shared/a.safetensors"


def test_the_shipped_evaluations_name_the_projects_files_relative_to_its_root():
    for metrics in (REPO / "evaluation").glob("Task*/metrics.json"):
        saved = json.loads(metrics.read_text())
        paths = [saved["provenance"]["run_dir"], saved["provenance"]["checkpoint"],
                 *(teacher["checkpoint"] for teacher in saved["teachers"].values())]
        assert not any(Path(p).is_absolute() for p in paths), (metrics, paths)
