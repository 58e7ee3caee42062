"""How to fit ImageNet-shaped students to small images: accuracy at an equal CPU-time budget.

For each student and each option (input size, number of first downsampling layers halved), it
times a training epoch once, then trains fresh models, one per seed, for as many epochs as fit in
`--budget` seconds (labels only, Adam with a cosine schedule, the task's augmentation) and reports
validation accuracy (the test split is not used for choices), the final feature map, images/s and
the epochs the budget bought. Run it on an otherwise idle machine: the budget is wall-clock time.

    python benchmarks/input_fit.py --task A --budget 40 --seeds 1 2
    python benchmarks/input_fit.py --task B --students MobileNetV3 --budget 150 --options 28:0 28:1 28:2
    python benchmarks/input_fit.py --task B --students cs3darknet_s resnet18 --options 28:1 --speed_only
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import timm
import torch

from kd.config import load_task_config
from kd.data import Batches, load_task_data
from kd.engine import fit, seed_everything, select_precision, train_one_epoch
from kd.distillers.kd import KD
from kd.models import create_model
from kd.settings import STUDENT_ARCHS

DEFAULT_OPTIONS = {"A": ["16:1", "16:2", "24:1", "32:1", "32:0"], "B": ["28:0", "28:1", "28:2"]}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="A", choices=["A", "B"])
    p.add_argument("--students", nargs="+", default=list(STUDENT_ARCHS), type=model_name, metavar="MODEL",
                   help="student names or any timm architecture, e.g. a candidate teacher "
                        f"(default: {' '.join(STUDENT_ARCHS)})")
    p.add_argument("--options", nargs="+", default=None, metavar="SIZE:HALVED",
                   help="input size and first downsampling layers halved, e.g. 32:1 (default per task)")
    p.add_argument("--budget", type=float, default=40.0, help="training seconds per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--timing_images", type=int, default=4096, help="images of the timed training pass")
    p.add_argument("--speed_only", action="store_true", help="time the training epoch only, train nothing")
    return p


def model_name(name: str) -> str:
    """A student name or a timm architecture; an argparse error otherwise."""
    if name in STUDENT_ARCHS or timm.is_model(name):
        return name
    raise argparse.ArgumentTypeError(f"neither a student ({', '.join(STUDENT_ARCHS)}) nor a timm architecture: {name}")


def final_map(model, size: int) -> int:
    with torch.no_grad():
        return model.eval().backbone.forward_features(torch.zeros(1, model.mean.shape[1], size, size)).shape[-1]


PRECISION = select_precision(torch.device("cpu"), amp=False)
CRITERION = KD(1.0, 0.0)  # labels only


def new_model(arch: str, task, halved: int):
    return create_model(arch, task.num_classes, task.data.channels, task.mean, task.std,
                        stride_reduction=halved).to(memory_format=torch.channels_last)


def train_batches(data, task, seed: int, args) -> Batches:
    return Batches(data.train, args.batch_size, "cpu", shuffle=True, augment=task.augment, seed=seed, drop_last=True)


def epoch_seconds(arch: str, task, data, halved: int, args) -> float:
    """Seconds of one training epoch, from the second of two passes over at most --timing_images images
    (the first pays one-off start-up costs)."""
    model = new_model(arch, task, halved)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    n = min(len(data.train), args.timing_images)
    sample = dataclasses.replace(data, train=dataclasses.replace(data.train, images=data.train.images[:n],
                                                                 labels=data.train.labels[:n]))
    for epoch in range(2):
        started = time.perf_counter()
        train_one_epoch(model, train_batches(sample, task, epoch, args), optimizer, CRITERION, PRECISION)
    return (time.perf_counter() - started) * len(data.train) / n


def val_accuracy(arch: str, task, data, halved: int, seed: int, epochs: int, args) -> float:
    seed_everything(seed)
    model = new_model(arch, task, halved)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    history = fit(model, train_batches(data, task, seed, args), Batches(data.val, 512, "cpu"), optimizer=optimizer,
                  scheduler=scheduler, criterion=CRITERION, epochs=epochs, precision=PRECISION,
                  desc=f"{arch} halved {halved}")
    return history[-1]["val_acc"]


def main(args) -> None:
    base = load_task_config(args.task)
    options = [tuple(int(v) for v in o.split(":")) for o in (args.options or DEFAULT_OPTIONS[args.task])]
    print(f"task {args.task}, budget {args.budget:.0f} s of training per run, seeds {args.seeds}, "
          f"lr {args.lr}, batch {args.batch_size}, {torch.get_num_threads()} threads, validation accuracy")
    print(f"{'model':<22}{'input':>6}{'halved':>7}{'map':>5}{'img/s':>8}{'epochs':>7}"
          f"{'val acc mean':>13}{'sd':>6}  per seed")
    for size in sorted({s for s, _ in options}):
        task = dataclasses.replace(base, data=dataclasses.replace(base.data, input_size=size))
        data = load_task_data(task)
        for student in args.students:
            for s, halved in options:
                if s != size:
                    continue
                arch = STUDENT_ARCHS.get(student, student)
                seconds = epoch_seconds(arch, task, data, halved, args)
                epochs = max(1, math.floor(args.budget / seconds))
                line = (f"{student:<22}{size:>6}{halved:>7}{final_map(new_model(arch, task, halved), size):>5}"
                        f"{len(data.train) / seconds:>8.0f}{epochs:>7}")
                if not args.speed_only:
                    accs = [100 * val_accuracy(arch, task, data, halved, seed, epochs, args) for seed in args.seeds]
                    sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
                    line += f"{statistics.mean(accs):>12.2f}%{sd:>6.2f}  {' '.join(f'{a:.2f}' for a in accs)}"
                print(line, flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
