"""Training throughput: labels only vs KD with online teachers vs KD from the teacher-logit cache.

Prints images/s for (a) the student trained on labels only, (b) KD with all teachers run online,
(c) KD from the cache, and every other distillation method from the cache (its step's cost against
(c)), (d) the data path alone, their ratios, and the time of a sweep of
`--sweep_runs` x `--sweep_epochs` student trainings with and without the cache (the cache's build
included), plus the validation accuracy of online and cached KD from the same seed.

    python benchmarks/throughput.py --task B --quick          # a few minutes on a laptop CPU
    python benchmarks/throughput.py --task B --device cuda    # the full training split on a GPU
    python benchmarks/throughput.py --task B --quick --efficiency   # each model's step against the matmul peak
    python benchmarks/throughput.py --task B --subset 8192 --batch_sizes 128 512   # the step's rate by batch size
    python benchmarks/throughput.py --task B --subset 4096 --layers   # each model's step, kd.layers against PyTorch's
    python benchmarks/throughput.py --task B --subset 4096 --allocator   # each model's step, freed memory kept or not
    python benchmarks/throughput.py --task B --subset 4096 --compiled   # each student's step, eager and compiled
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kd.allocator import OPT_OUT, glibc_mallopt, left_to_glibc
from kd.cache import TeacherLogitCache, teacher_identity
from kd.cli import positive_int
from kd.config import load_task_config
from kd.data import Batches, Split, load_task_data
from kd.distillers import METHODS, make_distiller
from kd.distillers.kd import KD
from kd.engine import Precision, evaluate, fit, online_teachers, select_device, select_precision, train_one_epoch
from kd.layers import use_plain_layers
from kd.models import count_parameters
from kd.settings import STUDENT_ARCHS
from kd.speed import forward_flops, matmul_peak
from kd.students import build_student
from kd.teachers import TeacherEnsemble, build_teacher, load_teacher, teacher_build


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="B")
    p.add_argument("--student_model", default="MobileNetV3")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--views", type=int, default=4, help="augmented views per image in the cache's pool")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="a training subset, for a CPU in a few minutes")
    p.add_argument("--subset", type=int, default=None, help="training images used (default: all; --quick: 512)")
    p.add_argument("--sweep_runs", type=int, default=5)
    p.add_argument("--sweep_epochs", type=int, default=10)
    p.add_argument("--efficiency", action="store_true",
                   help="only the table of every student's and teacher's training step against the device's "
                        "matmul peak (images/s, FLOPs per image, %% of the fp32 and bf16 peaks)")
    p.add_argument("--batch_sizes", type=positive_int, nargs="+", default=None, metavar="B",
                   help="only the student's labels-only step at each of these batch sizes (images/s, against the "
                        "first), the question behind a larger batch with a scaled learning rate")
    p.add_argument("--layers", action="store_true",
                   help="only every student's and teacher's labels-only step with the project's faster "
                        "convolutions (kd.layers) against PyTorch's own, timed in turns (images/s, ratio)")
    p.add_argument("--allocator", action="store_true",
                   help="only every student's and teacher's labels-only step, each run in new processes with "
                        "glibc's malloc as it comes and with freed memory kept (kd.allocator), in turns "
                        "(images/s, ratio)")
    p.add_argument("--compiled", action="store_true",
                   help="only every student's labels-only step run eagerly, under torch.compile (--compile), and "
                        "compiled with PyTorch's convolutions instead of kd.layers', timed in turns (images/s, "
                        "ratios, seconds of the first compiled epoch)")
    p.add_argument("--one_model", default=None, help=argparse.SUPPRESS)  # --allocator's child: time this model
    return p


def subset(split: Split, n: int | None) -> Split:
    return split if n is None or n >= len(split) else dataclasses.replace(split, images=split.images[:n],
                                                                          labels=split.labels[:n])


def training_batches(split: Split, size: int, task, device, **pool) -> Batches:
    """Shuffled, augmented batches as training draws them, from one fixed seed so every variant sees the same."""
    return Batches(split, size, device, shuffle=True, augment=task.augment, seed=0, **pool)


def teachers_for(task) -> tuple[list[torch.nn.Module], list[Path], str]:
    """The task's trained teachers, or untrained stand-ins (same cost) saved to a temporary folder."""
    checkpoints = [task.teacher_checkpoint(t) for t in task.teachers]
    if all(c.is_file() for c in checkpoints):
        return [load_teacher(t, task)[0] for t in task.teachers], checkpoints, "trained"
    from kd.checkpoint import save_weights

    folder = Path(tempfile.mkdtemp())
    models, paths = [], []
    for spec in task.teachers:
        models.append(build_teacher(spec, task).eval())
        paths.append(folder / f"{spec.name}.safetensors")
        save_weights(models[-1], paths[-1], {})
    return models, paths, "untrained stand-ins (speed only; accuracies are meaningless)"


def timed(fn) -> tuple[object, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


class StudentTrainer:
    """A fresh student (or any model) with its optimizer, warmed up, that times one training epoch at a time."""

    def __init__(self, args, task, batches, precision, alpha, teachers, channels_last=True, compiled=False,
                 method="kd", model=None):
        torch.manual_seed(0)
        self.student = (model or build_student(args.student_model, task)).to(precision.device)
        if channels_last:
            self.student.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=1e-3)
        self.model = torch.compile(self.student) if compiled else self.student
        self.batches, self.precision, self.teachers = batches, precision, teachers
        self.criterion = make_distiller(method, (), temperature=2.0, alpha=alpha)
        self.epoch_seconds()  # warm-up (and compilation)

    def epoch_seconds(self) -> float:
        _, seconds = timed(lambda: train_one_epoch(self.model, self.batches, self.optimizer, self.criterion,
                                                   self.precision, self.teachers))
        return seconds


def best_rates(trainers: dict[str, StudentTrainer], rounds: int) -> dict[str, float]:
    """Images/s of each trainer: the best of `rounds` epochs, measured in turns so drift hits all alike."""
    best = {key: float("inf") for key in trainers}
    for epoch in range(rounds):
        for key, trainer in trainers.items():
            trainer.batches.set_epoch(epoch)
            best[key] = min(best[key], trainer.epoch_seconds())
    return {key: len(trainers[key].batches.split) / seconds for key, seconds in best.items()}


def data_path_rate(batches) -> float:
    def drain():
        for batch in batches:
            batch.x.sum()  # touch the images so lazy work is not skipped
    drain()
    _, seconds = timed(drain)
    return len(batches.split) / seconds


def sweep(args, task, train, val, precision, teachers) -> tuple[float, list[float]]:
    """Seconds for sweep_runs trainings of sweep_epochs each (lr, T, alpha vary), and their val accuracies."""
    accuracies, started = [], time.perf_counter()
    for run in range(args.sweep_runs):
        torch.manual_seed(run)
        student = build_student(args.student_model, task).to(precision.device, memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(student.parameters(), lr=1e-3 * (1 + run % 3))
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 30)
        fit(student, train, val, optimizer=optimizer, scheduler=scheduler, epochs=args.sweep_epochs,
            criterion=KD(2.0 + run, 0.3 + 0.1 * run), precision=precision, teachers=teachers,
            desc=f"sweep run {run + 1}/{args.sweep_runs}")
        accuracies.append(evaluate(student, val, precision)["acc"])
    return time.perf_counter() - started, accuracies


def efficiency(args, task, train_split, precision) -> None:
    """For every student and every teacher of the task: the labels-only training step's images/s, its
    FLOPs per image (three times the forward's: torch.utils.flop_counter miscounts the backward of
    grouped convolutions) and the fraction of this device's fp32 and bf16 matmul peaks it reaches; and
    the step's images/s under bf16 autocast, which pays only where the device multiplies bf16 natively."""
    device = precision.device
    peaks = {dtype: matmul_peak(dtype, device) for dtype in (torch.float32, torch.bfloat16)}
    bf16 = Precision(device, torch.bfloat16)
    print(f"matmul peak ({torch.get_num_threads()} threads): fp32 {peaks[torch.float32] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks[torch.bfloat16] / 1e9:.4g} GFLOP/s; training steps at batch {args.batch_size}, "
          f"{precision.name}, channels_last, on {len(train_split)} images")
    print(f"  {'model':44s} {'params':>8s} {'images/s':>9s} {'GFLOP/image':>12s} {'GFLOP/s':>8s} "
          f"{'% fp32 peak':>11s} {'% bf16 peak':>11s} {'bf16 autocast':>14s}")
    fresh = training_batches(train_split, args.batch_size, task, device)
    for label, new_model in every_model(task).items():
        model = new_model()
        flops = 3 * forward_flops(model, next(iter(Batches(train_split, 2, device))).x) / 2  # as fed
        trainers = {kind: StudentTrainer(args, task, fresh, chosen, 0.0, None, model=built)
                    for kind, chosen, built in (("fp32", precision, model), ("bf16", bf16, new_model()))}
        rate = best_rates(trainers, 2)
        achieved = rate["fp32"] * flops
        print(f"  {label:44s} {count_parameters(model) / 1e6:7.2f}M {rate['fp32']:9.0f} {flops / 1e9:12.3f} "
              f"{achieved / 1e9:8.1f} {100 * achieved / peaks[torch.float32]:10.1f}% "
              f"{100 * achieved / peaks[torch.bfloat16]:10.1f}% {rate['bf16']:7.0f} "
              f"({rate['bf16'] / rate['fp32']:.2f}x)")


def every_model(task) -> dict[str, Callable[[], torch.nn.Module]]:
    """A builder of a new network for each student and teacher of the task, by its label."""
    models = {f"student {name} ({arch})": lambda name=name: build_student(name, task)
              for name, arch in STUDENT_ARCHS.items()}
    models.update({f"teacher {spec.name} ({spec.arch})": lambda spec=spec: build_teacher(spec, task)
                   for spec in task.teachers})
    return models


def layer_speed(args, task, train_split, precision) -> None:
    """Every model's labels-only training step with kd.layers' convolutions and with PyTorch's own (the
    same network and start), timed in turns in one run."""
    fresh = training_batches(train_split, args.batch_size, task, precision.device)
    print(f"labels-only training steps at batch {args.batch_size}, {precision.name}, channels_last, "
          f"{len(train_split)} images, torch threads {torch.get_num_threads()}")
    print(f"  {'model':44s} {'layers changed':>15s} {'PyTorch images/s':>17s} {'kd.layers images/s':>19s} "
          f"{'ratio':>6s}")
    for label, new_model in every_model(task).items():
        torch.manual_seed(0)
        plain = new_model()
        changed = use_plain_layers(plain)
        torch.manual_seed(0)
        trainers = {kind: StudentTrainer(args, task, fresh, precision, 0.0, None, model=model)
                    for kind, model in (("plain", plain), ("fast", new_model()))}
        rate = best_rates(trainers, 3)
        print(f"  {label:44s} {changed:15d} {rate['plain']:17.0f} {rate['fast']:19.0f} "
              f"{rate['fast'] / rate['plain']:5.2f}x")


def compile_speed(args, task, train_split, precision) -> None:
    """Every student's labels-only training step eager, compiled, and compiled with PyTorch's convolutions
    instead of kd.layers' (the same network and start), timed in turns in one run; a compiled trainer's
    warm-up epoch holds its compilation."""
    fresh = training_batches(train_split, args.batch_size, task, precision.device)
    print(f"labels-only training steps at batch {args.batch_size}, {precision.name}, channels_last, "
          f"{len(train_split)} images, torch threads {torch.get_num_threads()}; images/s, and the seconds of "
          f"the first compiled epoch")
    print(f"  {'student':14s} {'eager':>8s} {'compiled':>9s} {'ratio':>6s} {'first':>6s} "
          f"{'compiled, PyTorch layers':>25s} {'ratio':>6s} {'first':>6s}")
    for name in STUDENT_ARCHS:
        args.student_model = name
        plain = build_student(name, task)
        use_plain_layers(plain)
        trainers, first = {"eager": StudentTrainer(args, task, fresh, precision, 0.0, None)}, {}
        for arm, model in (("compiled", None), ("plain", plain)):
            torch._dynamo.reset()  # each compilation timed from scratch
            trainers[arm], first[arm] = timed(lambda model=model: StudentTrainer(
                args, task, fresh, precision, 0.0, None, compiled=True, model=model))
        rate = best_rates(trainers, 3)
        print(f"  {name:14s} {rate['eager']:8.0f} {rate['compiled']:9.0f} {rate['compiled'] / rate['eager']:5.2f}x "
              f"{first['compiled']:5.0f}s {rate['plain']:25.0f} {rate['plain'] / rate['eager']:5.2f}x "
              f"{first['plain']:5.0f}s")


def allocator_speed(args) -> None:
    """Every model's labels-only training step in new processes, with glibc's malloc as it comes
    (KD_KEEP_FREED_MEMORY=0) and with freed memory kept: a process cannot go back to glibc's own
    thresholds once they are set, so each arm runs in its own, two of each in turns."""
    kept = {name: value for name, value in os.environ.items() if name != OPT_OUT}
    if glibc_mallopt() is None or left_to_glibc(kept):
        print("freed memory is kept only with glibc's malloc and no malloc options set: nothing to compare here")
        return
    arms = {"glibc": {**kept, OPT_OUT: "0"}, "kept": kept}
    print(f"labels-only training steps at batch {args.batch_size}, channels_last, each in a new process "
          f"(best of two); images/s")
    print(f"  {'model':44s} {'glibc as it comes':>18s} {'freed memory kept':>18s} {'ratio':>6s}")
    for label in every_model(load_task_config(args.task)):
        rate = dict.fromkeys(arms, 0.0)
        for _ in range(2):
            for arm, environ in arms.items():
                rate[arm] = max(rate[arm], child_rate(args, label, environ))
        print(f"  {label:44s} {rate['glibc']:18.0f} {rate['kept']:18.0f} {rate['kept'] / rate['glibc']:5.2f}x")


def child_rate(args, label: str, environ: dict[str, str]) -> float:
    """The images/s that a new process of this script (`--one_model label`) measures under `environ`."""
    command = [sys.executable, __file__, "--task", args.task, "--batch_size", str(args.batch_size),
               "--device", args.device, "--one_model", label]
    command += ["--subset", str(args.subset)] if args.subset else ["--quick"] if args.quick else []
    done = subprocess.run(command, env=environ, capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def one_model_rate(args, task, train_split, precision) -> None:
    """Print the images/s of the labels-only training step of the model labelled `args.one_model`."""
    model = every_model(task)[args.one_model]()
    trainer = StudentTrainer(args, task, training_batches(train_split, args.batch_size, task, precision.device),
                             precision, 0.0, None, model=model)
    print(best_rates({args.one_model: trainer}, rounds=2)[args.one_model])


def batch_scaling(args, task, train_split, precision) -> None:
    """The student's labels-only training step at each of `args.batch_sizes`, timed in turns in one run."""
    trainers = {size: StudentTrainer(args, task, training_batches(train_split, size, task, precision.device),
                                     precision, 0.0, None)
                for size in args.batch_sizes}
    rates = best_rates(trainers, rounds=3)
    first = rates[args.batch_sizes[0]]
    print(f"student {args.student_model}, labels-only step, {len(train_split)} training images, "
          f"{precision.name}, channels_last, torch threads {torch.get_num_threads()}")
    for size, rate in rates.items():
        print(f"  batch {size:5d} {rate:8.0f} images/s  ({rate / first:.2f}x batch {args.batch_sizes[0]})")


def main(args) -> None:
    if args.allocator:
        return allocator_speed(args)
    torch.set_float32_matmul_precision("high")
    task = load_task_config(args.task)
    device = select_device(args.device)
    precision = select_precision(device, amp=True)
    data = load_task_data(task)
    n = args.subset or (512 if args.quick else None)
    train_split, val_split = subset(data.train, n), subset(data.val, 1000 if args.quick else None)
    if args.efficiency:
        return efficiency(args, task, train_split, precision)
    if args.batch_sizes:
        return batch_scaling(args, task, train_split, precision)
    if args.layers:
        return layer_speed(args, task, train_split, precision)
    if args.one_model:
        return one_model_rate(args, task, train_split, precision)
    if args.compiled:
        return compile_speed(args, task, train_split, precision)
    models, checkpoints, kind = teachers_for(task)
    ensemble = TeacherEnsemble({t.name: m for t, m in zip(task.teachers, models)})
    ensemble.to(device, memory_format=torch.channels_last)  # as train.py does by default

    def batches(views=None):
        return training_batches(train_split, args.batch_size, task, device, views=views,
                                pool_seed=task.data.split_seed)

    fresh, pooled = batches(), batches(args.views)
    val = Batches(val_split, 1024, device)
    with tempfile.TemporaryDirectory() as cache_dir:
        identities = [teacher_identity(c, teacher_build(t, task)) for c, t in zip(checkpoints, task.teachers)]
        cache = TeacherLogitCache(list(ensemble.models), identities, pooled, precision, Path(cache_dir))
        _, build_seconds = timed(lambda: cache.fill(range(args.views)))
        trainers = {
            "a": StudentTrainer(args, task, fresh, precision, 0.0, None),
            "b": StudentTrainer(args, task, fresh, precision, 0.5, online_teachers(ensemble)),
            "c": StudentTrainer(args, task, pooled, precision, 0.5, cache),
            "e": StudentTrainer(args, task, fresh, precision, 0.0, None, channels_last=False),
            "f": StudentTrainer(args, task, fresh, precision, 0.0, None, compiled=True),
            **{f"c {name}": StudentTrainer(args, task, pooled, precision, 0.5, cache, method=name)
               for name in METHODS if name != "kd"},
        }
        rates = {**best_rates(trainers, rounds=3 if args.quick else 2), "d": data_path_rate(pooled)}
        online_sweep, online_acc = sweep(args, task, fresh, val, precision, online_teachers(ensemble))
        cached_sweep, cached_acc = sweep(args, task, pooled, val, precision, cache)
    report(args, task, device, precision, kind, len(train_split), rates, build_seconds,
           online_sweep, cached_sweep + build_seconds, online_acc, cached_acc)


def report(args, task, device, precision, kind, n, rates, build, online_sweep, cached_sweep, online_acc,
           cached_acc) -> None:
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"task {task.name}, student {args.student_model}, {len(task.teachers)} teachers ({kind}), "
          f"{n} training images, batch {args.batch_size}, {device} ({name}), {precision.name}")
    labels = {"a": "student, labels only", "b": "KD, teachers online", "c": "KD, cached logits",
              "d": "data path alone", "e": "(a) without channels_last", "f": "(a) with torch.compile"}
    for key, label in labels.items():
        print(f"  ({key}) {label:24s} {rates[key]:10.0f} images/s  ({rates[key] / rates['a']:.2f}x (a))")
    for name in METHODS:
        if name != "kd":
            rate = rates[f"c {name}"]
            print(f"  (c) --kd_loss {name:10s}    {rate:10.0f} images/s  ({rates['c'] / rate:.3f}x the time of (c))")
    print(f"  ratios: b/a = {rates['a'] / rates['b']:.2f}x the time, c/a = {rates['a'] / rates['c']:.3f}x the time, "
          f"data path {rates['d'] / rates['a']:.0f}x faster than the labels-only step")
    print(f"  cache build: {args.views} views x {n} images x {len(task.teachers)} teachers in {build:.1f}s")
    print(f"  sweep of {args.sweep_runs} runs x {args.sweep_epochs} epochs: online {online_sweep:.1f}s, "
          f"cached {cached_sweep:.1f}s (build included) = {cached_sweep / online_sweep:.2f}x")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"  sweep val accuracy: online {mean(online_acc):.4f} {[round(a, 4) for a in online_acc]}, "
          f"cached {mean(cached_acc):.4f} {[round(a, 4) for a in cached_acc]}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
