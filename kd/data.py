"""Data sources, fixed splits, and a device-resident batch iterator with batched augmentation.

Both built-in datasets fit in memory, so every split is kept as one uint8 tensor (N, C, H, W).
Batches are sliced, augmented and scaled to [0, 1] on the training device; each model normalises
its own input (see kd.models.Normalized).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kd.config import AugmentSpec, TaskConfig
from kd.errors import UserError

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

    def __post_init__(self):
        if len(self.images) != len(self.labels):
            raise ValueError("images and labels differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class TaskData:
    train: Split
    val: Split
    test: Split
    source: str  # where the data came from, for logs and reports

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def load_task_data(task: TaskConfig, data_dir: str | os.PathLike | None = None) -> TaskData:
    """Load the task's dataset, split it the fixed way, resize to the task's input size."""
    if task.data.source == "digits":
        images, labels, source = _load_digits()
        pool, test = _stratified_split(images, labels, task.data.test_size, task.data.split_seed)
    else:
        (train_x, train_y, test_x, test_y), source = _load_fashion_mnist(data_dir)
        pool, test = (train_x, train_y), (test_x, test_y)
    train, val = _stratified_split(*pool, task.data.val_size, task.data.split_seed)
    splits = [_to_split(x, y, task) for x, y in (train, val, test)]
    for name, split in zip(("train", "val", "test"), splits):
        if len(split) == 0:
            raise UserError(f"the {name} split of task {task.name} is empty; check data.val_size/test_size")
    return TaskData(*splits, source=source)


def _load_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    # sklearn's digits are 0..16 intensities; scale to the 0..255 range of every other source.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64), "scikit-learn digits"


def fashion_mnist_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    """Where Fashion-MNIST is looked for, in order."""
    base = Path(data_dir) if data_dir else REPO_DATA_DIR / "TaskB"
    return [base, base / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST]


def _load_fashion_mnist(data_dir):
    folders = fashion_mnist_dirs(data_dir)
    for folder in folders:
        arrays = _read_idx_folder(folder)
        if arrays is not None:
            return arrays, f"Fashion-MNIST from {folder}"
    arrays = _download_fashion_mnist(data_dir)
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
    keep_x, held_x, keep_y, held_y = train_test_split(
        images, labels, test_size=size, random_state=seed, stratify=labels)
    return (keep_x, keep_y), (held_x, held_y)


def _to_split(images: np.ndarray, labels: np.ndarray, task: TaskConfig) -> Split:
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.shape[1] != task.data.channels:
        raise UserError(f"task {task.name} expects {task.data.channels} channel(s), data has {x.shape[1]}")
    x = resize_uint8(x, task.data.input_size)
    return Split(x.contiguous(), torch.from_numpy(np.asarray(labels, dtype=np.int64)))


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


def augment_batch(x: torch.Tensor, spec: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and optional horizontal flip, batched on x's device."""
    n, _, h, w = x.shape
    if spec.crop_padding > 0:
        p = spec.crop_padding
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=x.device)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if spec.hflip:
        flip = torch.rand(n, generator=generator, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


class Batches:
    """Iterate a Split in batches of float [0, 1] images on `device`.

    Shuffling and augmentation draw from generators seeded by (seed, epoch), so an epoch's
    batches are reproducible and independent of what ran before.
    """

    def __init__(self, split: Split, batch_size: int, device, *, shuffle: bool = False,
                 augment: AugmentSpec | None = None, seed: int = 0):
        self.split = split.to(device)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.augment = augment if augment and (augment.crop_padding or augment.hflip) else None
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    def _generator(self, offset: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + self.epoch * 2 + offset)
        return g

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split)
        order = (torch.randperm(n, generator=self._generator(0), device=self.device)
                 if self.shuffle else torch.arange(n, device=self.device))
        aug_gen = self._generator(1)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            x = self.split.images[idx]
            if self.augment:
                x = augment_batch(x, self.augment, aug_gen)
            yield x.float().div_(255.0), self.split.labels[idx]
