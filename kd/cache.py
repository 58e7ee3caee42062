"""An exact teacher-logit cache: each teacher's logits for a pool of augmented views, made as the run goes.

With K teachers every KD step pays K teacher forward passes. For the training images drawn from a
pool of V augmented views per image (kd.data.ViewPool; epoch e trains on view e mod V), each view's
teacher logits can be computed once, kept as float16 logits (not probabilities: the temperature may
change), and replayed: the student always trains on exactly the view whose logits it is given, as in
FKD. A view's logits are computed at the start of the first epoch that trains on it, by one teacher
pass over the split in fixed batches, and saved, one file per teacher and view; a later run of the
same task loads them. So a first run costs about what online teachers cost, a later one replays, and
the logits a run trains on are the same floats whether the files existed before it or not.

A file is keyed by everything that determines its logits: the teacher (its checkpoint's hash and how
it is built and fed: architecture, halvings, normalisation, input size, channels), the training data's
fingerprint and image shape, the view's exact parameters (with --mixup its partners and lams too) and the
precision of the teachers' forward pass. A sweep over lr, temperature, alpha, seed, student or epochs
reuses the files; a changed teacher, dataset, view or precision is never served stale logits. Views are
drawn on the CPU whatever the training device (kd.data), so files built on one device serve runs on
another.

In memory the cache is one (K, V, N, C) tensor on the training device. For a streamed split
(kd.streaming) each teacher's view is a (N, C) .npy file on disk, written batch by batch while it is
built and read back through a memory map, a batch's rows at a time; its data fingerprint is the files'
paths, sizes and modification times, so a folder changed since the cache was built gets a cache of its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from kd.batches import Batch
from kd.files import atomic_write
from kd.distributed import World, main_process_first
from kd.engine import Precision
from kd.errors import UserError
from kd.config import TaskConfig
from kd.builds import ModelBuild
from kd.streaming import FileSplit
from kd.teachers import TeacherEnsemble, teacher_build

log = logging.getLogger("kd")
BUDGET_BYTES = 2 * 1024 ** 3  # "auto" caches in memory when all teachers' logits fit in this
DISK_BUDGET_BYTES = 64 * 10 ** 9  # the largest cache written to disk for streamed data
BUILD_BATCH_SIZE = 1024
FORMAT = 3  # bumped whenever what a key names would give other logits


def file_sha256(path: Path) -> str:
    """The file's SHA-256. A run asks for a teacher's more than once (its record, its cache key, a study's
    teachers key): the file is read once while it is the same file (inode, size and times unchanged)."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


@lru_cache(maxsize=64)
def _sha256(path: str, *identity: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def on_disk(batches) -> bool:
    """Whether a cache for these batches lives on disk (streamed data) rather than in memory."""
    return isinstance(batches.split, FileSplit)


def teacher_identity(checkpoint: Path, build: ModelBuild) -> str:
    """A teacher as far as its logits go: its checkpoint's hash and how it is built and fed (`build`:
    architecture, halvings, normalisation, input size, channels: what the weights file does not say)."""
    parts = {"checkpoint": file_sha256(checkpoint), "build": build.to_dict()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_key(teacher: str, batches, view: int, precision: str) -> str:
    """Everything that determines one teacher's logits for one pooled view: the teacher (see
    `teacher_identity`), the images and their decoded shape, the view's exact parameters (crop offsets
    and flips, with mixup every partner and lam, not only the seed they were drawn from) and the precision
    the teacher ran in."""
    parts = {"teacher": teacher, "data": batches.split.fingerprint, "shape": list(batches.split.image_shape),
             "view": batches.pool.fingerprint(view), "augment": asdict(batches.augment) if batches.augment else None,
             "precision": precision, "format": FORMAT}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def repeated_views_note(num_epochs: int, batches) -> str | None:
    """A note when a run's epochs outnumber its pool's views (augmented or blended): each image's few
    views then come back again and again, where online teachers would see fresh ones; None when nothing
    repeats."""
    if not batches.pool.varies or num_epochs <= batches.num_views:
        return None
    return (f"teacher-logit cache: {num_epochs} epochs replay {batches.num_views} views per image, so "
            f"each view comes back about {num_epochs / batches.num_views:.0f} times; that costs accuracy against "
            f"online teachers (docs/cache-resume-torchrun.md): the default --teacher_cache_views (the run's "
            "epochs) or --teacher_cache off avoids it")


def open_teacher_cache(mode: str, pooled, task: TaskConfig, ensemble: TeacherEnsemble, precision: Precision,
                       cache_dir: Path, world: World | None = None,
                       num_epochs: int | None = None) -> "TeacherLogitCache | None":
    """The teacher-logit cache of the pooled batches, or None where the policy says the teachers run
    online. `mode` auto: when all teachers' logits of the pool's views fit BUDGET_BYTES of memory, or on
    disk for streamed data (DISK_BUDGET_BYTES and the free space of `cache_dir`); on: always, except a
    disk cache with no room, which is a UserError."""
    size = cache_bytes(len(task.teachers), pooled.num_views, len(pooled.split), task.num_classes)
    too_large = _shortage(mode, pooled, size, cache_dir)
    if too_large:
        log.info("teacher-logit cache off: %s", too_large)
        return None
    if num_epochs is not None and (note := repeated_views_note(num_epochs, pooled)):
        log.info(note)  # not a warning: a tuner's trials and every DDP process would repeat it
    identities = [teacher_identity(task.teacher_checkpoint(t), teacher_build(t, task)) for t in task.teachers]
    log.info("teacher-logit cache: %d teachers x %d views%s x %d images, %.1f MB %s; each view computed the first "
             "epoch that trains on it, then kept (%s)", len(identities), pooled.num_views,
             " (blended by --mixup)" if pooled.pool.mixup else "", len(pooled.split), size / 1e6,
             "on disk" if on_disk(pooled) else "in memory", cache_dir)
    return TeacherLogitCache(list(ensemble.models), identities, pooled, precision, Path(cache_dir), world)


def _shortage(mode: str, pooled, size: int, cache_dir: Path) -> str | None:
    """Why the cache is not used (None: it is); a disk cache that `on` insists on and cannot be written
    is a UserError."""
    if not on_disk(pooled):
        if mode == "on" or size <= BUDGET_BYTES:
            return None
        return f"{size / 1e9:.1f} GB exceeds the {BUDGET_BYTES / 1e9:.1f} GB budget"
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache_dir).free  # views already there count as space to write: an upper bound
    if size <= DISK_BUDGET_BYTES and size <= free:
        return None
    shortage = (f"{size / 1e9:.1f} GB on disk ({free / 1e9:.1f} GB free in {cache_dir}, budget "
                f"{DISK_BUDGET_BYTES / 1e9:.0f} GB)")
    if mode == "on":
        raise UserError(f"the teacher-logit cache would take {shortage}; use fewer --teacher_cache_views, "
                        "another --cache_dir or --teacher_cache off")
    return shortage


def cache_bytes(num_teachers: int, views: int, num_images: int, num_classes: int) -> int:
    return num_teachers * views * num_images * num_classes * 2  # float16


class TeacherLogitCache:
    """Replays cached teacher logits: a Batch (with its view indices) -> logits (K, B, C).

    `set_epoch(e)` (called by kd.engine.fit before each epoch, as a DistributedSampler's is) makes sure
    the epoch's view is there: loaded from its files, or computed by one pass of each teacher and saved.
    `fill(views)` does the same for any views (a sweep's preparation, tests). Under torchrun process 0
    computes a missing view while the others wait, then every process loads its files.
    """

    def __init__(self, teachers: Sequence[nn.Module], identities: Sequence[str], batches, precision: Precision,
                 cache_dir: Path, world: World | None = None):
        if batches.pool is None:
            raise ValueError("cached teacher logits need batches drawn from a view pool")
        self.teachers, self.identities, self.batches = list(teachers), list(identities), batches
        self.precision, self.cache_dir, self.world = precision, Path(cache_dir), world
        self.store = DiskViews(len(self.teachers)) if on_disk(batches) else \
            MemoryViews(len(self.teachers), len(batches.pool), len(batches.split), precision.device)
        self.built: list[int] = []

    def paths(self, view: int) -> list[Path]:
        return [self.cache_dir / f"{cache_key(t, self.batches, view, self.precision.name)}{self.store.suffix}"
                for t in self.identities]

    def set_epoch(self, epoch: int) -> None:
        self.fill([epoch % len(self.batches.pool)])

    def fill(self, views: Iterable[int]) -> None:
        for view in views:
            if view not in self.store:
                with main_process_first(self.world) if self.world else nullcontext():
                    self._load_or_build(view)

    def __call__(self, batch: Batch) -> torch.Tensor:
        if batch.view is None:
            raise ValueError("cached teacher logits need batches drawn from a view pool")
        return self.store.rows(batch)

    @property
    def nbytes(self) -> int:
        return self.store.nbytes

    def _load_or_build(self, view: int) -> None:
        started, paths = time.perf_counter(), self.paths(view)
        missing = [i for i, path in enumerate(paths) if not path.is_file()]
        for i in missing:
            logits = view_logits(self.teachers[i], self.batches, self.precision, view)
            atomic_write(paths[i], lambda tmp: self.store.write(logits, len(self.batches.split), Path(tmp)))
        self.store.load(view, paths)
        if missing:
            self.built.append(view)
            log.info("teacher-logit cache: view %d of %d computed for %d of %d teachers in %.1fs (%s)", view + 1,
                     len(self.batches.pool), len(missing), len(paths), time.perf_counter() - started, self.cache_dir)


class MemoryViews:
    """The cached views in one (K, V, N, C) float16 tensor on the training device. A view not yet
    loaded is NaN, so a batch of it could never pass for real targets."""

    suffix = ".safetensors"

    def __init__(self, teachers: int, views: int, images: int, device: torch.device):
        self.logits: torch.Tensor | None = None
        self.shape, self.device, self.loaded = (teachers, views, images), device, set()

    def __contains__(self, view: int) -> bool:
        return view in self.loaded

    @staticmethod
    def write(logits: Iterator[tuple[torch.Tensor, torch.Tensor]], images: int, path: Path) -> None:
        """One teacher's (N, C) logits of a view, from `view_logits`' batches in order, as a safetensors file."""
        save_file({"logits": torch.cat([batch for _, batch in logits]).cpu()}, str(path))

    def load(self, view: int, paths: list[Path]) -> None:
        stacked = torch.stack([load_file(str(path), device=str(self.device))["logits"] for path in paths])
        if self.logits is None:
            self.logits = torch.full((*self.shape, stacked.shape[-1]), torch.nan, dtype=torch.float16,
                                     device=self.device)
        self.logits[:, view] = stacked
        self.loaded.add(view)

    def rows(self, batch: Batch) -> torch.Tensor:
        return self.logits[:, batch.view, batch.index]

    @property
    def nbytes(self) -> int:
        return 0 if self.logits is None else self.logits.numel() * 2


class DiskViews:
    """The cached views of a streamed split: per view, one memory-mapped (N, C) float16 array per teacher."""

    suffix = ".npy"

    def __init__(self, teachers: int):
        self.teachers, self.arrays = teachers, {}

    def __contains__(self, view: int) -> bool:
        return view in self.arrays

    @staticmethod
    def write(logits: Iterator[tuple[torch.Tensor, torch.Tensor]], images: int, path: Path) -> None:
        """One teacher's (N, C) logits of a view written to a .npy file one batch at a time (never held whole)."""
        array = None
        for index, batch in logits:
            if array is None:
                array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(images, batch.shape[1]))
            array[index.cpu().numpy()] = batch.cpu().numpy()
        array.flush()
        del array  # closes the map before the file is renamed

    def load(self, view: int, paths: list[Path]) -> None:
        self.arrays[view] = [np.load(path, mmap_mode="r") for path in paths]

    def rows(self, batch: Batch) -> torch.Tensor:
        view, index = batch.view.cpu().numpy(), batch.index.cpu().numpy()
        first = self.arrays[int(view[0])]
        out = np.empty((self.teachers, len(index), first[0].shape[1]), dtype=np.float16)
        for v in np.unique(view):
            rows = view == v
            for k, array in enumerate(self.arrays[int(v)]):
                out[k, rows] = array[index[rows]]
        return torch.from_numpy(out).to(batch.x.device, non_blocking=True)

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for arrays in self.arrays.values() for array in arrays)


@torch.inference_mode()
def view_logits(teacher: nn.Module, batches, precision: Precision, view: int):
    """(image indices, the teacher's float16 logits) for pooled view `view` of every image, in fixed
    batches of BUILD_BATCH_SIZE: the same floats whichever run or process computes them."""
    teacher.eval()
    bar = tqdm(batches.view_batches(view, BUILD_BATCH_SIZE), total=-(-len(batches.split) // BUILD_BATCH_SIZE),
               desc=f"caching teacher logits, view {view + 1}", leave=False, dynamic_ncols=True)
    for batch in bar:
        with precision.autocast():
            yield batch.index, teacher(batch.x).to(torch.float16)
