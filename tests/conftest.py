import shutil
from pathlib import Path

import pytest
import torch
import yaml

from kd.config import parse_task_config


@pytest.fixture(autouse=True)
def _small_threads():
    torch.set_num_threads(2)


def tiny_task_raw(checkpoint_dir: Path, classes=("a", "b", "c"), size=8) -> dict:
    """A task config mapping with two tiny teachers of different families."""
    return {
        "name": "T",
        "description": "synthetic",
        "data": {"source": "digits", "input_size": size, "channels": 1},
        "classes": list(classes),
        "normalization": {"mean": [0.5], "std": [0.25]},
        "augment": {"crop_padding": 1, "hflip": False},
        "teachers": [
            {"name": "resnet", "arch": "resnet10t", "checkpoint": str(checkpoint_dir / "resnet10t.safetensors"),
             "recipe": {"epochs": 1, "batch_size": 16}},
            {"name": "mobile", "arch": "mobilenetv3_small_050",
             "checkpoint": str(checkpoint_dir / "mnv3.safetensors"), "recipe": {"epochs": 1, "batch_size": 16}},
        ],
    }


def write_task(folder: Path, teachers: Path | None = None) -> Path:
    """The tiny task over scikit-learn's digits at 8x8 as a config file in `folder`; its teachers
    resolve to `folder`/teachers, where a copy of `teachers` (trained ones) is put when given."""
    raw = tiny_task_raw(Path("teachers"))  # relative: resolves beside the config file
    raw.update(classes=[str(i) for i in range(10)], data={"source": "digits", "input_size": 8, "channels": 1})
    path = folder / "digits8.yaml"
    path.write_text(yaml.safe_dump(raw))
    if teachers is not None:
        shutil.copytree(teachers, folder / "teachers", dirs_exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory) -> Path:
    """The tiny task's two teachers (1 epoch each with their recipes), trained once per test session:
    the folder to hand to write_task."""
    from kd.training import TrainSettings, train_teachers

    folder = tmp_path_factory.mktemp("tiny_teachers")
    torch.set_num_threads(2)
    return train_teachers(TrainSettings(task=str(write_task(folder)), device="cpu"))


@pytest.fixture
def tiny_task(tmp_path):
    return parse_task_config(tiny_task_raw(tmp_path / "teachers"), "tiny")


def with_random_head(model):
    """A new model predicts the uniform distribution (its classifier starts at zero); tests that need
    teachers with distinct outputs give it a random classifier."""
    torch.nn.init.normal_(model.backbone.get_classifier().weight, std=0.5)
    return model
