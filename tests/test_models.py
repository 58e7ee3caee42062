import math
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kd.config import load_task_config
from kd.data import Batches, load_task_data
from kd.errors import UserError
from kd.models import create_model, halve_first_downsampling
from kd.settings import STUDENT_ARCHS, canonical_student_name
from kd.students import build_student
from kd.teachers import build_teacher

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("task_key", ["A", "B"])
def test_every_new_model_starts_at_the_uniform_prediction(task_key):
    """A new classifier is zero, so no model starts confidently wrong (cross-entropy ln C)."""
    task = load_task_config(task_key)
    batch = next(iter(Batches(load_task_data(task).train, 32, "cpu", shuffle=True, augment=task.augment)))
    models = {**{name: build_student(name, task) for name in STUDENT_ARCHS},
              **{spec.name: build_teacher(spec, task) for spec in task.teachers}}
    for name, model in models.items():
        with torch.no_grad():
            loss = F.cross_entropy(model.train()(batch.x), batch.y).item()
        assert abs(loss - math.log(task.num_classes)) < 0.3, f"{name} starts at cross-entropy {loss:.2f}"


@pytest.mark.parametrize("halved, expected", [(0, 1), (1, 2), (2, 4)])
def test_each_stride_reduction_doubles_the_final_map(halved, expected):
    for arch in ("mobilenetv3_small_100", "efficientnet_b0", "resnet18", "convnext_atto"):
        model = create_model(arch, 10, 1, [0.5], [0.5], stride_reduction=halved).eval()
        with torch.no_grad():
            assert model.backbone.forward_features(torch.zeros(1, 1, 32, 32)).shape[-1] == expected, arch


@pytest.mark.parametrize("task_key", ["A", "B"])
@pytest.mark.parametrize("student", list(STUDENT_ARCHS))
def test_students_train_on_task_input(task_key, student):
    task = load_task_config(task_key)
    torch.manual_seed(0)
    model = build_student(student, task)
    x = torch.rand(2, task.data.channels, task.data.input_size, task.data.input_size)
    logits = model(x)
    assert logits.shape == (2, task.num_classes)
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_halving_the_first_downsampling_doubles_the_final_map():
    import timm

    plain = timm.create_model("mobilenetv3_small_100", num_classes=3, in_chans=1)
    with torch.no_grad():
        before = plain.forward_features(torch.zeros(1, 1, 64, 64)).shape[-1]
        after = halve_first_downsampling(plain).forward_features(torch.zeros(1, 1, 64, 64)).shape[-1]
    assert (before, after) == (2, 4)


def test_normalisation_lives_in_the_model():
    model = create_model("resnet10t", 3, 1, [0.25], [0.5])
    assert torch.equal(model.state_dict()["mean"].flatten(), torch.tensor([0.25]))
    assert torch.equal(model.state_dict()["std"].flatten(), torch.tensor([0.5]))


def test_a_flip_averaging_network_judges_an_image_and_its_mirror_alike_and_trains_as_the_plain_one():
    torch.manual_seed(0)
    plain = create_model("test_resnet", 3, 1, [0.5], [0.25])
    torch.nn.init.normal_(plain.backbone.get_classifier().weight)  # a zero head would predict uniformly
    averaged = create_model("test_resnet", 3, 1, [0.5], [0.25], flip_average=True)
    averaged.load_state_dict(plain.state_dict())  # no weight of its own: the same file loads into either
    x = torch.rand(4, 1, 16, 16)
    assert torch.equal(averaged.train()(x), plain.train()(x))  # the loss and its gradients are the plain network's
    plain.eval(), averaged.eval()
    with torch.no_grad():
        mean_probabilities = (plain(x).softmax(1) + plain(x.flip(-1)).softmax(1)) / 2
        assert torch.allclose(averaged(x).softmax(1), mean_probabilities, atol=1e-6)
        assert torch.allclose(averaged(x), averaged(x.flip(-1)), atol=1e-5)
        assert not torch.allclose(plain(x), plain(x.flip(-1)), atol=1e-3)


def test_student_names_are_case_insensitive():
    assert canonical_student_name("mobilenetv3") == "MobileNetV3"
    assert canonical_student_name("RESNET18") == "ResNet18"
    with pytest.raises(UserError, match="MobileNetV3, EfficientNet, ResNet18"):
        canonical_student_name("vgg")


def test_unknown_architecture_is_a_user_error():
    with pytest.raises(UserError, match="unknown timm architecture"):
        create_model("not_a_model_at_all", 3, 1, [0.5], [0.5])


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="FTZ/DAZ are x86's")
def test_denormal_floats_are_flushed_in_every_cpu_thread_once_networks_are_imported():
    """A denormal operand takes x86's slow path: weights decayed towards zero made training 3x slower."""
    code = ("import torch, kd.models; torch.set_num_threads(2); x = torch.full((1 << 22,), 1e-39); "
            "print((x * 1.0).count_nonzero().item())")  # large enough to be split between both threads
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.stdout.strip() == "0", result.stderr
