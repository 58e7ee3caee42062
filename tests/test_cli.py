import subprocess
import sys
from pathlib import Path

import pytest

from train import get_args_parser

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = {"task": "B", "lr": 0.001, "batch_size": 32, "num_epochs": 100, "weight_decay": 0.0005,
            "temperature": 2.0, "alpha": 0.1, "scheduler_step": 30, "scheduler_gamma": 0.5,
            "student_model": "EfficientNet", "seed": 42, "run": ""}


def test_defaults_equal_the_contract():
    args = vars(get_args_parser().parse_args([]))
    assert {k: args[k] for k in CONTRACT} == CONTRACT


def test_student_and_task_are_case_insensitive():
    args = get_args_parser().parse_args(["--task", "a", "--student_model", "mobilenetv3"])
    assert (args.task, args.student_model) == ("A", "MobileNetV3")


@pytest.mark.parametrize("flags", [
    ["--alpha", "1.5"], ["--alpha", "-0.1"], ["--temperature", "0"], ["--lr", "-1"], ["--lr", "abc"],
    ["--batch_size", "0"], ["--num_epochs", "0"], ["--scheduler_step", "0"], ["--scheduler_gamma", "0"],
    ["--scheduler_gamma", "1.5"], ["--task", "C"], ["--student_model", "VGG"], ["--weight_decay", "-1"],
    ["--stride_reduction", "4"], ["--stride_reduction", "-1"], ["--mixup", "-0.2"], ["--ema_decay", "1"],
    ["--ema_decay", "-0.5"], ["--warmup_epochs", "-1"],
])
def test_bad_values_exit_2_with_one_line(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        get_args_parser().parse_args(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0] and flags[0] in err[0]


def test_script_reports_user_errors_in_one_line(tmp_path):
    config = tmp_path / "task.yaml"
    config.write_text("name: X\ndata: {source: digits, input_size: 8, channels: 1, colour: true}\n")
    result = subprocess.run([sys.executable, "train.py", "--config", str(config), "--output_dir",
                             str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {config}: data: unknown key(s) colour; valid keys: channels, input_size, root, source, split_seed, "
        "storage, test_size, val_size"]
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


def test_two_task_sources_at_once_are_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        get_args_parser().parse_args(["--task", "A", "--config", "configs/task_b.yaml"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "not allowed with argument" in err[0]


def test_a_builtin_config_by_path_is_the_same_task_as_its_letter():
    from kd.config import load_task_config

    by_path = load_task_config(str(ROOT / "configs" / "task_b.yaml"))
    assert by_path == load_task_config("B")
    assert by_path.teacher_checkpoint(by_path.teachers[0]) == ROOT / "teachers" / "TaskB" / "cs3darknet_s.safetensors"


def test_every_script_names_its_output_folder_output_dir_and_still_takes_output():
    import tune
    from tests.conftest import load_benchmark

    study = load_benchmark("kd_study")
    for parser in (tune.get_args_parser(), study.get_args_parser()):
        assert parser.parse_args(["--output_dir", "x"]).output_dir == "x"
        assert parser.parse_args(["--output", "y"]).output_dir == "y"  # the name of release 0.2


def test_kd_study_takes_train_pys_flags_as_train_py_defines_them():
    from tests.conftest import load_benchmark

    study = load_benchmark("kd_study").get_args_parser()
    assert study.parse_args(["--alpha", "0"]).alpha == 0.0  # typed as train.py's (the study refuses it itself)
    with pytest.raises(SystemExit):
        study.parse_args(["--task", "A", "--config", "x.yaml"])  # one task source, as in train.py


def test_a_warmup_as_long_as_the_run_exits_2_in_one_line(capsys):
    import train

    with pytest.raises(SystemExit) as exit_info:
        train.main(["--task", "A", "--num_epochs", "4", "--warmup_epochs", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert "--warmup_epochs 4 is not below --num_epochs 4: the rate would never reach --lr" in err[0]
