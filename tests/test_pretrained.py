"""Pretrained students (--pretrained FILE): the backbone starts from the file, the classifier is new and
zero; a resumed run no longer needs the file; a missing or mismatched file stops the run in one line."""

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from conftest import TINY_STUDENTS, run_in_process, write_task
from kd.checkpoint import load_weights
from kd.errors import UserError

ARCH = TINY_STUDENTS["MobileNetV3"]  # the architecture tiny_students builds for the MobileNetV3 student


def weights_file(path, arch=ARCH, seed=5):
    """An ImageNet-shaped (1,000 classes, RGB) model's random weights, as a published weights file would be."""
    torch.manual_seed(seed)
    save_file(timm.create_model(arch, num_classes=1000).state_dict(), path)
    return path


def argv(task, out, *extra):
    # lr 1e-12: the epoch runs the whole path (loading, training, saving) while moving no weight measurably
    return ["--config", str(task), "--alpha", "0", "--student_model", "mobilenetv3", "--num_epochs", "1",
            "--lr", "1e-12", "--weight_decay", "0", "--batch_size", "64", "--device", "cpu", "--output_dir",
            str(out), *extra]


def test_a_student_starts_from_a_local_weights_file_with_a_zero_classifier(tmp_path, tiny_students, capsys):
    source = weights_file(tmp_path / "imagenet.safetensors")
    task = write_task(tmp_path)
    run_dir = run_in_process(argv(task, tmp_path / "runs", "--pretrained", str(source)), capsys)
    trained, meta = load_weights(run_dir / "student.safetensors")
    original = load_weights(source)[0]
    block = "blocks.3.0.conv_pw.weight"  # a layer past the stem, which timm sums over RGB for grayscale inputs
    assert torch.allclose(trained[f"backbone.{block}"], original[block], atol=1e-8)
    assert trained["backbone.classifier.weight"].shape == (10, original["classifier.weight"].shape[1])
    assert trained["backbone.classifier.weight"].abs().max() < 1e-8  # new and zero, not the file's 1,000 classes
    record = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert record["settings"]["pretrained"] == str(source.resolve()) == meta["pretrained"]

    fresh = run_in_process(argv(task, tmp_path / "fresh"), capsys)  # the comparison can fail: random starts differ
    assert not torch.allclose(load_weights(fresh / "student.safetensors")[0][f"backbone.{block}"], original[block],
                              atol=1e-3)

    source.unlink()  # a resumed run continues from its checkpoint, not from the start weights
    resumed = run_in_process(["--resume", str(run_dir), "--num_epochs", "2"], capsys)
    assert resumed == run_dir and (run_dir / "metrics.csv").read_text().count("\n") == 3


@pytest.mark.parametrize("problem", ["missing", "another architecture"])
def test_a_missing_or_mismatched_weights_file_is_one_line_before_any_teacher_trains(tmp_path, problem):
    import train

    task = write_task(tmp_path)  # its teachers are missing: they would train first with --alpha 0.5
    source = tmp_path / "start.safetensors"
    if problem == "another architecture":
        weights_file(source, arch="resnet18")
    with pytest.raises(UserError) as err:  # run_cli prints it as one line, exit 1 (test_cli.py)
        train.main([*argv(task, tmp_path / "runs", "--pretrained", str(source)), "--alpha", "0.5"])
    assert str(source) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "teachers").exists() and not list(tmp_path.glob("runs/*"))  # no teacher, no run
