import dataclasses
import pickle

import pytest
import torch
import yaml

import kd.training
from kd.checkpoint import atomic_torch_save, load_torch_checkpoint, load_weights, save_half_copy, save_weights
from kd.config import load_task_config
from kd.errors import UserError
from kd.students import build_student
from kd.teachers import TeacherEnsemble, build_teacher, load_teacher
from kd.training import RunHooks, TrainSettings, ensure_teachers, train_student
from tests.conftest import with_random_head, write_task


def test_teacher_checkpoint_round_trips(tiny_task):
    spec = tiny_task.teachers[0]
    torch.manual_seed(0)
    model = build_teacher(spec, tiny_task).eval()
    save_weights(model, tiny_task.teacher_checkpoint(spec), {"arch": spec.arch, "classes": ["a", "b", "c"]})
    loaded, meta = load_teacher(spec, tiny_task)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(model(x), loaded(x)) and meta["arch"] == spec.arch
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_a_half_precision_copy_of_a_teacher_is_half_the_size_and_loads_as_fp32(tiny_task):
    spec = tiny_task.teachers[0]
    torch.manual_seed(0)
    model = with_random_head(build_teacher(spec, tiny_task)).eval()
    full = tiny_task.teacher_checkpoint(spec)
    save_weights(model, full, {"arch": spec.arch, "test_acc": 0.9})
    half = full.with_name("half.safetensors")
    save_half_copy(full, half)
    state, meta = load_weights(half)
    assert state["backbone.fc.weight"].dtype == torch.float16 and meta == {"arch": spec.arch, "test_acc": 0.9,
                                                                           "precision": "fp16"}
    assert state["backbone.bn1.num_batches_tracked"].dtype == torch.int64
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded, _ = load_teacher(dataclasses.replace(spec, checkpoint=str(half)), tiny_task)
    x = torch.rand(4, 1, 8, 8)
    assert next(loaded.parameters()).dtype == torch.float32
    assert torch.allclose(loaded(x), model(x), atol=2e-2) and not torch.equal(loaded(x), model(x))


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
    resnet, effnet = tiny_task.teachers
    save_weights(build_teacher(effnet, tiny_task), tiny_task.teacher_checkpoint(resnet), {})
    with pytest.raises(UserError, match="does not fit this architecture"):
        load_teacher(resnet, tiny_task)


def test_missing_checkpoint_is_named(tiny_task):
    with pytest.raises(UserError, match="checkpoint not found.*resnet.safetensors"):
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


def assert_same_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every parameter and buffer of `module` (BatchNorm's running statistics included) equals `state`'s."""
    now = module.state_dict()
    assert now.keys() == state.keys()
    assert [name for name in state if not torch.equal(now[name], state[name])] == []


def test_teachers_stay_in_eval_when_a_module_holding_them_is_put_in_train_mode(tiny_task):
    torch.manual_seed(0)
    ensemble = TeacherEnsemble({t.name: build_teacher(t, tiny_task) for t in tiny_task.teachers})
    before = {name: value.clone() for name, value in ensemble.state_dict().items()}
    torch.nn.ModuleDict({"student": build_student("MobileNetV3", tiny_task), "teachers": ensemble}).train()
    assert all(not m.training for m in ensemble.models)
    teacher_logits = ensemble(torch.rand(4, 1, 8, 8))
    assert teacher_logits.shape == (2, 4, 3) and not teacher_logits.requires_grad
    assert_same_state(ensemble, before)  # a teacher in train mode would have moved its BatchNorm statistics


def test_a_kd_run_leaves_its_teachers_as_their_checkpoints_hold_them(tmp_path, monkeypatch):
    """Through train_student's own path (teachers loaded from their checkpoints, run on every batch, the
    optimiser the run builds), every teacher parameter and buffer ends the run as its checkpoint holds it:
    a teacher run in train mode would move its BatchNorm statistics, a trained one its weights. The
    optimiser holds the student's parameters alone: teachers' there would be trained once they had gradients."""
    task_file = write_task(tmp_path)
    raw = yaml.safe_load(task_file.read_text())
    raw["data"].update(test_size=0.9, val_size=0.5)  # 89 training images: a few steps show what a run does
    task_file.write_text(yaml.safe_dump(raw))
    task = load_task_config(str(task_file))
    torch.manual_seed(0)
    for spec in task.teachers:  # untrained teachers do: the run needs checkpoints to load, not good teachers
        save_weights(build_teacher(spec, task), task.teacher_checkpoint(spec),
                     {"arch": spec.arch, "classes": list(task.classes)})
    loaded = []

    def keep_the_ensemble(*args, **kwargs):
        loaded.append(ensure_teachers(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(kd.training, "ensure_teachers", keep_the_ensemble)
    settings = TrainSettings(task=str(task_file), num_epochs=1, batch_size=16, alpha=0.5, student_model="mobilenetv3",
                             teacher_cache="off",  # online: the teachers run inside the training loop
                             device="cpu", output_dir=str(tmp_path / "runs"))
    run_dir = train_student(settings, hooks=RunHooks(score_test=False))
    (ensemble,) = loaded
    for spec, teacher in zip(task.teachers, ensemble.models):
        assert_same_state(teacher, load_weights(task.teacher_checkpoint(spec))[0])
    assert not any(p.requires_grad for p in ensemble.parameters())
    optimiser = load_torch_checkpoint(run_dir / "checkpoint_last.pt")["optimizer"]
    optimised = sum(len(group["params"]) for group in optimiser["param_groups"])
    student_parameters = len(list(build_student("MobileNetV3", task).parameters()))
    assert optimised == student_parameters
