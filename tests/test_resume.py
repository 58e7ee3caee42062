import csv
import random
import signal
from pathlib import Path

import pytest
import torch
import yaml

import train
from kd.checkpoint import load_torch_checkpoint, load_weights
from kd.errors import UserError
from kd.training import TrainSettings, train_student
from tests.conftest import (assert_same_run, killed_after_first_checkpoint, run_in_process, script_command,
                            signal_each, write_task)


def train_args(config: Path, output_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    # batch 256: 4 steps an epoch keep the three runs of a test short; an epoch still takes about a second
    return ["--config", str(config), "--num_epochs", "4", "--alpha", "0.5", "--student_model", "MobileNetV3",
            "--batch_size", "256", "--device", "cpu", "--teacher_epochs", "1", "--teacher_cache", "on",
            "--teacher_cache_views", "2", "--cache_dir", str(cache_dir), "--output_dir", str(output_dir), *extra]


@pytest.mark.slow
def test_killed_run_resumes_bit_for_bit(tmp_path, tiny_teachers, tiny_students, capsys):
    config = write_task(tmp_path, tiny_teachers)
    # only the run to kill is a process of its own (start-up costs seconds), with this process's threads
    reference = run_in_process(train_args(config, tmp_path / "ref", tmp_path / "cache"), capsys)
    # killed in the epochs that follow the first: 3 epochs take seconds, not 0.2 s
    killed = script_command("train.py", train_args(config, tmp_path / "killed", tmp_path / "cache"), tiny=True)
    killed_dir = killed_after_first_checkpoint(killed, tmp_path / "killed", linger=random.uniform(0.0, 0.2))
    resumed = run_in_process(train_args(config, tmp_path / "killed", tmp_path / "cache", "--resume", "auto"), capsys)
    assert resumed == killed_dir
    assert_same_run(reference, resumed)  # identical metrics and weights: determinism and exact resume at once


@pytest.mark.parametrize("cache", ["off", "auto"])
def test_a_resumed_mixup_run_blends_as_the_uninterrupted_one(tmp_path, tiny_teachers, tiny_students, capsys, cache):
    """Online mixup draws from the global generators, which checkpoints save; the cache's blends are the
    pool's (kd.batches.ViewPool): either way, stopping after epoch 1 changes nothing."""
    config = write_task(tmp_path, tiny_teachers)
    args = ["--config", str(config), "--alpha", "0.5", "--mixup", "0.4", "--student_model", "MobileNetV3",
            "--batch_size", "256", "--device", "cpu", "--teacher_cache", cache, "--cache_dir", str(tmp_path / "cache")]
    reference = run_in_process(args + ["--num_epochs", "2", "--output_dir", str(tmp_path / "ref")], capsys)
    stopped = run_in_process(args + ["--num_epochs", "1", "--output_dir", str(tmp_path / "stopped")], capsys)
    resumed = run_in_process(args + ["--num_epochs", "2", "--output_dir", str(tmp_path / "stopped"), "--resume",
                                     str(stopped)], capsys)
    assert resumed == stopped
    assert_same_run(reference, resumed)
    assert any((tmp_path / "cache").iterdir()) if cache == "auto" else not (tmp_path / "cache").exists()


def test_resume_with_more_epochs_trains_on_along_the_longer_cosine_and_names_ignored_flags(tmp_path, tiny_students,
                                                                                           capsys):
    config = write_task(tmp_path)
    base = ["--config", str(config), "--alpha", "0", "--student_model", "MobileNetV3", "--batch_size", "128",
            "--device", "cpu", "--lr_schedule", "cosine", "--lr", "0.004", "--output_dir", str(tmp_path / "runs")]
    run_dir = run_in_process(base + ["--num_epochs", "2"], capsys)
    train.main(base + ["--num_epochs", "4", "--lr", "0.5", "--resume", str(run_dir)])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "ignored:" in line]
    assert len(warnings) == 1 and "--lr 0.5 (run: 0.004)" in warnings[0] and "num_epochs" not in warnings[0]
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    # epochs 3 and 4 follow the cosine over 4 epochs: lr x 0.5 (1 + cos(pi e / 4)) for e = 2, 3
    assert [float(r["lr"]) for r in rows[2:]] == pytest.approx([0.004 * 0.5, 0.004 * 0.5 * (1 - 0.5 ** 0.5)])
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["settings"]["num_epochs"] == 4

    shorter = TrainSettings(task=str(config), num_epochs=3, resume=str(run_dir))
    with pytest.raises(UserError, match="has trained 4 epochs already; --num_epochs 3"):
        train_student(shorter, given={"num_epochs", "resume"})
    assert len(list(csv.DictReader((run_dir / "metrics.csv").open()))) == 4


@pytest.mark.slow
def test_ctrl_c_and_sigterm_keep_the_last_epoch_and_say_how_to_resume(tmp_path, tiny_teachers):
    """Both signals take one path (SIGTERM raises a KeyboardInterrupt, as Ctrl-C does), so each is sent
    once, to one of two runs started together: SIGTERM before the first epoch ends (nothing is left),
    Ctrl-C after it (the epoch is kept)."""
    config = write_task(tmp_path, tiny_teachers)
    # config.yaml is written before the teacher-logit cache is built: well before the first epoch ends
    early = train_args(config, tmp_path / "early", tmp_path / "early_cache")
    # 100 epochs: the run cannot finish before the signal arrives, however fast the machine
    late = train_args(config, tmp_path / "late", tmp_path / "late_cache", "--num_epochs", "100")
    (code, out), (late_code, late_out) = signal_each([
        (script_command("train.py", early, tiny=True), lambda: list((tmp_path / "early").glob("*/config.yaml")),
         signal.SIGTERM, tmp_path / "early.log"),
        (script_command("train.py", late, tiny=True), lambda: list((tmp_path / "late").glob("*/checkpoint_last.pt")),
         signal.SIGINT, tmp_path / "late.log")])
    assert code == 143 and "Traceback" not in out and out.strip().endswith("terminated")
    assert not any((tmp_path / "early").iterdir())  # stopped before its first epoch: nothing left

    run_dir = next((tmp_path / "late").iterdir())
    assert late_code == 130 and "Traceback" not in late_out and late_out.strip().endswith("interrupted")
    assert f"python train.py --resume {run_dir}" in late_out
    assert load_torch_checkpoint(run_dir / "checkpoint_last.pt")["epoch"] >= 1


def test_a_moving_average_of_the_weights_is_validated_kept_and_resumed_without_changing_training(tmp_path,
                                                                                               tiny_students, capsys):
    config = write_task(tmp_path)
    base = ["--config", str(config), "--alpha", "0", "--student_model", "MobileNetV3", "--batch_size", "128",
            "--lr", "0.01", "--device", "cpu"]
    plain = run_in_process(base + ["--num_epochs", "2", "--output_dir", str(tmp_path / "plain")], capsys)
    averaged = run_in_process(base + ["--num_epochs", "2", "--ema_decay", "0.99", "--output_dir",
                                      str(tmp_path / "averaged")], capsys)
    plain_rows, averaged_rows = (list(csv.DictReader((run / "metrics.csv").open())) for run in (plain, averaged))
    # the same training (the average only reads the weights), another network validated
    assert [r["train_loss"] for r in plain_rows] == [r["train_loss"] for r in averaged_rows]
    assert [r["val_loss"] for r in plain_rows] != [r["val_loss"] for r in averaged_rows]
    last = load_torch_checkpoint(averaged / "checkpoint_last.pt")
    raw = load_torch_checkpoint(plain / "checkpoint_last.pt")["model"]
    assert all(torch.equal(last["model"][k], raw[k]) for k in raw)
    kept = load_weights(averaged / "student.safetensors")[0]
    best = load_torch_checkpoint(averaged / "checkpoint_best.pt")
    assert all(torch.equal(kept[k], best["model"][k]) for k in kept)
    assert any(not torch.equal(kept[k], raw[k]) for k in kept if kept[k].is_floating_point())

    first = run_in_process(base + ["--num_epochs", "1", "--ema_decay", "0.99", "--output_dir",
                                   str(tmp_path / "resumed")], capsys)
    after_one = load_torch_checkpoint(first / "checkpoint_last.pt")
    assert after_one["average"]["steps"] > 0 and last["average"]["steps"] == 2 * after_one["average"]["steps"]
    one_epoch_kept = load_weights(first / "student.safetensors")[0]  # its only epoch is its best: the average
    assert all(torch.equal(one_epoch_kept[k], after_one["average"]["model"][k]) for k in one_epoch_kept)
    resumed = run_in_process(base + ["--num_epochs", "2", "--resume", str(first)], capsys)
    assert_same_run(averaged, resumed)
    assert load_weights(resumed / "student.safetensors")[0].keys() == kept.keys()
    assert all(torch.equal(load_weights(resumed / "student.safetensors")[0][k], kept[k]) for k in kept)


def test_a_warmed_up_run_resumed_mid_warmup_continues_as_the_uninterrupted_one(tmp_path, tiny_students, capsys):
    config = write_task(tmp_path)
    base = ["--config", str(config), "--alpha", "0", "--student_model", "MobileNetV3", "--batch_size", "128",
            "--lr", "0.01", "--device", "cpu"]  # StepLR: a longer run keeps the shorter one's rates, cosine not
    whole = run_in_process(base + ["--num_epochs", "3", "--warmup_epochs", "1.5", "--output_dir",
                                   str(tmp_path / "whole")], capsys)
    plain = run_in_process(base + ["--num_epochs", "3", "--output_dir", str(tmp_path / "plain")], capsys)
    losses = [[r["train_loss"] for r in csv.DictReader((run / "metrics.csv").open())] for run in (whole, plain)]
    assert losses[0] != losses[1]
    assert [r["lr"] for r in csv.DictReader((whole / "metrics.csv").open())] == [  # each epoch's scheduled rate
        r["lr"] for r in csv.DictReader((plain / "metrics.csv").open())]
    first = run_in_process(base + ["--num_epochs", "2", "--warmup_epochs", "1.5", "--output_dir",
                                   str(tmp_path / "resumed")], capsys)
    assert_same_run(whole, run_in_process(base + ["--num_epochs", "3", "--resume", str(first)], capsys))
