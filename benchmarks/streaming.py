"""Streaming data path throughput: does decoding image files keep up with training?

Writes (once) an image folder of --images JPEG files at --size px: 10 classes of random scenes
(a colour gradient and a few shapes whose hue depends on the class), 80% train/, 10% val/, 10% test/.
Then measures, with 0, 1 and 2 DataLoader worker processes (--workers):

  (a) the streaming data path alone (read, decode, resize, augment (--augment), batch);
  (b) a labels-only student step fed by it;
  (c) a KD step fed by it, replaying teacher logits from the on-disk cache (one memory-mapped .npy per view,
      --views views; their values are random: only the cost of reading them matters here);

and (b), (c) fed from decoded images held in memory, the speed the streaming path should reach.
Each figure is images/s over --batches batches after 2 warm-up batches (worker start-up excluded).

    python benchmarks/streaming.py                  # 20,000 JPEGs at 96 px; about 10 minutes on 2 cores
    python benchmarks/streaming.py --images 2000    # a quick look
    python benchmarks/streaming.py --augment photo  # with the photo augmentation
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw

from kd.cache import DiskViews
from kd.config import load_task_config
from kd.data import Split, load_task_data
from kd.engine import Precision, train_one_epoch
from kd.distillers.kd import KD
from kd.students import build_student

CLASSES = 10
WARMUP = 2


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", default="data/stream_bench", help="where the image folder is written (once)")
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--size", type=int, default=96, help="image and input size in pixels")
    p.add_argument("--student_model", default="MobileNetV3")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--augment", choices=["pad", "photo"], default="pad",
                   help="the training augmentation the workers apply (see augment_block)")
    return p


def write_folder(root: Path, count: int, size: int) -> None:
    """count JPEG files of CLASSES classes in root/{train,val,test}/<class>/, unless already there."""
    done = root / "done"
    if done.is_file() and done.read_text() == f"{count} {size}":
        return
    rng = np.random.default_rng(0)
    for i in range(count):
        label, turn = i % CLASSES, (i // CLASSES) % 10
        split = "train" if turn < 8 else "val" if turn == 8 else "test"
        folder = root / split / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        scene(rng, label, size).save(folder / f"{i:06d}.jpg", quality=90)
    done.write_text(f"{count} {size}")


def scene(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    """A vertical colour gradient with three shapes, their hue set by the class, their places at random."""
    hue = np.array([np.cos(label), np.cos(label + 2.1), np.cos(label + 4.2)]) * 90 + 128
    ramp = np.linspace(0.4, 1.0, size)[:, None, None] * rng.uniform(60, 200, 3)
    image = Image.fromarray(np.broadcast_to(ramp, (size, size, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.integers(0, size - 8, 2)
        w, h = rng.integers(8, size // 2, 2)
        colour = tuple(int(c) for c in np.clip(hue + rng.normal(0, 20, 3), 0, 255))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=colour)
    return image


def augment_block(kind: str, size: int) -> dict:
    """--augment pad: the digits' crop of the padded image and a flip; photo: the photo augmentation of
    configs/task_template.yaml (random-resized crop, flip, TrivialAugmentWide, a centre crop at evaluation)."""
    if kind == "pad":
        return {"crop_padding": size // 16, "hflip": True}
    return {"crop_scale": [0.25, 1.0], "hflip": True, "policy": "trivialaugment"}


def write_config(root: Path, size: int, augment: str) -> Path:
    config = {"name": "StreamBench", "description": "generated JPEG scenes",
              "data": {"source": "image_folder", "root": ".", "input_size": size, "channels": 3},
              "classes": [f"class{c}" for c in range(CLASSES)],
              "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3},
              "augment": augment_block(augment, size),
              "teachers": [{"name": "unused", "arch": "resnet18", "checkpoint": "unused.safetensors"}]}
    path = root / "task.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def rate(batches, work=None, count: int = 30) -> float:
    """Images/s over `count` batches after WARMUP batches; `work(batch)` is the step, or only a touch."""
    iterator = iter(batches)
    try:
        for batch in itertools.islice(iterator, WARMUP):
            (work or touch)(batch)
        images, started = 0, time.perf_counter()
        for batch in itertools.islice(iterator, count):
            (work or touch)(batch)
            images += len(batch.y)
        return images / (time.perf_counter() - started)
    finally:
        iterator.close()  # stops the loader's workers now, before the next loader forks its own


def touch(batch) -> None:
    batch.x.sum()


def student_step(task, student_model: str, teachers=None):
    """One training step of a fresh student (channels-last, Adam), labels only or KD from `teachers`."""
    torch.manual_seed(0)
    student = build_student(student_model, task).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    criterion, precision = KD(2.0, 0.5 if teachers else 0.0), Precision(torch.device("cpu"), None)
    return lambda batch: train_one_epoch(student, [batch], optimizer, criterion, precision, teachers, progress=False)


def random_cache(folder: Path, views: int, images: int) -> DiskViews:
    """Random float16 logits, one (N, C) file per view, read as two teachers' worth."""
    store = DiskViews(teachers=2)
    for view in range(views):
        path = folder / f"logits_{view}.npy"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(images, CLASSES))
        array[:] = np.random.default_rng(view).normal(size=array.shape).astype(np.float16)
        array.flush()
        del array
        store.load(view, [path, path])
    return store


def main(args) -> None:
    root = Path(args.folder)
    started = time.perf_counter()
    write_folder(root, args.images, args.size)
    print(f"{args.images} JPEG files at {args.size} px in {root} ({time.perf_counter() - started:.0f}s to write "
          f"or find), batch {args.batch_size}, student {args.student_model}, CPU, {torch.get_num_threads()} threads")
    task = load_task_config(str(write_config(root, args.size, args.augment)))
    print(f"augmentation {args.augment}: {task.augment}, images decoded at {task.decode_size} px")
    cache = random_cache(root, args.views, int(args.images * 0.8))
    options = dict(shuffle=True, augment=task.augment, seed=0, drop_last=True)
    steps = {"labels": student_step(task, args.student_model), "kd": student_step(task, args.student_model, cache.rows)}
    print(f"  {'workers':>8} {'(a) data alone':>15} {'(b) labels-only step':>21} {'(c) cached KD step':>19}")
    for workers in args.workers:
        train = load_task_data(task, storage="stream", num_workers=workers).train
        data = rate(train.batches(args.batch_size, "cpu", **options), count=args.batches)
        labels = rate(train.batches(args.batch_size, "cpu", **options), steps["labels"], args.batches)
        kd = rate(train.batches(args.batch_size, "cpu", views=args.views, **options), steps["kd"], args.batches)
        print(f"  {workers:>8} {data:>15.0f} {labels:>21.0f} {kd:>19.0f}")
    resident = in_memory(train, args.batch_size * (args.batches + WARMUP + 1))
    labels = rate(resident.batches(args.batch_size, "cpu", **options), steps["labels"], args.batches)
    kd = rate(resident.batches(args.batch_size, "cpu", views=args.views, **options), steps["kd"], args.batches)
    print(f"  {'memory':>8} {'-':>15} {labels:>21.0f} {kd:>19.0f}   (decoded images held in memory)")


def in_memory(split, count: int) -> Split:
    """The first `count` images of a streamed split, decoded into memory."""
    count = min(count, len(split))
    return Split(torch.stack([split.image(i) for i in range(count)]), split.labels[:count], split.input_size)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
