"""The streaming data path (data.storage stream): the same batches as the resident path, worker
processes, unreadable files, the on-disk teacher-logit cache, exact resume, and the storage choice.

Datasets are a few small PNG files per class written into tmp_path; models are tiny; no network.
"""

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

import kd.data
from kd.cache import DiskViews, TeacherLogitCache
from kd.config import AugmentSpec, load_task_config
from kd.data import Split, load_task_data
from kd.streaming import FileSplit
from kd.engine import Precision
from kd.errors import UserError
from kd.evaluation import evaluate_task
from kd.record import open_run_student
from kd.export import parity_images
from kd.models import create_model
from kd.speed import SpeedSettings
from kd.students import build_student
from kd.teachers import TeacherEnsemble, build_teacher
from kd.training import TrainSettings, train_student
from tests.conftest import (TINY_STUDENTS, assert_same_run, killed_after_first_checkpoint, run_in_process,
                            script_command, with_random_head)
from tests.test_custom_task import write_colour_folder, write_config

CPU = Precision(torch.device("cpu"), None)
AUGMENT = AugmentSpec(crop_padding=2, hflip=True)
PHOTO = AugmentSpec(crop_scale=(0.3, 1.0), hflip=True, policy="randaugment")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def folder_task(tmp_path):
    write_colour_folder(tmp_path / "data", per_class=10)
    return write_config(tmp_path, {})


def both_paths(config: Path, workers: int = 0):
    task = load_task_config(str(config))
    return load_task_data(task, storage="memory"), load_task_data(task, storage="stream", num_workers=workers)


def collect(batches) -> list:
    return [(b.x, b.y, b.index, b.view) for b in batches]


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b) > 1
    for one, other in zip(a, b):
        for x, y in zip(one, other):
            assert (x is None and y is None) or torch.equal(x, y)


@pytest.mark.parametrize("augment", [None, AUGMENT, PHOTO], ids=["plain", "augmented", "photo"])
def test_stream_gives_the_resident_paths_batches(folder_task, augment):
    memory, stream = both_paths(folder_task)
    assert isinstance(memory.train, Split) and isinstance(stream.train, FileSplit)
    for epoch in (0, 3):
        options = dict(shuffle=True, augment=augment, seed=5, drop_last=True)
        resident, streamed = memory.train.batches(7, "cpu", **options), stream.train.batches(7, "cpu", **options)
        resident.set_epoch(epoch)
        streamed.set_epoch(epoch)
        assert len(streamed) == len(resident) == 4  # 30 images, the incomplete last batch dropped
        assert_same_batches(collect(resident), collect(streamed))
    first = [b.index.tolist() for b in streamed]
    streamed.set_epoch(4)
    assert [b.index.tolist() for b in streamed] != first  # each epoch its own order


def test_worker_processes_change_nothing_and_pooled_views_replay(folder_task):
    memory, stream = both_paths(folder_task, workers=2)
    options = dict(shuffle=True, augment=AUGMENT, seed=1, views=3, pool_seed=7)
    resident, streamed = memory.train.batches(8, "cpu", **options), stream.train.batches(8, "cpu", **options)
    assert all(torch.equal(resident.pool.params(v), streamed.pool.params(v)) for v in range(3))
    assert_same_batches(collect(resident), collect(streamed))
    assert_same_batches(collect(resident.view_batches(2, 16)), collect(streamed.view_batches(2, 16)))
    assert_same_batches(collect(memory.val.batches(16, "cpu")), collect(stream.val.batches(16, "cpu")))


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_draws_nothing_from_the_global_generator(folder_task, workers):
    """mixup and the checkpoints' RNG states follow torch's global stream; a loader must not draw from it."""
    stream = load_task_data(load_task_config(str(folder_task)), storage="stream", num_workers=workers)
    batches = stream.train.batches(7, "cpu", shuffle=True, augment=AUGMENT, seed=1)
    state = torch.get_rng_state()
    for epoch in range(2):
        batches.set_epoch(epoch)
        list(batches)
        list(stream.train.batches(7, "cpu", views=2).view_batches(0, 7))
    assert torch.equal(torch.get_rng_state(), state)


def test_each_process_streams_only_its_share_of_every_global_batch(folder_task):
    _, stream = both_paths(folder_task)
    single = [b.index.tolist() for b in stream.train.batches(8, "cpu", shuffle=True, seed=4)]
    ranks = [[b.index.tolist() for b in stream.train.batches(4, "cpu", shuffle=True, seed=4, rank=r, world_size=2)]
             for r in range(2)]
    assert [len(b) for b in single] == [8, 8, 8, 6] and [len(b) for b in ranks[0]] == [4, 4, 4, 3]
    assert [a + b for a, b in zip(*ranks)] == single  # together, the processes read each batch once


def test_an_unreadable_image_found_mid_epoch_is_skipped_and_named(folder_task, kd_log):
    _, stream = both_paths(folder_task, workers=1)
    broken = stream.train.paths[4]
    broken.write_bytes(b"not an image at all")
    batches = collect(stream.train.batches(10, "cpu"))
    assert [len(b[1]) for b in batches] == [9, 10, 10] and 4 not in batches[0][2].tolist()
    assert sum(str(broken) in r.getMessage() for r in kd_log.records) == 1
    for path in stream.train.paths[:10]:
        path.write_bytes(b"")
    with pytest.raises(UserError, match="every image of a batch is unreadable"):
        collect(stream.train.batches(10, "cpu"))


def test_storage_auto_streams_what_does_not_fit_and_stream_needs_files(folder_task, monkeypatch, tmp_path):
    task = load_task_config(str(folder_task))
    assert isinstance(load_task_data(task).train, Split)
    monkeypatch.setattr(kd.data, "RESIDENT_BUDGET_BYTES", 1000)
    streamed = load_task_data(task)
    assert isinstance(streamed.train, FileSplit)
    assert streamed.storage.startswith("streamed from disk (data.storage auto: 90 images take 0.00 GB decoded, over")
    with pytest.raises(UserError, match="data.storage stream reads image files; task A's source digits"):
        load_task_data(load_task_config("A"), storage="stream")
    with pytest.raises(UserError, match="data.storage must be one of auto, memory, stream, got 'disk'"):
        load_task_config(str(write_config(tmp_path, {"storage": "disk"})))


def test_train_py_takes_the_storage_and_worker_flags(capsys):
    from train import get_args_parser

    args = get_args_parser().parse_args(["--data_storage", "stream", "--num_workers", "0"])
    assert (args.data_storage, args.num_workers) == ("stream", 0)
    for bad in (["--data_storage", "disk"], ["--num_workers", "-1"]):
        with pytest.raises(SystemExit) as stop:
            get_args_parser().parse_args(bad)
        assert stop.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def teachers() -> TeacherEnsemble:
    torch.manual_seed(0)
    return TeacherEnsemble({"r": with_random_head(create_model("resnet10t", 3, 3, [0.5] * 3, [0.25] * 3)),
                            "m": with_random_head(create_model("mobilenetv3_small_050", 3, 3, [0.5] * 3, [0.25] * 3))})


def test_disk_cache_replays_each_views_teacher_logits(folder_task, tmp_path):
    ensemble, (memory, stream) = teachers(), both_paths(folder_task, workers=1)
    identities = ["r", "m"]  # any strings: the key hashes them
    streamed = stream.train.batches(8, "cpu", shuffle=True, augment=AUGMENT, views=2)
    cache = TeacherLogitCache(list(ensemble.models), identities, streamed, CPU, tmp_path / "cache")
    paths = cache.paths(0) + cache.paths(1)
    assert paths[0].suffix == ".npy"
    cache.fill(range(2))
    assert isinstance(cache.store, DiskViews) and all(p.is_file() for p in paths)
    assert np.load(paths[0], mmap_mode="r").shape == (30, 3)
    for epoch in range(2):
        streamed.set_epoch(epoch)
        for batch in streamed:
            assert torch.allclose(cache(batch).float(), ensemble(batch.x), rtol=2e-3, atol=2e-3)

    time.sleep(0.01)
    stream.train.paths[0].touch()  # the folder changed after the cache was built: a later run gets another key
    later = dataclasses.replace(stream.train).batches(8, "cpu", shuffle=True, augment=AUGMENT, views=2)
    assert set(TeacherLogitCache(list(ensemble.models), identities, later, CPU, tmp_path / "cache").paths(0)
               ).isdisjoint(paths)
    resident = memory.train.batches(8, "cpu", shuffle=True, augment=AUGMENT, views=2)
    assert TeacherLogitCache(list(ensemble.models), identities, resident, CPU, tmp_path / "cache").paths(0)[0].suffix \
        == ".safetensors"


def stream_settings(config: Path, tmp_path: Path, **changes) -> TrainSettings:
    values = dict(task=str(config), num_epochs=2, batch_size=8, lr=0.01, alpha=0.5, student_model="MobileNetV3",
                  device="cpu", output_dir=str(tmp_path / "runs"), teacher_epochs=1, teacher_cache="on",
                  teacher_cache_views=2, cache_dir=str(tmp_path / "cache"), data_storage="stream", num_workers=1)
    return TrainSettings(**{**values, **changes})


def test_a_cache_too_large_for_the_disk_budget_is_refused_with_its_size(folder_task, tmp_path, monkeypatch):
    monkeypatch.setattr("kd.cache.DISK_BUDGET_BYTES", 100)
    with pytest.raises(UserError, match=r"the teacher-logit cache would take 0\.0 GB on disk .* budget 0 GB"):
        train_student(stream_settings(folder_task, tmp_path))
    assert not list((tmp_path / "runs").glob("*"))
    run = train_student(stream_settings(folder_task, tmp_path, teacher_cache="auto", num_epochs=1))  # auto: online
    assert "teacher-logit cache off: 0.0 GB on disk" in (run / "train.log").read_text()
    assert not list((tmp_path / "cache").glob("*")) and (run / "checkpoint_last.pt").is_file()


def test_mixup_on_a_streamed_folder_runs_the_teachers_online(folder_task, tmp_path, tiny_students):
    """A streamed pool does not blend (a blend would decode two files per image), so there is no cached blend."""
    with pytest.raises(UserError, match="--mixup on a streamed image folder: its batches are blended as they come"):
        train_student(stream_settings(folder_task, tmp_path, mixup=0.4))
    assert not list((tmp_path / "runs").glob("*"))
    run = train_student(stream_settings(folder_task, tmp_path, mixup=0.4, teacher_cache="auto", num_epochs=1))
    assert "the teachers run online on the blended images of --mixup" in (run / "train.log").read_text()
    assert not list((tmp_path / "cache").glob("*")) and (run / "checkpoint_last.pt").is_file()


def test_a_run_refuses_to_resume_on_changed_data(folder_task, tmp_path):
    run = train_student(stream_settings(folder_task, tmp_path, num_epochs=1, alpha=0.0))
    write_colour_folder(folder_task.parent / "extra")
    (folder_task.parent / "extra" / "train" / "red" / "000.png").rename(
        folder_task.parent / "data" / "train" / "red" / "new.png")
    with pytest.raises(UserError, match="its training data changed since the run started"):
        train_student(stream_settings(folder_task, tmp_path, num_epochs=2, alpha=0.0, resume=str(run)))


def test_models_keep_timms_architecture_from_64_pixels():
    task = load_task_config("B")
    large = dataclasses.replace(task, data=dataclasses.replace(task.data, input_size=64))
    assert build_student("MobileNetV3", task).backbone.conv_stem.stride == (1, 1)  # 28 px: halved
    assert build_student("MobileNetV3", large).backbone.conv_stem.stride == (2, 2)  # 64 px: as timm builds it
    assert build_teacher(task.teachers[0], task).backbone.stem.conv1.conv.stride == (1, 1)
    assert build_teacher(task.teachers[0], large).backbone.stem.conv1.conv.stride == (2, 2)
    fixed = dataclasses.replace(large, teachers=(dataclasses.replace(task.teachers[0], stride_reduction=1),))
    assert build_teacher(fixed.teachers[0], fixed).backbone.stem.conv1.conv.stride == (1, 1)  # a config's choice stands


def train_args(config: Path, tmp_path: Path, output: str, *extra: str) -> list[str]:
    return ["--config", str(config), "--data_storage", "stream", "--num_workers", "1", "--num_epochs", "4",
            "--batch_size", "8", "--lr", "0.01", "--alpha", "0.5", "--student_model", "MobileNetV3", "--device", "cpu",
            "--teacher_epochs", "1", "--teacher_cache", "on", "--teacher_cache_views", "2",
            "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / output), *extra]


@pytest.fixture
def photo_task(folder_task, tmp_path):
    """The colour folder as a photo task: random-resized crops, a flip and TrivialAugmentWide in training,
    a centre crop of 14 from 16 px at evaluation; and the local weights file of a pretrained student."""
    raw = yaml.safe_load(folder_task.read_text())
    raw["data"]["input_size"] = 14
    raw["augment"] = {"crop_scale": [0.4, 1.0], "hflip": True, "policy": "trivialaugment", "eval_crop": 0.875}
    folder_task.write_text(yaml.safe_dump(raw))
    torch.manual_seed(0)
    imagenet = timm.create_model(TINY_STUDENTS["MobileNetV3"], num_classes=1000)  # as tiny_students builds the student
    save_file(imagenet.state_dict(), tmp_path / "imagenet.safetensors")
    return folder_task


@pytest.mark.slow
def test_a_streamed_photo_task_with_a_pretrained_student_resumes_exactly_and_is_judged_on_images_read_its_way(
        photo_task, tmp_path, tiny_students, capsys):
    folder_task = photo_task
    pretrained = ("--pretrained", str(tmp_path / "imagenet.safetensors"))
    # only the run to kill is a process of its own (start-up costs seconds), with this process's threads
    reference = run_in_process(train_args(folder_task, tmp_path, "ref", *pretrained), capsys)
    log = (reference / "train.log").read_text()
    assert "data: streamed from disk (data.storage stream)" in log and "MB on disk" in log
    assert list((tmp_path / "cache").glob("*.npy"))

    assert "starts from the pretrained weights in" in log
    killed = script_command("train.py", train_args(folder_task, tmp_path, "killed", *pretrained), tiny=True)
    killed_after_first_checkpoint(killed, tmp_path / "killed")
    resumed = run_in_process(train_args(folder_task, tmp_path, "killed", "--resume", "auto"), capsys)
    assert_same_run(reference, resumed)

    result = evaluate_task(str(folder_task), run_dir=resumed, device="cpu", output_dir=tmp_path / "eval",
                           speed=SpeedSettings(warmup=0, runs=1, throughput_batch=4))
    assert result["provenance"]["test_size"] == 30 and "streamed" in result["provenance"]["data_storage"]
    assert (tmp_path / "eval" / "sample_predictions.png").is_file()
    # an export checks its files on the test images read the run's way (its record says stream), as
    # evaluation reads them (the whole export, on a real student: test_custom_task.py)
    _, record, _ = open_run_student(resumed)
    resident = dataclasses.replace(record, body={**record.body, "settings": {**record.body["settings"],
                                                                             "data_storage": "memory"}})
    assert torch.equal(parity_images(record), parity_images(resident))
    assert parity_images(record).shape[-2:] == (14, 14)  # centre-cropped from the decoded 16 px
    assert yaml.safe_load((resumed / "config.yaml").read_text())["settings"]["data_storage"] == "stream"


@pytest.mark.slow
def test_a_streamed_mixup_run_with_workers_resumes_bit_for_bit_after_kill(folder_task, tmp_path, tiny_students, capsys):
    """mixup draws from torch's global stream, which the checkpoints save; the loaders' workers must not
    move it (they start once per process, so only a resumed run would)."""
    args = ["--mixup", "0.4", "--teacher_cache", "off", "--num_workers", "2"]
    reference = run_in_process(train_args(folder_task, tmp_path, "ref", *args), capsys)
    command = script_command("train.py", train_args(folder_task, tmp_path, "killed", *args), tiny=True)
    killed_after_first_checkpoint(command, tmp_path / "killed")
    resumed = run_in_process(train_args(folder_task, tmp_path, "killed", *args, "--resume", "auto"), capsys)
    assert_same_run(reference, resumed)
