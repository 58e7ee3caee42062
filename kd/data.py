"""Data sources, fixed splits, and a device-resident batch iterator with batched augmentation.

Both built-in datasets fit in memory, so every split is kept as one uint8 tensor (N, C, H, W).
Batches are sliced, augmented and scaled to [0, 1] on the training device; each model normalises
its own input (see kd.models.Normalized).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from typing import NamedTuple
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


def sample_augment_params(n: int, spec: AugmentSpec, generator: torch.Generator, device) -> torch.Tensor:
    """Per-image augmentation parameters (n, 3): crop offsets dy, dx in [0, 2 * padding] and a flip flag."""
    high = 2 * spec.crop_padding + 1
    dy = torch.randint(0, high, (n,), generator=generator, device=device)
    dx = torch.randint(0, high, (n,), generator=generator, device=device)
    flip = (torch.rand(n, generator=generator, device=device) < 0.5) & spec.hflip
    return torch.stack([dy, dx, flip.long()], dim=1)


def apply_augment(x: torch.Tensor, spec: AugmentSpec, params: torch.Tensor) -> torch.Tensor:
    """Random crop with zero padding and optional horizontal flip, batched on x's device."""
    n, c, h, w = x.shape
    if spec.crop_padding > 0:
        p = spec.crop_padding
        padded = F.pad(x, (p, p, p, p))
        rows = (params[:, 0, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (params[:, 1, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if spec.hflip:
        x = torch.where(params[:, 2, None, None, None].bool(), x.flip(-1), x)
    return x


def augment_batch(x: torch.Tensor, spec: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    return apply_augment(x, spec, sample_augment_params(len(x), spec, generator, x.device))


class Batch(NamedTuple):
    x: torch.Tensor  # float images in [0, 1], (B, C, H, W)
    y: torch.Tensor  # labels (B,)
    index: torch.Tensor  # positions of the images in the split (B,)
    view: torch.Tensor | None  # which pooled view of each image (B,), when a view pool is used


def _generator(device, *seeds: int) -> torch.Generator:
    """A generator seeded from several integers (seed, epoch, stream...), the same on every run."""
    combined = 0
    for value in seeds:
        combined = (combined * 1_000_003 + value) % (2 ** 63)
    g = torch.Generator(device=device)
    g.manual_seed(combined)
    return g


class Batches:
    """Iterate a Split in Batch tuples of float [0, 1] images on `device`.

    Shuffling and augmentation draw from generators seeded by (seed, epoch), so an epoch's
    batches are reproducible and independent of what ran before. With `views=V`, augmentation
    comes from a fixed pool of V views per image, drawn once from `pool_seed`; each epoch picks
    one of them per image. A pooled view can be replayed exactly, so its teacher logits can be
    computed once and cached (kd.cache).
    """

    def __init__(self, split: Split, batch_size: int, device, *, shuffle: bool = False,
                 augment: AugmentSpec | None = None, seed: int = 0, views: int | None = None,
                 pool_seed: int = 0):
        self.split = split.to(device)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.augment = augment if augment and (augment.crop_padding or augment.hflip) else None
        self.seed = seed
        self.epoch = 0
        self.pool_seed = pool_seed
        self.view_params = self._view_pool(views) if views else None

    @property
    def num_views(self) -> int | None:
        return None if self.view_params is None else len(self.view_params)

    def _view_pool(self, views: int) -> torch.Tensor:
        """(V, N, 3) augmentation parameters; a single un-augmented view without augmentation."""
        n = len(self.split)
        if self.augment is None:
            return torch.zeros((1, n, 3), dtype=torch.long, device=self.device)
        return torch.stack([sample_augment_params(n, self.augment, _generator(self.device, self.pool_seed, v),
                                                  self.device) for v in range(views)])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.split)
        order = (torch.randperm(n, generator=_generator(self.device, self.seed, self.epoch, 0), device=self.device)
                 if self.shuffle else torch.arange(n, device=self.device))
        aug_gen = _generator(self.device, self.seed, self.epoch, 1)
        chosen = None
        if self.view_params is not None:
            chosen = torch.randint(0, len(self.view_params), (n,), generator=aug_gen, device=self.device)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.batch(idx, None if chosen is None else chosen[idx], aug_gen)

    def batch(self, idx: torch.Tensor, view: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> Batch:
        """The images at `idx` (pooled view `view` of each, or a fresh augmentation from `generator`)."""
        x = self.split.images[idx]
        if self.augment is not None and view is not None:
            x = apply_augment(x, self.augment, self.view_params[view, idx])
        elif self.augment is not None and generator is not None:
            x = augment_batch(x, self.augment, generator)
        return Batch(x.float().div_(255.0), self.split.labels[idx], idx, view)
