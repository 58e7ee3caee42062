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
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from kd.checkpoint import atomic_write
from kd.data import Batch, Batches
from kd.engine import Precision

log = logging.getLogger("kd")
BUDGET_BYTES = 2 * 1024 ** 3  # "auto" caches when all teachers' logits fit in this
BUILD_BATCH_SIZE = 1024


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def split_fingerprint(batches: Batches) -> str:
    digest = hashlib.sha256()
    digest.update(batches.split.images.cpu().numpy().tobytes())
    digest.update(batches.split.labels.cpu().numpy().tobytes())
    return digest.hexdigest()


def cache_key(teacher_sha: str, data_fingerprint: str, batches: Batches, precision: str) -> str:
    """Everything that determines a cache's logits: the teacher's weights, the images, the exact view
    parameters (crop offsets and flips, not only the seed they were drawn from) and the precision the
    teacher ran in."""
    views = hashlib.sha256(batches.view_params.cpu().numpy().tobytes()).hexdigest()
    parts = {"teacher": teacher_sha, "data": data_fingerprint, "view_params": views,
             "augment": asdict(batches.augment) if batches.augment else None, "precision": precision, "format": 2}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


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


def cache_paths(checkpoints: list[Path], batches: Batches, precision: Precision, cache_dir: Path) -> list[Path]:
    data = split_fingerprint(batches)
    return [Path(cache_dir) / f"{cache_key(file_sha256(c), data, batches, precision.name)}.safetensors"
            for c in checkpoints]


def load_or_build_cache(teachers: list[nn.Module], paths: list[Path], batches: Batches,
                        precision: Precision) -> TeacherLogitCache:
    """Load each teacher's cached logits, computing and saving the missing ones first."""
    started = time.perf_counter()
    built = 0
    logits = []
    for teacher, path in zip(teachers, paths):
        if path.is_file():
            logits.append(load_file(str(path), device=str(precision.device))["logits"])
            continue
        values = compute_view_logits(teacher, batches, precision)
        atomic_write(path, lambda tmp, v=values: save_file({"logits": v.cpu()}, tmp))
        logits.append(values)
        built += 1
    cache = TeacherLogitCache(torch.stack(logits))
    verb = f"built {built} of {len(paths)} teachers' entries in {time.perf_counter() - started:.1f}s" if built \
        else f"loaded in {time.perf_counter() - started:.1f}s"
    log.info("teacher-logit cache: %d teachers x %d views x %d images, %.1f MB, %s (%s)", len(paths),
             batches.num_views, len(batches.split), cache.logits.numel() * 2 / 1e6, verb, paths[0].parent)
    return cache


@torch.inference_mode()
def compute_view_logits(teacher: nn.Module, batches: Batches, precision: Precision) -> torch.Tensor:
    """The teacher's float16 logits for every pooled view of every image, (V, N, C)."""
    teacher.eval()
    n = len(batches.split)
    views = []
    for v in tqdm(range(batches.num_views), desc="caching teacher logits", leave=False, dynamic_ncols=True):
        chunks = []
        for start in range(0, n, BUILD_BATCH_SIZE):
            idx = torch.arange(start, min(start + BUILD_BATCH_SIZE, n), device=batches.device)
            batch = batches.batch(idx, torch.full_like(idx, v))
            with precision.autocast():
                chunks.append(teacher(batch.x).to(torch.float16))
        views.append(torch.cat(chunks))
    return torch.stack(views)
