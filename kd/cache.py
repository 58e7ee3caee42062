"""An exact teacher-logit cache: each teacher's logits for a fixed pool of augmented views.

With K teachers every KD step pays K teacher forward passes. For an in-memory dataset the
training images are drawn from a fixed pool of V augmented views per image (kd.data.Batches
with `views=V`), so each view's teacher logits can be computed once, kept as float16 logits
(not probabilities: the temperature may change), and replayed: the student always trains on
exactly the view whose logits it is given, as in FKD. A cache file is keyed by the teacher
checkpoint's hash, the training data's fingerprint, the pool's exact view parameters and the
precision of the teachers' forward pass, so a sweep over lr, temperature, alpha, seed or student
reuses it, while a changed teacher, dataset, view pool or precision is never served stale logits.
The pool is drawn on the CPU whatever the training device (kd.data), so a cache built on one
device serves runs on another with the same views.

For a streamed split (kd.streaming) the logits are not held in memory: each teacher's (V, N, C)
array is a .npy file on disk, written view by view while it is built and read back through a
memory map, a batch's rows at a time. Its data fingerprint is the files' paths, sizes and
modification times, so a folder changed since the cache was built gets a cache of its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from kd.checkpoint import atomic_write
from kd.data import Batch, Batches, FileSplit
from kd.engine import Precision

log = logging.getLogger("kd")
BUDGET_BYTES = 2 * 1024 ** 3  # "auto" caches in memory when all teachers' logits fit in this
DISK_BUDGET_BYTES = 64 * 10 ** 9  # the largest cache written to disk for streamed data
BUILD_BATCH_SIZE = 1024


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def on_disk(batches) -> bool:
    """Whether a cache for these batches lives on disk (streamed data) rather than in memory."""
    return isinstance(batches.split, FileSplit)


def cache_key(teacher_sha: str, data_fingerprint: str, batches: Batches, precision: str) -> str:
    """Everything that determines a cache's logits: the teacher's weights, the images, the exact view
    parameters (crop offsets and flips, not only the seed they were drawn from) and the precision the
    teacher ran in."""
    views = hashlib.sha256(batches.view_params.cpu().numpy().tobytes()).hexdigest()
    parts = {"teacher": teacher_sha, "data": data_fingerprint, "view_params": views,
             "augment": asdict(batches.augment) if batches.augment else None, "precision": precision, "format": 2}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def repeated_views_note(num_epochs: int, batches) -> str | None:
    """A note when a run's epochs outnumber its pool's augmented views: each image's few crops then
    come back again and again, where online teachers would see fresh ones; None when nothing repeats."""
    if batches.augment is None or num_epochs <= batches.num_views:
        return None
    return (f"teacher-logit cache: {num_epochs} epochs replay {batches.num_views} augmented views per image, so "
            f"each view comes back about {num_epochs / batches.num_views:.0f} times; that costs accuracy against "
            f"online teachers (README, \"The teacher-logit cache\"): --teacher_cache_views {num_epochs} or "
            "--teacher_cache off avoids it")


def cache_bytes(num_teachers: int, views: int, num_images: int, num_classes: int) -> int:
    return num_teachers * views * num_images * num_classes * 2  # float16


class TeacherLogitCache:
    """Replays cached teacher logits: a Batch (with its view indices) -> logits (K, B, C)."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits  # (K, V, N, C) float16

    def __call__(self, batch: Batch) -> torch.Tensor:
        if batch.view is None:
            raise ValueError("cached teacher logits need batches drawn from a view pool")
        return self.logits[:, batch.view, batch.index]

    @property
    def nbytes(self) -> int:
        return self.logits.numel() * 2


class DiskLogitCache:
    """Replays teacher logits kept on disk: one memory-mapped (V, N, C) float16 array per teacher."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays

    def __call__(self, batch: Batch) -> torch.Tensor:
        if batch.view is None:
            raise ValueError("cached teacher logits need batches drawn from a view pool")
        view, index = batch.view.cpu().numpy(), batch.index.cpu().numpy()
        rows = np.stack([array[view, index] for array in self.arrays])
        return torch.from_numpy(rows).to(batch.x.device, non_blocking=True)

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays)


def cache_paths(checkpoints: list[Path], batches, precision: Precision, cache_dir: Path) -> list[Path]:
    data = batches.split.fingerprint
    suffix = ".npy" if on_disk(batches) else ".safetensors"
    return [Path(cache_dir) / f"{cache_key(file_sha256(c), data, batches, precision.name)}{suffix}"
            for c in checkpoints]


def load_or_build_cache(teachers: list[nn.Module], paths: list[Path], batches,
                        precision: Precision) -> TeacherLogitCache | DiskLogitCache:
    """Load each teacher's cached logits, computing and saving the missing ones first; in memory, or
    memory-mapped from disk for streamed data."""
    started = time.perf_counter()
    built = sum(not path.is_file() for path in paths)
    if on_disk(batches):
        for teacher, path in zip(teachers, paths):
            if not path.is_file():
                atomic_write(path, lambda tmp, t=teacher: write_view_logits(t, batches, precision, Path(tmp)))
        cache = DiskLogitCache([np.load(path, mmap_mode="r") for path in paths])
    else:
        cache = TeacherLogitCache(torch.stack([_memory_logits(t, path, batches, precision)
                                               for t, path in zip(teachers, paths)]))
    verb = f"built {built} of {len(paths)} teachers' entries in {time.perf_counter() - started:.1f}s" if built \
        else f"loaded in {time.perf_counter() - started:.1f}s"
    log.info("teacher-logit cache: %d teachers x %d views x %d images, %.1f MB %s, %s (%s)", len(paths),
             batches.num_views, len(batches.split), cache.nbytes / 1e6, "on disk" if on_disk(batches) else "in memory",
             verb, paths[0].parent)
    return cache


def _memory_logits(teacher: nn.Module, path: Path, batches: Batches, precision: Precision) -> torch.Tensor:
    if path.is_file():
        return load_file(str(path), device=str(precision.device))["logits"]
    views = torch.stack([torch.cat([logits for _, logits in view_logits(teacher, batches, precision, v)])
                         for v in _views(batches)])
    atomic_write(path, lambda tmp: save_file({"logits": views.cpu()}, tmp))
    return views


def write_view_logits(teacher: nn.Module, batches, precision: Precision, path: Path) -> None:
    """The teacher's float16 logits for every pooled view of every image, written to a .npy file at
    `path` one batch at a time (never held whole)."""
    array = None
    for v in _views(batches):
        for index, logits in view_logits(teacher, batches, precision, v):
            if array is None:
                shape = (batches.num_views, len(batches.split), logits.shape[1])
                array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
            array[v, index.cpu().numpy()] = logits.cpu().numpy()
    array.flush()
    del array  # closes the map before the file is renamed


def _views(batches) -> Iterator[int]:
    return iter(tqdm(range(batches.num_views), desc="caching teacher logits", leave=False, dynamic_ncols=True))


@torch.inference_mode()
def view_logits(teacher: nn.Module, batches, precision: Precision, view: int) -> Iterator[tuple[torch.Tensor,
                                                                                                  torch.Tensor]]:
    """(image indices, the teacher's float16 logits) for pooled view `view` of every image, in order."""
    teacher.eval()
    for batch in batches.view_batches(view, BUILD_BATCH_SIZE):
        with precision.autocast():
            yield batch.index, teacher(batch.x).to(torch.float16)
