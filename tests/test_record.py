"""The run record: resume, evaluation and export rebuild the run as it was trained, whatever the task YAML
says now; the newest run is the newest created; bad input is found before any work."""

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import train
from kd.checkpoint import load_weights, save_weights
from kd.config import load_task_config
from kd.errors import UserError
from kd.builds import ModelBuild
from kd.evaluation import evaluate_task
from kd.export import export_student
from kd.models import create_model
from kd.record import RunRecord, find_runs, newest_run, open_run_student, read_record, resume_target, write_record
from kd.speed import SpeedSettings
from kd.students import student_build, with_stride_reduction
from tests.conftest import run_in_process, write_task

FAST_SPEED = SpeedSettings(warmup=0, runs=1, throughput_batch=4)


def train_args(config: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(config), "--num_epochs", "1", "--alpha", "0.5", "--student_model", "MobileNetV3",
            "--batch_size", "256", "--device", "cpu", "--teacher_cache", "off", "--output_dir", str(out), *extra]


def edit_yaml(path: Path, change) -> None:
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw))


def test_a_run_is_rebuilt_as_trained_after_its_task_yaml_changed(tmp_path, tiny_teachers, tiny_students, capsys):
    """Halvings change no weight's shape: a student rebuilt from the edited YAML would load without error
    and compute something else. The record keeps the run's own network, teachers and data."""
    config = write_task(tmp_path, tiny_teachers)
    edit_yaml(config, lambda raw: raw.update(student_stride_reduction={"MobileNetV3": 2}))
    run_dir = run_in_process(train_args(config, tmp_path / "runs", "--batch_size", "32", "--lr", "0.005"), capsys)
    recorded_test_acc = load_weights(run_dir / "student.safetensors")[1]["test_acc"]
    assert recorded_test_acc > 0.2  # twice chance: another network would score otherwise

    def edit(raw):
        raw["student_stride_reduction"] = {"MobileNetV3": 0}
        raw["teachers"] = raw["teachers"][:1]
    edit_yaml(config, edit)
    assert student_build("MobileNetV3", load_task_config(str(config))).stride_reduction == 0  # the YAML changed

    record = read_record(run_dir)
    assert record.model.stride_reduction == 2 and len(record.task.teachers) == 2
    results = evaluate_task(str(config), runs_root=tmp_path / "runs", output_dir=tmp_path / "eval", device="cpu",
                            speed=FAST_SPEED)
    assert results["student"]["accuracy"] == pytest.approx(recorded_test_acc, abs=1e-6)  # fp32 as recorded
    assert set(results["teachers"]) == {"resnet", "effnet"}  # the teachers it distilled, not the YAML's one
    student, _, _ = open_run_student(run_dir)  # what export and predict load (their own tests: test_custom_task.py)
    assert final_map(student) == final_map(student_build("MobileNetV3", with_stride_reduction(
        load_task_config(str(config)), "MobileNetV3", 2)).create())
    resumed = run_in_process(train_args(config, tmp_path / "runs", "--num_epochs", "2", "--resume", str(run_dir)),
                             capsys)
    assert resumed == run_dir and len((run_dir / "metrics.csv").read_text().splitlines()) == 3
    assert read_record(run_dir).model.stride_reduction == 2


def final_map(student) -> int:
    """The side of the student's last feature map on a 32 px probe, where one and two halvings differ."""
    with torch.no_grad():
        return student.backbone.forward_features(torch.zeros(1, 1, 32, 32)).shape[-1]


def test_resume_stops_in_one_line_when_a_teacher_it_distils_changed(tmp_path, tiny_teachers, tiny_students, capsys,
                                                                    monkeypatch):
    config = write_task(tmp_path, tiny_teachers)
    run_dir = run_in_process(train_args(config, tmp_path / "runs"), capsys)
    retrained = tmp_path / "teachers" / "resnet.safetensors"
    save_weights(create_model("test_resnet", 10, 1, [0.5], [0.25]), retrained, {"arch": "test_resnet"})
    monkeypatch.setattr("kd.training.run_training", must_not_start)
    with pytest.raises(UserError, match=f"teacher resnet's checkpoint {retrained} changed since the run started"):
        train.main(train_args(config, tmp_path / "runs", "--num_epochs", "2", "--resume", str(run_dir)))
    retrained.unlink()
    with pytest.raises(UserError, match="teacher resnet's checkpoint .* is gone"):
        train.main(train_args(config, tmp_path / "runs", "--num_epochs", "2", "--resume", str(run_dir)))


def test_the_stride_flag_is_recorded_and_weights_built_otherwise_than_their_run_are_refused(tmp_path, capsys):
    config = write_task(tmp_path)  # 8 px: one halving unless told otherwise
    halved = run_in_process(train_args(config, tmp_path / "runs", "--stride_reduction", "2", "--alpha", "0"), capsys)
    record = read_record(halved)
    assert record.model.stride_reduction == 2 and record.task.student_stride_reduction == {"MobileNetV3": 2}
    assert final_map(open_run_student(halved)[0]) == 4  # 32 px probe: 32x -> 16x -> 8x downsampling
    assert load_task_config(str(config)).student_stride_reduction == {}  # the task config itself is untouched
    plain = run_in_process(train_args(config, tmp_path / "runs", "--stride_reduction", "0", "--alpha", "0"), capsys)
    with pytest.raises(UserError, match=r"built otherwise .*stride_reduction 0 \(the run's: 2\)"):
        open_run_student(halved, plain / "student.safetensors")


def test_the_test_time_flip_is_recorded_evaluated_and_lives_in_the_exported_student(tmp_path, tiny_teachers,
                                                                                     capsys):
    config = write_task(tmp_path, tiny_teachers)
    edit_yaml(config, lambda raw: raw["augment"].update(hflip=True))
    run_dir = run_in_process(train_args(config, tmp_path / "runs", "--alpha", "0", "--test_time_flip"), capsys)
    assert read_record(run_dir).model.test_time_flip
    meta = load_weights(run_dir / "student.safetensors")[1]
    assert meta["build"]["test_time_flip"]
    results = evaluate_task(str(config), runs_root=tmp_path / "runs", output_dir=tmp_path / "eval", device="cpu",
                            speed=FAST_SPEED)
    assert results["training"]["test_time_flip"]
    assert results["student"]["accuracy"] == pytest.approx(meta["test_acc"], abs=1e-6)  # judged as trained
    student = open_run_student(run_dir)[0]
    images = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(student(images), student(images.flip(-1)), atol=1e-5)
    import onnxruntime as ort

    exported = export_student(run_dir)
    assert max(exported.max_abs_diff.values()) <= exported.tolerance  # the exported files average as PyTorch does
    session = ort.InferenceSession(str(run_dir / "export" / "student.onnx"), providers=["CPUExecutionProvider"])
    logits, mirrored = (session.run(None, {"images": x.numpy()})[0] for x in (images, images.flip(-1)))
    assert np.allclose(logits, mirrored, atol=1e-5) and np.allclose(logits, student(images).detach(), atol=1e-4)


def test_a_record_written_before_the_test_time_flip_existed_judges_images_alone():
    build = student_build("MobileNetV3", load_task_config("B"))
    old = {key: value for key, value in build.to_dict().items() if key != "test_time_flip"}
    assert ModelBuild.from_dict(old, "old record") == build and not build.test_time_flip


def test_the_test_time_flip_is_refused_in_one_line_for_a_task_that_trains_without_flips(tmp_path, no_training):
    config = write_task(tmp_path)  # digits: augment.hflip false
    stops_at_once(["--config", str(config), "--device", "cpu", "--output_dir", str(tmp_path / "runs"),
                   "--test_time_flip"], "--test_time_flip averages .* but task T trains without flips")
    assert not (tmp_path / "runs").exists()


def fake_run(root: Path, name: str, created: str) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    write_record(run_dir, {"created": created, "settings": {"task": "A"}, "task": {"name": "A"}})
    for weights in ("student.safetensors", "checkpoint_last.pt"):
        (run_dir / weights).touch()
    return run_dir


def test_the_newest_run_is_the_newest_created_also_after_an_older_one_is_resumed(tmp_path):
    older = fake_run(tmp_path, "TaskA_MobileNetV3_T2.0_a0.6", "2026-01-01T10:00:00.000000+00:00")
    newer = fake_run(tmp_path, "TaskA_MobileNetV3_T2.0_a0.6-2", "2026-01-01T11:00:00.000000+00:00")
    time.sleep(0.01)
    read_record(older).with_epochs(40).save()  # --resume with more epochs rewrites the older run's record
    os.utime(older / "checkpoint_last.pt")  # and it trained last
    assert (older / "config.yaml").stat().st_mtime > (newer / "config.yaml").stat().st_mtime
    assert newest_run("A", tmp_path, "hint").run_dir == newer
    assert resume_target("auto", "TaskA_MobileNetV3_T2.0_a0.6", tmp_path).run_dir == newer
    assert [r.run_dir for r in find_runs(tmp_path, "TaskA_")] == [newer, older]
    resumed = read_record(older)
    assert resumed.settings.num_epochs == 40 and resumed.body["created"].startswith("2026-01-01T10")


def test_a_run_of_an_earlier_release_without_a_creation_time_is_ordered_by_its_record_file(tmp_path):
    older = fake_run(tmp_path, "TaskA_x", "")
    newer = fake_run(tmp_path, "TaskA_y", "")
    os.utime(older / "config.yaml", (1_000, 1_000))
    assert newest_run("A", tmp_path, "hint").run_dir == newer
    assert RunRecord(older, {}).created == 1_000


def must_not_start(*args, **kwargs):
    raise AssertionError("a run started (teacher or student) before its input was checked")


@pytest.fixture
def no_training(monkeypatch):
    """Any teacher or student training fails the test: bad input must be found before it."""
    monkeypatch.setattr("kd.training.run_training", must_not_start)


def stops_at_once(argv: list[str], message: str) -> None:
    started = time.monotonic()
    with pytest.raises(UserError, match=message):
        train.main(argv)
    assert time.monotonic() - started < 20  # seconds: loading the data at most, no training


def test_a_missing_data_dir_is_named_before_any_teacher_trains(tmp_path, no_training):
    stops_at_once(["--task", "B", "--data_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "runs"),
                   "--device", "cpu"], f"--data_dir {tmp_path / 'nowhere'} does not exist")


def test_an_output_folder_that_cannot_be_made_is_found_before_the_teachers_train(tmp_path, no_training):
    config = write_task(tmp_path)  # no teachers: they would be trained first
    blocker = tmp_path / "file"
    blocker.write_text("")
    stops_at_once(["--config", str(config), "--device", "cpu", "--output_dir", str(blocker / "x")],
                  "cannot create output folder")


def test_an_unreadable_teacher_file_is_found_before_a_missing_one_trains(tmp_path, tiny_teachers, no_training):
    config = write_task(tmp_path, tiny_teachers)
    (tmp_path / "teachers" / "effnet.safetensors").write_bytes(b"not a checkpoint")
    (tmp_path / "teachers" / "resnet.safetensors").unlink()
    stops_at_once(["--config", str(config), "--device", "cpu", "--output_dir", str(tmp_path / "runs")],
                  "effnet.safetensors is not a readable safetensors file")


def test_a_resume_target_without_a_checkpoint_is_found_before_any_work(tmp_path, no_training):
    stops_at_once(["--task", "A", "--device", "cpu", "--resume", str(tmp_path / "gone")],
                  "cannot resume .*gone: no checkpoint_last.pt there")
    stops_at_once(["--task", "A", "--device", "cpu", "--resume", "auto", "--output_dir", str(tmp_path)],
                  "--resume auto: no run named TaskA_EfficientNet_T2.0_a0.1 with a checkpoint")


def test_teacher_weights_without_the_fixed_weighting_exit_2_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--task", "A", "--teacher_weights", "1", "2"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--teacher_weights is used only by --teacher_weighting fixed" in err
