"""Inference speed of a model: latency per image at batch 1 and throughput at a larger batch; and the
arithmetic a model needs (its FLOPs) against what the device can do (a large matmul's FLOP/s).

Each timed call is one forward pass under torch.inference_mode(), after warm-up calls (which
let the allocator and oneDNN/cuDNN settle); the median of the timed calls is reported because
it ignores the odd call slowed down by another process. CPU timing uses one thread by default:
the numbers are then comparable across machines, and they stay sane when other processes keep
the cores busy (more threads than free cores makes OpenMP barriers stall for whole time slices).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class SpeedSettings:
    latency_batch: int = 1
    throughput_batch: int = 64
    warmup: int = 2
    runs: int = 7  # timed calls per batch size; 1-3 s per model on one CPU core
    threads: int = 1  # CPU threads while timing


@dataclass(frozen=True)
class Speed:
    latency_ms: float  # per image, at latency_batch
    throughput: float  # images per second, at throughput_batch


def median_seconds(call: Callable[[], object], warmup: int, runs: int,
                   synchronize: Callable[[], None] = lambda: None) -> float:
    """Median wall time of `runs` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    synchronize()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        synchronize()  # CUDA runs asynchronously: wait for the work, not just its launch
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` intra-op CPU threads, then restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.inference_mode()
def measure_speed(model: nn.Module, image_shape: tuple[int, int, int],
                  settings: SpeedSettings = SpeedSettings()) -> Speed:
    """Time `model` (put in eval mode) on random [0, 1] images of `image_shape` (C, H, W), on its own device."""
    model.eval()
    device = next(model.parameters()).device
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def seconds(batch: int) -> float:
        x = torch.rand(batch, *image_shape, device=device)
        return median_seconds(lambda: model(x), settings.warmup, settings.runs, synchronize)

    with torch_threads(settings.threads):
        latency = seconds(settings.latency_batch) / settings.latency_batch
        throughput = settings.throughput_batch / seconds(settings.throughput_batch)
    return Speed(latency_ms=latency * 1000.0, throughput=throughput)


def sequential_speed(speeds: list[Speed]) -> Speed:
    """The speed of models run one after another on the same input (a teacher ensemble):
    the time per image adds up."""
    return Speed(latency_ms=sum(s.latency_ms for s in speeds),
                 throughput=1.0 / sum(1.0 / s.throughput for s in speeds))


def forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward pass of `model` on `x` (torch.utils.flop_counter: its matrix products and
    convolutions, two per multiply-add), in eval mode and without gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return float(counter.get_total_flops())


def matmul_peak(dtype: torch.dtype, device: torch.device = torch.device("cpu"), size: int | None = None,
                runs: int = 5) -> float:
    """FLOP/s of a large square matrix product in `dtype`: the arithmetic limit of this device, with its
    current thread count, that a training step is measured against. On CUDA, fp32 products run as TF32
    where torch.set_float32_matmul_precision allows it; the default size (8,192 there, 2,048 on CPU)
    keeps the timing's own overhead negligible."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return 2 * size ** 3 / median_seconds(lambda: a @ b, warmup=2, runs=runs, synchronize=synchronize)
