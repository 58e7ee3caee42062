import pickle

import pytest
import torch

from kd.checkpoint import atomic_torch_save, load_weights, save_weights
from kd.errors import UserError
from kd.losses import KDLoss
from kd.students import build_student
from kd.teachers import TeacherEnsemble, build_teacher, load_teacher


def test_teacher_checkpoint_round_trips(tiny_task):
    spec = tiny_task.teachers[0]
    torch.manual_seed(0)
    model = build_teacher(spec, tiny_task).eval()
    save_weights(model, tiny_task.teacher_checkpoint(spec), {"arch": spec.arch, "classes": ["a", "b", "c"]})
    loaded, meta = load_teacher(spec, tiny_task)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(model(x), loaded(x)) and meta["arch"] == spec.arch
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_wrong_class_count_fails_clearly(tiny_task):
    spec = tiny_task.teachers[0]
    other = build_teacher(spec, tiny_task)
    other.backbone.reset_classifier(5)
    save_weights(other, tiny_task.teacher_checkpoint(spec), {})
    with pytest.raises(UserError, match=r"has shape \(5,.*expects \(3,.*class count"):
        load_teacher(spec, tiny_task)
    save_weights(other, tiny_task.teacher_checkpoint(spec), {"classes": list("abcde")})
    with pytest.raises(UserError, match="trained for 5 classes.*has 3"):
        load_teacher(spec, tiny_task)


def test_wrong_architecture_fails_clearly(tiny_task):
    resnet, mobile = tiny_task.teachers
    save_weights(build_teacher(mobile, tiny_task), tiny_task.teacher_checkpoint(resnet), {})
    with pytest.raises(UserError, match="does not fit this architecture"):
        load_teacher(resnet, tiny_task)


def test_missing_checkpoint_is_named(tiny_task):
    with pytest.raises(UserError, match="checkpoint not found.*resnet10t.safetensors"):
        load_teacher(tiny_task.teachers[0], tiny_task)


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(UserError, match="refused"):
        load_weights(path)
    assert not marker.exists()


def test_torch_checkpoint_of_this_project_loads(tmp_path, tiny_task):
    model = build_teacher(tiny_task.teachers[0], tiny_task)
    atomic_torch_save({"model": model.state_dict(), "metadata": {"arch": "resnet10t"}}, tmp_path / "c.pt")
    state, meta = load_weights(tmp_path / "c.pt")
    assert meta == {"arch": "resnet10t"} and set(state) == set(model.state_dict())


def test_teachers_get_no_gradient_and_stay_in_eval(tiny_task):
    torch.manual_seed(0)
    ensemble = TeacherEnsemble({t.name: build_teacher(t, tiny_task) for t in tiny_task.teachers})
    student = build_student("MobileNetV3", tiny_task)
    wrapper = torch.nn.ModuleDict({"student": student, "teachers": ensemble})
    wrapper.train()
    assert all(not m.training for m in ensemble.models)
    before = [p.clone() for p in ensemble.parameters()]
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    teacher_logits = ensemble(x)
    assert teacher_logits.shape == (2, 4, 3) and not teacher_logits.requires_grad
    parts, _ = KDLoss(2.0, 0.5)(student(x), y, teacher_logits)
    parts.total.backward()
    optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in ensemble.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, ensemble.parameters()))
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not ids & {id(p) for p in ensemble.parameters()}
