import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd.config import parse_task_config  # noqa: E402


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


@pytest.fixture
def tiny_task(tmp_path):
    return parse_task_config(tiny_task_raw(tmp_path / "teachers"), "tiny")


def with_random_head(model):
    """A new model predicts the uniform distribution (its classifier starts at zero); tests that need
    teachers with distinct outputs give it a random classifier."""
    torch.nn.init.normal_(model.backbone.get_classifier().weight, std=0.5)
    return model
