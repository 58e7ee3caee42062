"""Bring your own task and ship the student: image-folder data, teachers from plain timm weights or
timm's pretrained ones, predict.py, export.py and evaluation from a config file.

Datasets are a few 12x12 PNG files per class written into tmp_path; models are tiny; no network.
"""

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from kd.checkpoint import load_weights, save_weights
from kd.config import load_task_config
from kd.data import Split, TaskData, load_task_data
from kd.images import read_image
from kd.distributed import World
from kd.engine import Precision
from kd.errors import UserError
from kd.evaluation_cli import main_for_task
from kd.export import PARITY_RTOL, compare_outputs, export_student
from kd.models import create_model, halve_first_downsampling
from kd.predict import main as predict_main
from kd.predict import predict_images
from kd.students import build_student
from kd.teachers import load_teacher
from kd.training import TrainSettings, ensure_teachers, train_student

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 230)}
GREYS = {"dark": 30, "mid": 128, "light": 230}


def write_images(folder: Path, value, count: int, size=(12, 12), mode="RGB", seed=0) -> None:
    """`count` PNG files of one class: its colour (or grey level) plus noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    for i in range(count):
        pixels = np.clip(np.asarray(value) + rng.integers(-25, 26, shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode).save(folder / f"{i:03d}.png")


def write_colour_folder(root: Path, splits=("train", "val", "test"), per_class=6) -> Path:
    for s, split in enumerate(splits):
        for c, (name, colour) in enumerate(COLOURS.items()):
            write_images(root / split / name, colour, per_class, seed=10 * s + c)
    return root


def write_config(folder: Path, data: dict, classes=None, teachers=None, channels=3) -> Path:
    """A task config in `folder`, with relative paths (resolved against that folder)."""
    raw = {"name": "Colours", "description": "synthetic colour patches",
           "data": {"source": "image_folder", "root": "data", "input_size": 12, "channels": channels, **data},
           "normalization": {"mean": [0.5] * channels, "std": [0.25] * channels},
           "augment": {"crop_padding": 1, "hflip": True},
           "teachers": teachers or [
               {"name": "resnet", "arch": "test_resnet", "checkpoint": "teachers/resnet.safetensors",
                "recipe": {"epochs": 1, "batch_size": 8}},
               {"name": "effnet", "arch": "test_efficientnet", "checkpoint": "teachers/effnet.safetensors",
                "recipe": {"epochs": 1, "batch_size": 8}}]}
    if classes is not None:
        raw["classes"] = classes
    path = folder / "task.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread, after conftest's two: where the cores are busy, OpenMP's barriers make a second
    thread many times slower (the end-to-end test went from ~20 s to ~2 min)."""
    torch.set_num_threads(1)


@pytest.fixture
def colour_task(tmp_path):
    write_colour_folder(tmp_path / "data")
    return write_config(tmp_path, {}, classes=["green", "red", "blue"])  # not alphabetical: the list decides


# --- the image-folder source -------------------------------------------------------------------------

def test_image_folder_loads_every_split_in_the_configs_class_order(colour_task):
    task = load_task_config(str(colour_task))
    assert task.data_root == colour_task.parent / "data"
    data = load_task_data(task)
    assert [len(data.train), len(data.val), len(data.test)] == [18, 18, 18]
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (3, 12, 12)
    red = data.test.images[data.test.labels == task.classes.index("red")].float()
    assert len(red) == 6 and (red[:, 0].mean() > 180) and (red[:, 1].mean() < 80)  # index 1 is red's
    assert "val" in data.source


def test_val_is_carved_from_train_with_a_fixed_seed_when_absent(tmp_path):
    write_colour_folder(tmp_path / "data", splits=("train", "test"), per_class=10)
    task = load_task_config(str(write_config(tmp_path, {"val_size": 0.2, "split_seed": 3})))
    first, again = load_task_data(task), load_task_data(task)
    assert (len(first.train), len(first.val), len(first.test)) == (24, 6, 30)
    assert torch.equal(first.val.images, again.val.images) and torch.equal(first.val.labels, again.val.labels)
    assert sorted(first.val.labels.tolist()) == [0, 0, 1, 1, 2, 2]  # stratified
    assert task.classes == ("blue", "green", "red")  # no list: the train/ folders, sorted


def test_grayscale_task_converts_and_resizes_any_image(tmp_path):
    for split in ("train", "val", "test"):
        for name, grey in GREYS.items():
            write_images(tmp_path / "data" / split / name, grey, 3, size=(20, 14), mode="L")
    write_images(tmp_path / "data" / "train" / "dark", COLOURS["red"], 1, size=(9, 9))  # an RGB file among them
    task = load_task_config(str(write_config(tmp_path, {"input_size": 8}, channels=1)))
    data = load_task_data(task)
    assert data.train.images.shape == (9, 1, 8, 8) and task.classes == ("dark", "light", "mid")
    means = [data.test.images[data.test.labels == i].float().mean().item() for i in range(3)]
    assert means[0] < 60 < means[2] < 160 < means[1]
    red_as_grey = read_image(tmp_path / "data" / "train" / "dark" / "000.png", 1, 8)
    assert red_as_grey.shape == (1, 8, 8) and 40 < red_as_grey.mean() < 110  # luminance of red


def test_corrupt_image_is_named(colour_task):
    bad = colour_task.parent / "data" / "train" / "red" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a PNG")
    with pytest.raises(UserError, match=r"cannot read image .*broken\.png"):
        load_task_data(load_task_config(str(colour_task)))


def test_class_missing_from_a_split_or_not_listed_is_named(colour_task):
    data = colour_task.parent / "data"
    (data / "train" / "purple").mkdir()
    with pytest.raises(UserError, match=r"train: folder\(s\) purple are not among the task's classes"):
        load_task_data(load_task_config(str(colour_task)))
    (data / "train" / "purple").rmdir()
    for image in (data / "test" / "blue").iterdir():
        image.unlink()
    with pytest.raises(UserError, match=r"test has no images of class\(es\) blue"):
        load_task_data(load_task_config(str(colour_task)))
    (data / "test" / "blue").rmdir()
    with pytest.raises(UserError, match=r"test has no images of class\(es\) blue"):
        load_task_data(load_task_config(str(colour_task)))


def test_an_empty_split_is_an_error(colour_task):
    for folder in (colour_task.parent / "data" / "val").iterdir():
        for image in folder.iterdir():
            image.unlink()
    with pytest.raises(UserError, match=r"val has no images of class\(es\) green, red, blue"):
        load_task_data(load_task_config(str(colour_task)))


def test_config_checks_the_image_folder_keys(tmp_path):
    write_colour_folder(tmp_path / "data", splits=("train",))
    bad = {"source": "image_folder", "root": None}
    with pytest.raises(UserError, match="image_folder needs data.root"):
        load_task_config(str(write_config(tmp_path, bad)))
    with pytest.raises(UserError, match="one of digits, fashion_mnist, image_folder, got 'pngs'"):
        load_task_config(str(write_config(tmp_path, {"source": "pngs"})))
    with pytest.raises(UserError, match="channels must be 1 .* or 3"):
        load_task_config(str(write_config(tmp_path, {}, channels=2)))
    with pytest.raises(UserError, match=r"nowhere[/\\]train is not a folder"):
        load_task_config(str(write_config(tmp_path, {"root": "nowhere"})))
    with pytest.raises(UserError, match="pretrained must be true, false or the path"):
        load_task_config(str(write_config(tmp_path, {}, teachers=[
            {"name": "r", "arch": "resnet10t", "checkpoint": "r.pt", "pretrained": 3}])))


def test_template_config_parses_and_saved_configs_keep_absolute_paths(tmp_path):
    template = load_task_config(str(Path(__file__).resolve().parent.parent / "configs" / "task_template.yaml"))
    assert template.data.source == "image_folder" and template.teachers[1].pretrained is True
    assert template.augment.policy == "trivialaugment" and template.decode_size == 146  # a photo task
    write_colour_folder(tmp_path / "data", splits=("train",))
    task = load_task_config(str(write_config(tmp_path, {})))
    saved = task.to_dict()
    assert saved["data"]["root"] == str(tmp_path / "data")
    assert saved["teachers"][0]["checkpoint"] == str(tmp_path / "teachers" / "resnet.safetensors")
    (tmp_path / "elsewhere").mkdir()
    copy_path = tmp_path / "elsewhere" / "config.yaml"
    copy_path.write_text(yaml.safe_dump(saved))
    again = load_task_config(str(copy_path))
    assert again.data_root == task.data_root and again.classes == task.classes


# --- teachers from plain timm weights or timm's pretrained ones ---------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_plain_timm_state_dict_teacher_loads_with_the_config_normalisation(tmp_path, suffix):
    write_colour_folder(tmp_path / "data", splits=("train",))
    torch.manual_seed(0)
    plain = timm.create_model("resnet10t", num_classes=3, in_chans=3).eval()
    checkpoint = tmp_path / f"mine{suffix}"
    state = {k: v.contiguous() for k, v in plain.state_dict().items()}
    save_file(state, checkpoint) if suffix == ".safetensors" else torch.save(state, checkpoint)
    task = load_task_config(str(write_config(tmp_path, {}, teachers=[
        {"name": "mine", "arch": "resnet10t", "checkpoint": checkpoint.name, "mean": [0.4, 0.5, 0.6],
         "std": [0.2, 0.3, 0.4]}])))
    teacher, meta = load_teacher(task.teachers[0], task)
    x = torch.rand(2, 3, 12, 12)
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(teacher(x), plain((x - mean) / std), atol=1e-5)  # timm's model, unmodified
    assert meta == {}


def test_a_plain_timm_state_dict_for_other_classes_is_refused(tmp_path):
    write_colour_folder(tmp_path / "data", splits=("train",))
    save_file(timm.create_model("resnet10t", num_classes=1000).state_dict(), tmp_path / "imagenet.safetensors")
    task = load_task_config(str(write_config(tmp_path, {}, teachers=[
        {"name": "imagenet", "arch": "resnet10t", "checkpoint": "imagenet.safetensors"}])))
    with pytest.raises(UserError, match=r"teacher imagenet .*fc\.\w+ has shape \(1000,.*expects \(3,.*class count"):
        load_teacher(task.teachers[0], task)


def test_pretrained_offline_fails_with_one_clear_line(tmp_path, monkeypatch):
    import timm.models._builder as builder

    attempts = []

    def offline(*args, **kwargs):
        attempts.append(args)
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(builder, "load_state_dict_from_hf", offline)
    monkeypatch.setattr(builder, "load_state_dict_from_url", offline)
    write_colour_folder(tmp_path / "data", splits=("train",))
    task = load_task_config(str(write_config(tmp_path, {}, teachers=[
        {"name": "r", "arch": "resnet10t", "checkpoint": "teachers/r.safetensors", "pretrained": True}])))
    split = Split(torch.zeros(3, 3, 12, 12, dtype=torch.uint8), torch.arange(3))
    with pytest.raises(UserError) as err:
        ensure_teachers(task, TaskData(split, split, split, "synthetic"), Precision(torch.device("cpu"), None), World())
    message = str(err.value)
    assert attempts and "\n" not in message
    assert message.startswith("could not fetch timm's pretrained weights for resnet10t (Temporary failure")
    assert "--pretrained FILE for a student" in message and "`pretrained: FILE` for a teacher" in message
    assert "`checkpoint:`" in message
    assert not any(p.is_file() for p in (tmp_path / "teachers").rglob("*"))  # nothing half-written


def test_pretrained_weights_from_a_local_file_start_the_teacher(tmp_path):
    torch.manual_seed(1)
    imagenet = timm.create_model("resnet10t", num_classes=1000)
    save_file(imagenet.state_dict(), tmp_path / "resnet10t_in1k.safetensors")
    model = create_model("resnet10t", 3, 3, [0.5] * 3, [0.25] * 3, pretrained=tmp_path / "resnet10t_in1k.safetensors")
    assert torch.equal(model.backbone.layer4[0].conv1.weight, imagenet.layer4[0].conv1.weight)
    assert model.backbone.fc.out_features == 3  # a new classifier for the task
    with pytest.raises(UserError, match=r"cannot load pretrained weights for resnet10t from .*missing\.pth"):
        create_model("resnet10t", 3, 3, [0.5] * 3, [0.25] * 3, pretrained=tmp_path / "missing.pth")


def test_halved_patchify_stem_keeps_what_the_weights_compute():
    plain = timm.create_model("convnext_atto", num_classes=3).eval()
    halved = halve_first_downsampling(copy.deepcopy(plain)).eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():  # the halved stem on x == the original stem on x upscaled 2x
        assert torch.allclose(halved.stem(x), plain.stem(F.interpolate(x, scale_factor=2.0)), atol=1e-5)


# --- predict.py and export.py on a run folder --------------------------------------------------------

def fake_run(tmp_path: Path, config: Path) -> Path:
    """A run folder as train.py leaves it, with an untrained student."""
    task = load_task_config(str(config))
    run = tmp_path / "runs" / "TaskColours_MobileNetV3_T2.0_a0.5"
    torch.manual_seed(0)
    save_weights(build_student("MobileNetV3", task), run / "student.safetensors",
                 {"classes": list(task.classes), "epoch": 1, "val_acc": 0.3})
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"settings": {"task": str(config), "student_model": "MobileNetV3", "temperature": 2.0, "alpha": 0.5,
                      "teacher_weighting": "uniform", "data_dir": None}, "task": task.to_dict()}))
    return run


def test_predict_prepares_images_like_the_task_and_ranks_classes(colour_task, tmp_path, capsys):
    run = fake_run(tmp_path, colour_task)
    image = colour_task.parent / "data" / "test" / "red" / "000.png"
    predictions = predict_images([image, colour_task.parent / "data" / "val"], run_dir=run, topk=2)
    assert len(predictions) == 1 + 18 and predictions[0].path == image
    names, probs = zip(*predictions[0].top)
    assert len(set(names)) == 2 and probs[0] >= probs[1]
    student = build_student("MobileNetV3", load_task_config(str(colour_task)))
    student.load_state_dict(load_file(run / "student.safetensors"))
    x = torch.from_numpy(np.array(Image.open(image).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        expected = student.eval()(x).softmax(dim=1)[0]
    assert probs[0] == pytest.approx(expected.max().item(), abs=1e-5)
    assert names[0] == ("green", "red", "blue")[expected.argmax().item()]

    out = tmp_path / "predictions.csv"
    predict_main(["--checkpoint", str(run / "student.safetensors"), "--topk", "3", "--csv", str(out), str(image)])
    rows = list(csv.DictReader(out.open()))
    assert capsys.readouterr().out.strip() == f"wrote {out}: the top 3 classes of 1 image(s)"
    assert rows[0]["path"] == str(image) and rows[0]["class_1"] == names[0]
    assert sum(float(rows[0][f"probability_{k}"]) for k in (1, 2, 3)) == pytest.approx(1.0, abs=1e-4)


def test_predict_bad_inputs_end_with_one_line(colour_task, tmp_path, capsys):
    run = fake_run(tmp_path, colour_task)
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a jpeg")
    for inputs, message in [([str(tmp_path / "nope.png")], "error: no such file or folder: "),
                            ([str(broken)], "error: cannot read image "),
                            ([str(tmp_path / "runs")], "error: ")]:
        with pytest.raises(SystemExit) as exit_info:
            predict_main(["--run_dir", str(run), *inputs])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and err.startswith(message) and err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        predict_main([str(broken)])
    assert capsys.readouterr().err.startswith("error: pass a run folder")


def test_parity_check_rejects_an_export_that_differs_and_scales_with_the_logits():
    model = torch.nn.Linear(4, 3)
    torch.nn.init.constant_(model.weight, 0.1)  # logits below 0.5 on [0, 1) inputs
    images = torch.rand(5, 4)
    runtimes = {"PyTorch": model, "close": lambda x: model(x) + PARITY_RTOL / 2,
                "off": lambda x: model(x) + 10 * PARITY_RTOL}
    with pytest.raises(UserError, match=r"differ from PyTorch on 5 test images by up to off 2\.00e-04.*nothing"):
        compare_outputs(runtimes, images)
    del runtimes["off"]
    tolerance, diffs, agreement = compare_outputs(runtimes, images)
    assert tolerance == PARITY_RTOL  # logits below 1: the floor
    assert diffs["close"] == pytest.approx(PARITY_RTOL / 2, rel=1e-2) and agreement == {"close": 1.0}
    large = {"PyTorch": lambda x: 100 * model(x) + 50, "rounded": lambda x: 100 * model(x) + 50 + 5e-4}
    tolerance, diffs, _ = compare_outputs(large, images)  # 5e-4 is fp32 noise on logits near 50
    assert tolerance > 50 * PARITY_RTOL and diffs["rounded"] == pytest.approx(5e-4, rel=0.1)


# --- end to end: train, evaluate, predict, export -------------------------------------------------------

def test_custom_task_end_to_end(colour_task, tmp_path, capsys):
    run = train_student(TrainSettings(task=str(colour_task), num_epochs=2, batch_size=8, lr=0.01, alpha=0.5,
                                      student_model="MobileNetV3", device="cpu", output_dir=str(tmp_path / "runs"),
                                      teacher_epochs=1, teacher_cache="off"))
    assert (colour_task.parent / "teachers" / "effnet.safetensors").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())["task"]
    assert saved["classes"] == ["green", "red", "blue"]

    main_for_task(None, ["--config", str(colour_task), "--runs_root", str(tmp_path / "runs"),
                         "--output_dir", str(tmp_path / "eval"), "--device", "cpu"])
    assert "task Colours:" in capsys.readouterr().out
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["provenance"]["test_size"] == 18 and result["classes"] == ["green", "red", "blue"]
    # the colours are learnable and the class order is the same in every split: a teacher gets them all
    # right; the student evaluated is the network the run trained, at the test accuracy the run recorded
    assert max(t["accuracy"] for t in result["teachers"].values()) >= 0.9
    assert result["student"]["accuracy"] == pytest.approx(load_weights(run / "student.safetensors")[1]["test_acc"])

    out = tmp_path / "p.csv"
    predict_main(["--run_dir", str(run), "--csv", str(out), str(colour_task.parent / "data" / "test")])
    assert len(list(csv.DictReader(out.open()))) == 18

    exported = export_student(run)
    assert exported.output_dir == run / "export"
    assert {p.name for p in exported.output_dir.iterdir()} == {"student.onnx", "student.torchscript.pt"}
    assert exported.parity_images == 18 and max(exported.max_abs_diff.values()) <= exported.tolerance
    assert set(exported.latency_ms) == {"PyTorch", "TorchScript", "ONNX Runtime"}

    import onnxruntime as ort

    session = ort.InferenceSession(str(run / "export" / "student.onnx"), providers=["CPUExecutionProvider"])
    images = load_task_data(load_task_config(str(colour_task))).test.images[:5].float() / 255
    for batch in (images[:1], images):  # the batch axis is dynamic
        logits = session.run(None, {"images": batch.numpy()})[0]
        assert logits.shape == (len(batch), 3)
