"""Data sources, fixed splits, and a device-resident batch iterator with batched augmentation.

The built-in datasets, and image folders that fit the memory budget, are loaded into memory: each
split is one uint8 tensor (N, C, H, W) (`Split`). Batches are sliced, augmented and scaled to [0, 1]
on the training device; each model normalises its own input (see kd.models.Normalized). A larger
image folder is kept as a list of files (kd.streaming.FileSplit), decoded batch by batch; both kinds
take their batches from the same plan (kd.batches.BatchPlan).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from kd.augment import center_crop
from kd.batches import Batch, PlannedBatches, blend
from kd.config import STORAGES, TaskConfig, list_class_folders
from kd.errors import UserError
from kd.images import IMAGE_SUFFIXES, list_images, read_image
from kd.streaming import FileSplit

REPO_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    input_size: int | None = None  # what the model is fed (images centre-cropped, or cropped at random); None: H

    def __post_init__(self):
        if len(self.images) != len(self.labels):
            raise ValueError("images and labels differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "Split":
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def image(self, i: int) -> torch.Tensor:
        """Image i as uint8 (C, H, W)."""
        return self.images[i]

    @cached_property  # a run checks it for resume and for its cache key: hash once
    def fingerprint(self) -> str:
        """A hash of every image and label: what a teacher-logit cache and a resumed run are checked against."""
        digest = hashlib.sha256()
        digest.update(self.images.cpu().numpy().tobytes())
        digest.update(self.labels.cpu().numpy().tobytes())
        return digest.hexdigest()

    def batches(self, batch_size: int, device, **options) -> "Batches":
        """This split's batches on `device` (see `Batches` for the options)."""
        return Batches(self, batch_size, device, **options)


@dataclass(frozen=True)
class TaskData:
    train: Split | FileSplit
    val: Split | FileSplit
    test: Split | FileSplit
    source: str  # where the data came from, for logs and reports
    storage: str = "held in memory"  # how the splits are read, and why (kd.data.choose_storage)

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


RESIDENT_BUDGET_BYTES = 4 * 10 ** 9  # data.storage auto holds decoded splits in memory up to this size


def load_task_data(task: TaskConfig, data_dir: str | os.PathLike | None = None, storage: str | None = None,
                   num_workers: int | None = None) -> TaskData:
    """Load the task's dataset, split it the fixed way, resize to the task's input size.

    A split the source does not provide is carved, stratified, from the training pool: first the
    test split (data.test_size), then the validation split (data.val_size), seeded by data.split_seed.
    `data_dir` overrides where Fashion-MNIST or an image folder is read from. An image folder is
    decoded into memory or streamed from its files by `num_workers` processes (default: from the CPU
    count), as `storage` (default: the config's data.storage) says; see `choose_storage`.
    """
    storage = storage or task.data.storage
    check_storage(task, storage)  # before any reading
    arrays, source = _read_source(task, data_dir)
    if "test" not in arrays:
        arrays["train"], arrays["test"] = _stratified_split(*arrays["train"], task.data.test_size,
                                                            task.data.split_seed)
    if "val" not in arrays:
        arrays["train"], arrays["val"] = _stratified_split(*arrays["train"], task.data.val_size, task.data.split_seed)
    names = ("train", "val", "test")
    for name in names:
        if len(arrays[name][1]) == 0:
            raise UserError(f"the {name} split of task {task.name} is empty; check data.val_size/test_size")
    stream, why = choose_storage(task, storage, sum(len(arrays[n][1]) for n in names))
    if stream:
        workers = default_workers() if num_workers is None else num_workers
        splits = [FileSplit(tuple(paths), torch.from_numpy(labels), task.data.channels, task.decode_size, workers,
                            task.data.input_size) for paths, labels in (arrays[n] for n in names)]
        source += f", streamed from its files by {workers} worker process(es)"
    else:
        splits = [_to_split(*_decoded(*arrays[n], task), task) for n in names]
    return TaskData(*splits, source=source, storage=f"{'streamed from disk' if stream else 'held in memory'} ({why})")


def check_storage(task: TaskConfig, storage: str) -> None:
    if storage not in STORAGES:
        raise UserError(f"data.storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    if storage == "stream" and task.data.source != "image_folder":
        raise UserError(f"data.storage stream reads image files; task {task.name}'s source {task.data.source} "
                        "is a built-in dataset, held in memory (use memory or auto)")


def choose_storage(task: TaskConfig, storage: str, count: int) -> tuple[bool, str]:
    """(stream the images?, why). The built-in datasets are always held in memory; an image folder is
    streamed when asked to, or with `auto` when its decoded splits exceed RESIDENT_BUDGET_BYTES."""
    if task.data.source != "image_folder":
        return False, f"the built-in {task.data.source} dataset"
    if storage != "auto":
        return storage == "stream", f"data.storage {storage}"
    decoded = count * task.data.channels * task.decode_size ** 2
    fits = decoded <= RESIDENT_BUDGET_BYTES
    return not fits, (f"data.storage auto: {count} images take {decoded / 1e9:.2f} GB decoded, "
                      f"{'within' if fits else 'over'} the {RESIDENT_BUDGET_BYTES / 1e9:.1f} GB budget for memory")


def default_workers() -> int:
    """Decoding processes per loader: the process's share of the CPUs less one for training, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(0, min(8, per_process - 1))


def _read_source(task: TaskConfig, data_dir) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """({split name: (images, labels)} for the splits the source provides, a description of the source);
    an image folder's "images" are its file paths, decoded only once the storage is chosen."""
    if task.data.source == "digits":
        images, labels, source = _load_digits()
        return {"train": (images, labels)}, source
    if task.data.source == "image_folder":
        return _load_image_folder(task, Path(data_dir) if data_dir else task.data_root)
    (train_x, train_y, test_x, test_y), source = _load_fashion_mnist(data_dir)
    return {"train": (train_x, train_y), "test": (test_x, test_y)}, source


def _load_image_folder(task: TaskConfig, root: Path):
    """root/train/<class>/*, and root/val/, root/test/ where present, listed in the task's class order."""
    if not (root / "train").is_dir():
        raise UserError(f"{root} has no train/ folder; an image_folder task needs {root}/train/<class>/<images>")
    arrays = {name: _list_image_split(root / name, task) for name in ("train", "val", "test")
              if (root / name).is_dir()}
    return arrays, f"image folder {root} ({', '.join(arrays)})"


def _list_image_split(folder: Path, task: TaskConfig) -> tuple[np.ndarray, np.ndarray]:
    """Every image file below folder/<class>/ and its label, in the task's class order: (paths, labels)."""
    found = list_class_folders(folder)
    unknown = [name for name in found if name not in task.classes]
    if unknown:
        raise UserError(f"{folder}: folder(s) {', '.join(unknown)} are not among the task's classes "
                        f"({', '.join(task.classes)}); add them to `classes` in the config or move them out")
    per_class = [list_images(folder / name) if name in found else [] for name in task.classes]
    missing = [name for name, paths in zip(task.classes, per_class) if not paths]
    if missing:
        raise UserError(f"{folder} has no images of class(es) {', '.join(missing)} (no folder, or no "
                        f"{'/'.join(IMAGE_SUFFIXES)} files in it); every split needs each class")
    paths = np.empty(sum(map(len, per_class)), dtype=object)
    paths[:] = [path for class_paths in per_class for path in class_paths]
    return paths, np.array([label for label, class_paths in enumerate(per_class) for _ in class_paths], dtype=np.int64)


def _decoded(images: np.ndarray, labels: np.ndarray, task: TaskConfig) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 arrays: file paths (an image folder's) are read and resized to the task's decode size."""
    if images.dtype != object:
        return images, labels
    decoded = [read_image(path, task.data.channels, task.decode_size)
               for path in tqdm(images, desc=f"reading {len(images)} images", leave=False)]
    return np.stack(decoded), labels


def _load_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    # sklearn's digits are 0..16 intensities; scale to the 0..255 range of every other source.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64), "scikit-learn digits"


def fashion_mnist_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    """Where Fashion-MNIST is looked for, in order: a given --data_dir alone (and torchvision's layout
    inside it), else data/TaskB/ and then the system's dataset package."""
    if data_dir:
        return [Path(data_dir), Path(data_dir) / "FashionMNIST" / "raw"]
    base = REPO_DATA_DIR / "TaskB"
    return [base, base / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST]


def _load_fashion_mnist(data_dir):
    if data_dir and not Path(data_dir).is_dir():
        raise UserError(f"--data_dir {data_dir} does not exist; pass the folder holding Fashion-MNIST's four IDX "
                        "files, or leave --data_dir out to use data/TaskB/ or the system's dataset package")
    folders = fashion_mnist_dirs(data_dir)
    for folder in folders:
        arrays = _read_idx_folder(folder)
        if arrays is not None:
            return arrays, f"Fashion-MNIST from {folder}"
    arrays = _download_fashion_mnist(data_dir)
    if arrays is None and data_dir:
        raise UserError(f"--data_dir {data_dir} holds no Fashion-MNIST IDX files ({', '.join(FASHION_FILES.values())}, "
                        "optionally .gz) and torchvision could not download them there (offline?)")
    if arrays is None:
        raise UserError(
            f"Fashion-MNIST not found: put its four IDX files in {folders[0]} (or pass --data_dir), "
            "or `apt-get install dataset-fashion-mnist`, or run once online so torchvision can download it")
    return arrays, "Fashion-MNIST downloaded by torchvision"


def _read_idx_folder(folder: Path):
    paths = {}
    for key, stem in FASHION_FILES.items():
        found = [p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()]
        if not found:
            return None
        paths[key] = found[0]
    arrays = {key: _read_idx(path) for key, path in paths.items()}
    return (arrays["train_images"], arrays["train_labels"].astype(np.int64),
            arrays["test_images"], arrays["test_labels"].astype(np.int64))


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format): magic, dims, then raw uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).copy()  # writable for torch
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def _download_fashion_mnist(data_dir):
    from torchvision.datasets import FashionMNIST

    root = Path(data_dir) if data_dir else REPO_DATA_DIR / "TaskB"
    try:
        train = FashionMNIST(root, train=True, download=True)
        test = FashionMNIST(root, train=False, download=True)
    except Exception:  # any network or disk failure means "not available"
        return None
    return (train.data.numpy(), train.targets.numpy().astype(np.int64),
            test.data.numpy(), test.targets.numpy().astype(np.int64))


def _stratified_split(images, labels, size, seed):
    """Split off `size` (fraction, or count if >= 1) of the samples, stratified by label."""
    from sklearn.model_selection import train_test_split

    size = int(size) if size >= 1 else float(size)
    if isinstance(size, int) and size >= len(labels):
        raise UserError(f"cannot hold out {size} images from a pool of {len(labels)}; lower data.val_size/test_size")
    try:
        keep_x, held_x, keep_y, held_y = train_test_split(
            images, labels, test_size=size, random_state=seed, stratify=labels)
    except ValueError as err:  # e.g. a class with a single image cannot be stratified
        raise UserError(f"cannot carve a stratified split of {size} from {len(labels)} images ({err}); add images "
                        "or provide the split as a folder") from None
    return (keep_x, keep_y), (held_x, held_y)


def _to_split(images: np.ndarray, labels: np.ndarray, task: TaskConfig) -> Split:
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.shape[1] != task.data.channels:
        raise UserError(f"task {task.name} expects {task.data.channels} channel(s), data has {x.shape[1]}")
    x = resize_uint8(x, task.decode_size)
    return Split(x.contiguous(), torch.from_numpy(np.asarray(labels, dtype=np.int64)), task.data.input_size)


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


class Batches(PlannedBatches):
    """Iterate a resident Split in Batch tuples of float [0, 1] images on `device`, in the order of a
    `BatchPlan`; augmentation runs on the whole batch at once, on the device. Options: `PlannedBatches`."""

    def __init__(self, split: Split, batch_size: int, device, **options):
        super().__init__(split.to(device), batch_size, device, **options)

    def __iter__(self) -> Iterator[Batch]:
        for idx, params, view in self.plan:
            yield self.batch(idx, view) if view is not None else self._make_batch(idx, params, None)

    def view_batches(self, view: int, batch_size: int) -> Iterator[Batch]:
        """Every image of the split in order, as pooled view `view`: what a teacher-logit cache is built from."""
        n = len(self.split)
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(start + batch_size, n))
            yield self.batch(idx, torch.full_like(idx, view))

    def batch(self, idx: torch.Tensor, view: torch.Tensor | None = None) -> Batch:
        """The images at `idx`: pooled view `view` of each (blended with its partner's where the pool
        blends), or un-augmented without views."""
        idx, view = idx.cpu(), None if view is None else view.cpu()  # the pool's parameters live on the CPU
        batch = self._view(idx, view)
        if view is None or not self.pool.mixup:
            return batch
        partner, share = self.pool.pairing_at(view, idx)
        return blend(batch, self._view(partner, view), share.to(self.device))

    def _view(self, idx: torch.Tensor, view: torch.Tensor | None) -> Batch:
        params = self.pool.params_at(view, idx) if self.augmenter is not None and view is not None else None
        return self._make_batch(idx, params, view)

    def _make_batch(self, idx: torch.Tensor, params: torch.Tensor | None, view: torch.Tensor | None) -> Batch:
        """The batch of CPU indices `idx`, augmented with CPU `params`, moved to the device."""
        idx, params, view = (t if t is None else t.to(self.device) for t in (idx, params, view))
        x = self.split.images[idx]
        x = center_crop(x, self.input_size) if params is None else self.augmenter.apply(x, params)
        return Batch(x.float().div_(255.0), self.split.labels[idx], idx, view)
