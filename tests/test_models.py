import pytest
import torch
import torch.nn.functional as F

from kd.config import load_task_config
from kd.errors import UserError
from kd.models import create_model, halve_first_downsampling
from kd.students import STUDENT_ARCHS, build_student, canonical_student_name


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


@pytest.mark.parametrize("arch", ["mobilenetv3_small_100", "efficientnet_b0", "resnet18", "convnext_atto"])
def test_stem_keeps_a_spatial_map_on_28x28(arch):
    model = create_model(arch, 10, 1, [0.5], [0.5]).eval()
    with torch.no_grad():
        features = model.backbone.forward_features(torch.zeros(1, 1, 28, 28))
    assert min(features.shape[-2:]) >= 1
    if arch != "convnext_atto":  # ConvNeXt's patchify stem halves to 2x2 and ends at 1x1
        assert min(features.shape[-2:]) >= 2


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


def test_student_names_are_case_insensitive():
    assert canonical_student_name("mobilenetv3") == "MobileNetV3"
    assert canonical_student_name("RESNET18") == "ResNet18"
    with pytest.raises(UserError, match="MobileNetV3, EfficientNet, ResNet18"):
        canonical_student_name("vgg")


def test_unknown_architecture_is_a_user_error():
    with pytest.raises(UserError, match="unknown timm architecture"):
        create_model("not_a_model_at_all", 3, 1, [0.5], [0.5])
