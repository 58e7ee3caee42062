import pytest
import torch
import yaml

from kd.config import TASK_CONFIGS, load_task_config, parse_task_config
from kd.errors import UserError
from kd.students import build_student
from tests.conftest import tiny_task_raw


def _family(arch: str) -> str:
    return arch.rstrip("0123456789_t").split("_")[0].rstrip("0123456789")


@pytest.mark.parametrize("key, min_teachers", [("A", 2), ("B", 2)])
def test_shipped_tasks_have_teachers_of_different_families(key, min_teachers):
    task = load_task_config(key)
    families = {_family(t.arch) for t in task.teachers}
    assert len(task.teachers) >= min_teachers and len(families) == len(task.teachers)
    assert task.num_classes == 10 and task.data.channels == 1


def test_typo_in_a_key_is_named(tmp_path):
    raw = tiny_task_raw(tmp_path)
    raw["augment"]["crop_paddng"] = 2
    with pytest.raises(UserError, match="unknown key.*crop_paddng"):
        parse_task_config(raw, "cfg")


def test_missing_key_is_named(tmp_path):
    raw = tiny_task_raw(tmp_path)
    del raw["teachers"][0]["arch"]
    with pytest.raises(UserError, match="teachers\\[0\\].*missing key.*arch"):
        parse_task_config(raw, "cfg")


def test_normalisation_must_match_channels(tmp_path):
    raw = tiny_task_raw(tmp_path)
    raw["normalization"]["mean"] = [0.1, 0.2, 0.3]
    with pytest.raises(UserError, match="one mean and one std per channel"):
        parse_task_config(raw, "cfg")


def test_config_file_by_path(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(tiny_task_raw(tmp_path)))
    assert load_task_config(str(path)).classes == ("a", "b", "c")
    with pytest.raises(UserError, match="use A, B or the path"):
        load_task_config(str(tmp_path / "missing.yaml"))
    assert set(TASK_CONFIGS) == {"A", "B"}


def test_saved_config_loads_back(tmp_path):
    task = load_task_config("B")
    path = tmp_path / "saved.yaml"
    path.write_text(yaml.safe_dump(task.to_dict()))
    again = load_task_config(str(path))
    assert again.classes == task.classes and again.mean == task.mean and again.teachers[0].arch == "cs3darknet_s"


def test_wrong_value_types_are_user_errors(tmp_path):
    raw = tiny_task_raw(tmp_path)
    del raw["normalization"]
    with pytest.raises(UserError, match="wrong type"):
        parse_task_config(raw, "cfg")


def test_student_stride_reduction_is_read_and_checked(tmp_path):
    raw = tiny_task_raw(tmp_path, size=32)
    raw["student_stride_reduction"] = {"MobileNetV3": 0}
    task = parse_task_config(raw, "cfg")
    with torch.no_grad():
        final = build_student("MobileNetV3", task).eval().backbone.forward_features(torch.zeros(1, 1, 32, 32))
    assert final.shape[-1] == 1  # timm's own architecture: 32x smaller; the default (1 halved) gives 2
    raw["student_stride_reduction"] = {"MobileNet": 2}
    with pytest.raises(UserError, match="unknown student.*MobileNet;"):
        parse_task_config(raw, "cfg")
    raw["student_stride_reduction"] = {"MobileNetV3": 7}
    with pytest.raises(UserError, match="student_stride_reduction must map"):
        parse_task_config(raw, "cfg")


@pytest.mark.parametrize("weights", [[0, 0], [1, -1]])
def test_teacher_weights_that_cannot_be_normalised_are_refused(tmp_path, weights):
    raw = tiny_task_raw(tmp_path)
    for teacher, weight in zip(raw["teachers"], weights):
        teacher["weight"] = weight
    with pytest.raises(UserError, match="teacher weights must be >= 0 and not all 0"):
        parse_task_config(raw, "cfg")
