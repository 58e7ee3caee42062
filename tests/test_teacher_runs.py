"""Teachers are trained by the students' run machinery: run folder, metrics, resume after an interruption."""

import csv

import pytest
import torch

from kd.checkpoint import load_torch_checkpoint, load_weights
from kd.config import parse_task_config
from kd.data import Batches, Split, TaskData
from kd.distributed import World
from kd.engine import Precision
from kd.runs import setup_logging
from kd.resume import RunCheckpoints
from kd.training import ensure_teachers, teacher_run_dir
from tests.conftest import tiny_task_raw


def tiny_data(n: int = 48) -> TaskData:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3
    images = torch.randint(0, 255, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    split = Split(images, labels)
    return TaskData(split, split, split, "synthetic")


@pytest.fixture
def one_teacher_task(tmp_path):
    raw = tiny_task_raw(tmp_path / "teachers")
    raw["teachers"] = raw["teachers"][:1]
    raw["teachers"][0]["recipe"] = {"epochs": 3, "batch_size": 16, "label_smoothing": 0.1}
    return parse_task_config(raw, "tiny")


def epochs_in(run_dir) -> list[str]:
    return [row["epoch"] for row in csv.DictReader((run_dir / "metrics.csv").open())]


def test_a_missing_teacher_is_trained_in_a_run_folder_of_its_own(one_teacher_task):
    ensemble = ensure_teachers(one_teacher_task, tiny_data(), Precision(torch.device("cpu"), None), World())
    spec = one_teacher_task.teachers[0]
    run_dir = teacher_run_dir(one_teacher_task, spec)
    assert {"config.yaml", "metrics.csv", "train.log", "checkpoint_last.pt", "teacher.safetensors"} <= {
        p.name for p in run_dir.iterdir()}
    assert epochs_in(run_dir) == ["1", "2", "3"]
    _, meta = load_weights(one_teacher_task.teacher_checkpoint(spec))
    assert meta["arch"] == spec.arch and meta["recipe"]["label_smoothing"] == 0.1
    assert ensemble.metadata[spec.name]["test_acc"] == meta["test_acc"]
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert float(rows[-1]["lr"]) < float(rows[0]["lr"])  # the recipe's cosine schedule, not StepLR(30)


def test_an_interrupted_teacher_run_continues_where_it_stopped(one_teacher_task, monkeypatch):
    save = RunCheckpoints.save

    def save_then_interrupt(self, row):
        save(self, row)
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunCheckpoints, "save", save_then_interrupt)
    setup_logging()
    precision = Precision(torch.device("cpu"), None)
    with pytest.raises(KeyboardInterrupt):
        ensure_teachers(one_teacher_task, tiny_data(), precision, World())
    spec = one_teacher_task.teachers[0]
    run_dir = teacher_run_dir(one_teacher_task, spec)
    assert not one_teacher_task.teacher_checkpoint(spec).exists()
    assert load_torch_checkpoint(run_dir / "checkpoint_last.pt")["epoch"] == 2

    monkeypatch.setattr(RunCheckpoints, "save", save)
    ensure_teachers(one_teacher_task, tiny_data(), precision, World())
    assert epochs_in(run_dir) == ["1", "2", "3"]
    assert "after epoch 2" in (run_dir / "train.log").read_text()
    assert one_teacher_task.teacher_checkpoint(spec).is_file()


def test_training_batches_drop_an_incomplete_last_batch():
    split = Split(torch.zeros(41, 1, 4, 4, dtype=torch.uint8), torch.zeros(41, dtype=torch.long))
    train = Batches(split, 20, "cpu", shuffle=True, drop_last=True)
    assert [len(b.y) for b in train] == [20, 20] and len(train) == 2
    assert [len(b.y) for b in Batches(split, 20, "cpu")] == [20, 20, 1]  # evaluation keeps every image
    assert [len(b.y) for b in Batches(split, 64, "cpu", shuffle=True, drop_last=True)] == [41]
    seen = set()
    for epoch in range(8):
        train.set_epoch(epoch)
        seen |= {i for b in train for i in b.index.tolist()}
    assert seen == set(range(41))


def test_at_equal_validation_accuracy_the_lower_loss_is_kept(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoints = RunCheckpoints(tmp_path, model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1),
                                 Precision(torch.device("cpu"), None), "student", {})
    for epoch, acc, loss in [(1, 0.9, 0.5), (2, 1.0, 0.3), (3, 1.0, 0.1), (4, 1.0, 0.2), (5, 0.95, 0.05)]:
        checkpoints.save({"epoch": epoch, "val_acc": acc, "val_loss": loss})
    assert checkpoints.best_epoch == 3
    assert load_torch_checkpoint(tmp_path / "checkpoint_best.pt")["epoch"] == 3
