import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kd.checkpoint import load_torch_checkpoint
from tests.test_training import write_task

ROOT = Path(__file__).resolve().parent.parent


def train_command(config: Path, output_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "train.py", "--config", str(config), "--num_epochs", "4", "--alpha", "0.5",
            "--student_model", "MobileNetV3", "--batch_size", "64", "--device", "cpu", "--teacher_epochs", "1",
            "--teacher_cache", "on", "--teacher_cache_views", "2", "--cache_dir", str(cache_dir),
            "--output_dir", str(output_dir), *extra]


def run(command: list[str]) -> Path:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1])


def assert_same_run(a: Path, b: Path) -> None:
    assert (a / "metrics.csv").read_text() == (b / "metrics.csv").read_text()
    state_a = load_torch_checkpoint(a / "checkpoint_last.pt")
    state_b = load_torch_checkpoint(b / "checkpoint_last.pt")
    assert state_a["model"].keys() == state_b["model"].keys()
    assert all((state_a["model"][k] == state_b["model"][k]).all() for k in state_a["model"])


@pytest.mark.slow
def test_killed_run_resumes_bit_for_bit(tmp_path):
    config = write_task(tmp_path)
    reference = run(train_command(config, tmp_path / "ref", tmp_path / "cache"))  # also trains the teachers
    again = run(train_command(config, tmp_path / "again", tmp_path / "cache"))
    assert_same_run(reference, again)  # same seed and flags on CPU: identical metrics and weights

    process = subprocess.Popen(train_command(config, tmp_path / "killed", tmp_path / "cache"), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "killed").glob("*/checkpoint_last.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 1.5))  # somewhere in the epochs that follow
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    killed_dir = next((tmp_path / "killed").iterdir())
    resumed = run(train_command(config, tmp_path / "killed", tmp_path / "cache", "--resume", "auto"))
    assert resumed == killed_dir
    assert_same_run(reference, resumed)


@pytest.mark.slow
def test_ctrl_c_keeps_the_last_epoch_and_says_how_to_resume(tmp_path):
    config = write_task(tmp_path)
    # 100 epochs: the run cannot finish before the signal arrives, however fast the machine.
    process = subprocess.Popen(train_command(config, tmp_path / "runs", tmp_path / "cache", "--num_epochs", "100"),
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "runs").glob("*/checkpoint_last.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    run_dir = next((tmp_path / "runs").iterdir())
    assert process.returncode == 130 and "Traceback" not in err
    assert f"python train.py --resume {run_dir}" in err
    assert load_torch_checkpoint(run_dir / "checkpoint_last.pt")["epoch"] >= 1
