import csv
import dataclasses
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from kd.checkpoint import load_torch_checkpoint, load_weights
from kd.config import load_task_config
from kd.batches import Batch
from kd.data import Batches, Split, load_task_data
from kd.engine import (Mixup, Precision, WeightAverage, Warmup, evaluate, fit, online_teachers, select_device,
                       select_precision, train_one_epoch)
from kd.errors import UserError
from kd.distillers.kd import KD
from kd.models import create_model
from kd.students import build_student
from kd.record import create_run_dir, run_name
from kd.teachers import TeacherEnsemble
from kd.training import RunHooks, TrainSettings, train_student
from tests.conftest import assert_same_run, write_task

ROOT = Path(__file__).resolve().parent.parent


def synthetic_split(n: int, seed: int) -> Split:
    """Three classes told apart by which third of an 8x8 image is bright."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randint(0, 60, (n, 1, 8, 8), generator=g)
    for cls in range(3):
        images[labels == cls, :, :, cls * 3:cls * 3 + 2] += 180
    return Split(images.to(torch.uint8), labels)


class ThirdsTeacher(torch.nn.Module):
    """A teacher that reads synthetic_split's class off the image (its brightest third) and puts `margin`
    logits on that class moved on by `shift` (shift 1: a teacher that is always wrong)."""

    def __init__(self, margin: float, shift: int = 0):
        super().__init__()
        self.margin, self.shift = margin, shift

    def forward(self, x):
        brightest = torch.stack([x[..., 3 * c:3 * c + 2].mean(dim=(1, 2, 3)) for c in range(3)], dim=1).argmax(dim=1)
        return self.margin * F.one_hot((brightest + self.shift) % 3, 3).float()


def test_short_kd_training_learns_the_classes_from_the_weighted_teachers_alone():
    """alpha = 1 and training labels that all say class 0: what the student learns of the classes can only
    come from the teachers' target. At T = 2 the always-wrong teacher is the more confident one, so only
    the fixed 3:1 weights make the right teacher's class the target's largest (uniform or swapped weights
    teach the wrong class; hard labels teach class 0)."""
    torch.manual_seed(0)
    train = synthetic_split(96, 0)
    train = Split(train.images, torch.zeros_like(train.labels))
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    teachers = TeacherEnsemble({"right": ThirdsTeacher(4.0), "wrong": ThirdsTeacher(8.0, shift=1)})
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-2)
    rows = []
    fit(student, Batches(train, 16, "cpu", shuffle=True), Batches(synthetic_split(48, 1), 48, "cpu"),
        optimizer=optimizer, scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 10),
        criterion=KD(2.0, 1.0, "fixed", fixed_weights=[3.0, 1.0]), epochs=4,
        precision=Precision(torch.device("cpu"), None), teachers=online_teachers(teachers),
        teacher_names=teachers.names, on_epoch=rows.append)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert all(r["train_kd"] == pytest.approx(r["train_loss"]) for r in rows)  # alpha = 1: the loss is the KD term
    assert rows[-1]["val_acc"] > 0.9
    assert all((r["w_right"], r["w_wrong"]) == pytest.approx((0.75, 0.25)) for r in rows)


def test_mixup_blends_images_and_labels_alike_and_the_teachers_see_the_blend():
    torch.manual_seed(0)
    # image i is the unit vector e_i, so row i of the blended images is the weight each image got in image i
    labels = torch.arange(16) % 3
    batch = Batch(torch.eye(16).view(16, 16, 1, 1), labels, torch.arange(16), None)
    blended, soft = Mixup(0.4, 3)(batch)
    weights = blended.x.view(16, 16)
    lam = weights.diagonal().min()
    assert 0 < lam < 1 and torch.allclose(weights.sum(dim=0), torch.ones(16))  # each image given out once in all
    assert torch.allclose(weights.sum(dim=1), torch.ones(16))  # two images per blend: lam and 1 - lam
    assert torch.allclose(soft, weights @ F.one_hot(labels, 3).float())  # the labels blended as the images
    assert (blended.y == labels).all() if lam >= 0.5 else (blended.y == soft.argmax(dim=1)).all()

    seen = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    train_one_epoch(model, [batch], torch.optim.SGD(model.parameters(), lr=0.0), KD(2.0, 0.5),
                    Precision(torch.device("cpu"), None), teachers=lambda b: seen.append(b.x) or torch.zeros(1, 16, 3),
                    progress=False, mixup=Mixup(0.4, 3))
    assert seen[0].shape == batch.x.shape and not torch.equal(seen[0], batch.x)


def test_mixup_distils_from_cached_blends_and_a_later_run_replays_them_exactly(tmp_path, tiny_teachers,
                                                                              tiny_students):
    settings = TrainSettings(task=str(write_task(tmp_path, tiny_teachers)), num_epochs=2, batch_size=128,
                             alpha=0.5, mixup=0.4, student_model="mobilenetv3", device="cpu",
                             output_dir=str(tmp_path / "first"), cache_dir=str(tmp_path / "cache"))
    first = train_student(settings)
    files = sorted((tmp_path / "cache").iterdir())
    assert len(files) == 4  # 2 teachers x 2 blended views, one per epoch
    assert "x 2 views (blended by --mixup)" in (first / "train.log").read_text()
    second = train_student(dataclasses.replace(settings, output_dir=str(tmp_path / "second")))
    assert sorted((tmp_path / "cache").iterdir()) == files
    assert_same_run(first, second)  # the same run whether its blends' logits existed before or not
    online = train_student(dataclasses.replace(settings, teacher_cache="off", output_dir=str(tmp_path / "online"),
                                               cache_dir=str(tmp_path / "unused")))
    assert not (tmp_path / "unused").exists() and (online / "student.safetensors").is_file()
    assert yaml.safe_load((online / "config.yaml").read_text())["settings"]["mixup"] == 0.4


def test_mixup_of_a_pooled_batch_gives_its_blend_s_labels_and_draws_nothing():
    split = Split(torch.randint(0, 256, (12, 1, 4, 4), dtype=torch.uint8), torch.arange(12) % 3)
    batch = next(iter(Batches(split, 12, "cpu", views=2, mixup=0.4)))
    state = torch.get_rng_state()
    blended, soft = Mixup(0.4, 3)(batch)
    assert blended is batch and torch.equal(soft, batch.mix.soft_labels(3))
    assert torch.equal(torch.get_rng_state(), state)  # a resumed run draws where the uninterrupted one did
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    with pytest.raises(ValueError, match="a blended batch .* needs mixup= for its soft labels"):
        train_one_epoch(model, [batch], torch.optim.SGD(model.parameters(), lr=0.0), KD(2.0, 0.5),
                        Precision(torch.device("cpu"), None), progress=False)


@pytest.fixture
def trained_run(tmp_path, tiny_teachers):
    settings = TrainSettings(task=str(write_task(tmp_path, tiny_teachers)), num_epochs=2, batch_size=64, alpha=0.5,
                             student_model="mobilenetv3", device="cpu", output_dir=str(tmp_path / "runs"),
                             teacher_epochs=1, run="t", teacher_cache="on", teacher_cache_views=2,
                             cache_dir=str(tmp_path / "cache"))
    return settings, train_student(settings)


def test_hooks_observe_each_epoch_skip_the_test_split_and_quieten_only_the_console(tmp_path, tiny_teachers,
                                                                                   tiny_students, capsys):
    settings = TrainSettings(task=str(write_task(tmp_path, tiny_teachers)), num_epochs=2, batch_size=64, alpha=0.5,
                             student_model="MobileNetV3", device="cpu", output_dir=str(tmp_path / "runs"),
                             cache_dir=str(tmp_path / "cache"))
    rows = []
    run_dir = train_student(settings, hooks=RunHooks(on_epoch=rows.append, score_test=False, quiet=True))
    assert [row["epoch"] for row in rows] == [1, 2]
    meta = load_weights(run_dir / "student.safetensors")[1]
    assert "val_acc" in meta and "test_acc" not in meta
    console = capsys.readouterr().err
    assert "epoch 1/2" not in console and "parameters" not in console  # no INFO lines, no progress bars
    log = (run_dir / "train.log").read_text()
    assert "epoch 2/2" in log and "parameters" in log  # the run's own log keeps everything


def test_training_writes_a_complete_run_folder(trained_run, tmp_path):
    settings, run_dir = trained_run
    assert run_dir == tmp_path / "runs" / "TaskT_MobileNetV3_T2.0_a0.5_t"
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "metrics.csv", "checkpoint_best.pt", "checkpoint_last.pt", "student.safetensors",
            "train.log", "tensorboard"} <= names
    assert any((run_dir / "tensorboard").iterdir())
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train_loss", "train_ce", "train_kd", "train_acc", "val_loss", "val_acc", "lr", "w_resnet"} <= set(rows[0])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["settings"]["alpha"] == 0.5 and config["task"]["name"] == "T"
    last = load_torch_checkpoint(run_dir / "checkpoint_last.pt")
    assert last["epoch"] == 2 and {"optimizer", "scheduler", "scaler"} <= set(last)
    state, meta = load_weights(run_dir / "student.safetensors")
    task = load_task_config(settings.task)
    student = build_student("MobileNetV3", task)
    student.load_state_dict(state)
    measured = evaluate(student, Batches(load_task_data(task).test, 256, "cpu"), Precision(torch.device("cpu"), None))
    assert meta["student"] == "MobileNetV3" and meta["test_acc"] == pytest.approx(measured["acc"], abs=1e-6)
    for teacher in ("resnet", "effnet"):
        _, teacher_meta = load_weights(tmp_path / "teachers" / f"{teacher}.safetensors")
        assert {"val_acc", "test_acc", "arch", "classes"} <= set(teacher_meta)
    log = (run_dir / "train.log").read_text()
    assert "teacher resnet" in log and f"test acc {teacher_meta['test_acc']:.4f}" in log
    assert "teacher-logit cache: 2 teachers x 2 views" in log
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2 * 2  # a file per teacher and view


def test_a_repeated_run_name_gets_a_new_folder(tmp_path):
    name = run_name("A", "ResNet18", 2.0, 0.1, "x")
    first, second = create_run_dir(tmp_path, name), create_run_dir(tmp_path, name)
    assert (first.name, second.name) == ("TaskA_ResNet18_T2.0_a0.1_x", "TaskA_ResNet18_T2.0_a0.1_x-2")


def test_unwritable_output_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot create output folder"):
        create_run_dir(blocker / "runs", "x")


def test_unavailable_device_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(UserError, match="not available"):
        select_device("cuda")


@pytest.mark.slow
def test_train_script_end_to_end(tmp_path, tiny_teachers):
    """The real command line on a config file: the run folder is the last line printed."""
    config = write_task(tmp_path, tiny_teachers)
    result = subprocess.run(
        [sys.executable, "train.py", "--config", str(config), "--num_epochs", "1", "--teacher_epochs", "1",
         "--student_model", "mobilenetv3", "--batch_size", "128", "--alpha", "0.6", "--output_dir",
         str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache"), "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert run_dir.name == "TaskT_MobileNetV3_T2.0_a0.6" and (run_dir / "student.safetensors").is_file()


def test_teachers_only_reports_each_teacher_and_their_ensemble_and_trains_no_student(tmp_path, tiny_teachers, capsys):
    import train

    config = write_task(tmp_path, tiny_teachers)
    train.main(["--config", str(config), "--teachers_only", "--device", "cpu", "--output_dir", str(tmp_path / "runs")])
    out, log = capsys.readouterr()
    assert Path(out.strip().splitlines()[-1]) == tmp_path / "teachers"
    for name in ("resnet", "effnet"):  # as their metadata records them, and as measured now
        assert f"teacher {name} " in log and f"teacher {name}: test acc" in log
    assert log.count("measured now") == 2 and "uniform ensemble (T = 2): test acc" in log
    assert not (tmp_path / "runs").exists()


def test_a_non_finite_loss_stops_with_advice_and_keeps_earlier_epochs():
    torch.manual_seed(0)
    model = create_model("resnet10t", 3, 1, [0.3], [0.3])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rows = []

    def poison(row):
        rows.append(row)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))

    with pytest.raises(UserError, match="NaN or infinite in epoch 2.*last good checkpoint.*lower --lr"):
        fit(model, Batches(synthetic_split(32, 0), 16, "cpu"), Batches(synthetic_split(16, 1), 16, "cpu"),
            optimizer=optimizer, scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 10), criterion=KD(2.0, 0.0),
            epochs=3, precision=Precision(torch.device("cpu"), None), on_epoch=poison)
    assert [r["epoch"] for r in rows] == [1]


class OverflowOnCalls(torch.nn.Module):
    """A model whose logits overflow float16 on the given forward calls (1-based), as a too-large
    activation does under fp16 autocast."""

    def __init__(self, model: torch.nn.Module, calls: set[int]):
        super().__init__()
        self.model, self.calls, self.count = model, calls, 0

    def forward(self, x):
        self.count += 1 if self.training else 0
        logits = self.model(x)
        return logits * 1e6 if self.count in self.calls else logits  # beyond float16's 65504


def test_an_fp16_step_that_overflows_is_skipped_by_the_scaler_and_training_goes_on():
    torch.manual_seed(0)
    model = OverflowOnCalls(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)), {2})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    updates = []
    optimizer.register_step_post_hook(lambda *_: updates.append(model.count))
    precision = Precision(torch.device("cpu"), torch.float16)
    scale = precision.scaler.get_scale()
    rows = fit(model, Batches(synthetic_split(48, 0), 16, "cpu"), Batches(synthetic_split(16, 1), 16, "cpu"),
               optimizer=optimizer, scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 10),
               criterion=KD(2.0, 0.0), epochs=2, precision=precision)
    assert updates == [1, 3, 4, 5, 6]  # the overflowing step 2 changed no weight
    assert precision.scaler.get_scale() < scale and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)


def test_a_loss_that_stays_non_finite_under_fp16_stops_the_run():
    model = OverflowOnCalls(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)), set(range(1, 100)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UserError, match="NaN or infinite in epoch 1"):
        fit(model, Batches(synthetic_split(48, 0), 16, "cpu"), Batches(synthetic_split(16, 1), 16, "cpu"),
            optimizer=optimizer, scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 10),
            criterion=KD(2.0, 0.0), epochs=2, precision=Precision(torch.device("cpu"), torch.float16))


def test_the_mixed_precision_path_trains_in_bfloat16_on_the_cpu():
    """CPU autocast runs the code path CUDA's bf16 takes: the student's layers compute in bfloat16, the
    loss is taken in float32, and the model learns."""
    torch.manual_seed(0)
    nn = torch.nn  # a small convnet: bf16 convolutions are slow on CPUs without bf16 units
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d((1, 3)),
                          nn.Flatten(), nn.Linear(48, 3))
    dtypes = set()
    model[-1].register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train, val = Batches(synthetic_split(96, 0), 16, "cpu", shuffle=True), Batches(synthetic_split(48, 1), 48, "cpu")
    rows = fit(model, train, val, optimizer=optimizer, scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 10),
               criterion=KD(2.0, 0.0), epochs=5, precision=Precision(torch.device("cpu"), torch.bfloat16))
    assert dtypes == {torch.bfloat16}
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and rows[-1]["val_acc"] > 0.6


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_autocasts_to_bf16_only_where_the_gpu_runs_it_natively(monkeypatch, native, expected):
    """Pre-Ampere GPUs report bf16 support through emulation, which is slower than fp16 with a scaler."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    with warnings.catch_warnings():  # the GradScaler warns that this machine has no CUDA
        warnings.simplefilter("ignore")
        precision = select_precision(torch.device("cuda"), amp=True)
    assert precision.dtype == expected
    assert select_precision(torch.device("cuda"), amp=False).dtype is None


def test_out_of_memory_suggests_a_smaller_batch(tmp_path, monkeypatch):
    import kd.training

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(kd.training, "fit", out_of_memory)
    settings = TrainSettings(task=str(write_task(tmp_path)), alpha=0.0, batch_size=512, device="cpu",
                             output_dir=str(tmp_path / "runs"))
    with pytest.raises(UserError, match="ran out of memory at --batch_size 512; try a smaller --batch_size"):
        train_student(settings)
    assert not any((tmp_path / "runs").iterdir())  # nothing half-written is left


@pytest.mark.parametrize("batch_size", [20, 61])
def test_task_a_trains_when_its_last_batch_would_hold_one_image(tmp_path, tiny_students, batch_size):
    """1,221 training images = 61 x 20 + 1: without dropping the last batch, BatchNorm fails on it."""
    settings = TrainSettings(task="A", num_epochs=1, batch_size=batch_size, alpha=0.0, student_model="MobileNetV3",
                             device="cpu", output_dir=str(tmp_path))
    run_dir = train_student(settings)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert len(rows) == 1 and float(rows[0]["train_loss"]) > 0


def test_teacher_weights_of_the_wrong_length_stop_before_any_training(tmp_path):
    settings = TrainSettings(task=str(write_task(tmp_path)), alpha=0.5, teacher_weighting="fixed",
                             teacher_weights=(1.0,), device="cpu", output_dir=str(tmp_path / "runs"))
    with pytest.raises(UserError, match="--teacher_weights needs 2 non-negative values"):
        train_student(settings)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "teachers").exists()


def test_the_weights_average_starts_at_the_model_and_ramps_its_decay_up_to_the_given_one():
    model = torch.nn.Linear(2, 1)
    average = WeightAverage(model, decay=0.5)
    expected = model.weight.detach().clone()
    for step in range(1, 6):
        with torch.no_grad():
            model.weight.add_(1.0)
        average.update()
        # step 1 copies the model; then 1 - (1 + (step - 1)) ** -0.75, at most 0.5: 0.41, 0.5, 0.5, 0.5
        decay = 0.0 if step == 1 else min(0.5, 1 - step ** -WeightAverage.WARMUP_POWER)
        expected = decay * expected + (1 - decay) * model.weight.detach()
        torch.testing.assert_close(average.model.weight, expected)
    assert average.steps == 5 and average.model.weight is not model.weight
    restored = WeightAverage(torch.nn.Linear(2, 1), decay=0.5)
    restored.load_state_dict(average.state_dict(), "test")
    assert restored.steps == 5 and torch.equal(restored.model.weight, average.model.weight)


class EpochBatches(list):
    """Training batches as fit takes them: the same batches every epoch."""

    def set_epoch(self, epoch: int) -> None:
        pass


def step_rates(start_epoch: int, warmup) -> list[float]:
    """The learning rate of every optimiser step of a 3-epoch run of 4 steps an epoch, cosine-scheduled."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1 - (start_epoch + epoch) / 3)
    rates = []
    optimizer.register_step_pre_hook(lambda opt, *_: rates.append(opt.param_groups[0]["lr"]))
    batches = EpochBatches([Batch(torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), torch.arange(2), None)] * 4)
    fit(model, batches, batches[:1], optimizer=optimizer, scheduler=scheduler, criterion=KD(2.0, 0.0), epochs=3,
        start_epoch=start_epoch, precision=Precision(torch.device("cpu"), None), progress=False, warmup=warmup)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)  # the schedule's own rate after the last epoch
    return rates


def test_the_warmup_raises_the_scheduled_rate_step_by_step_and_a_resumed_run_rises_alike():
    rates = step_rates(0, Warmup(6))
    scheduled = [0.3] * 4 + [0.2] * 4 + [0.1] * 4
    assert rates == pytest.approx([rate * min(1, (s + 1) / 6) for s, rate in enumerate(scheduled)])
    assert rates[:6] == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2 * 5 / 6, 0.2])
    assert step_rates(1, Warmup(6)) == pytest.approx(rates[4:])  # resumed after epoch 1: steps 4-11
    assert step_rates(0, None) == pytest.approx(scheduled)
