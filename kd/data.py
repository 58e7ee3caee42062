"""Data sources, fixed splits, and a device-resident batch iterator with batched augmentation.

Every source (the built-in datasets and a folder of image files) is loaded into memory, so every
split is kept as one uint8 tensor (N, C, H, W). Batches are sliced, augmented and scaled to [0, 1]
on the training device; each model normalises its own input (see kd.models.Normalized).
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
from tqdm import tqdm

from kd.config import AugmentSpec, TaskConfig, list_class_folders
from kd.errors import UserError

REPO_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


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
    """Load the task's dataset, split it the fixed way, resize to the task's input size.

    A split the source does not provide is carved, stratified, from the training pool: first the
    test split (data.test_size), then the validation split (data.val_size), seeded by data.split_seed.
    `data_dir` overrides where Fashion-MNIST or an image folder is read from.
    """
    arrays, source = _read_source(task, data_dir)
    if "test" not in arrays:
        arrays["train"], arrays["test"] = _stratified_split(*arrays["train"], task.data.test_size,
                                                            task.data.split_seed)
    if "val" not in arrays:
        arrays["train"], arrays["val"] = _stratified_split(*arrays["train"], task.data.val_size, task.data.split_seed)
    splits = [_to_split(*arrays[name], task) for name in ("train", "val", "test")]
    for name, split in zip(("train", "val", "test"), splits):
        if len(split) == 0:
            raise UserError(f"the {name} split of task {task.name} is empty; check data.val_size/test_size")
    return TaskData(*splits, source=source)


def _read_source(task: TaskConfig, data_dir) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """({split name: (images, labels)} for the splits the source provides, a description of the source)."""
    if task.data.source == "digits":
        images, labels, source = _load_digits()
        return {"train": (images, labels)}, source
    if task.data.source == "image_folder":
        return _load_image_folder(task, Path(data_dir) if data_dir else task.data_root)
    (train_x, train_y, test_x, test_y), source = _load_fashion_mnist(data_dir)
    return {"train": (train_x, train_y), "test": (test_x, test_y)}, source


def _load_image_folder(task: TaskConfig, root: Path):
    """root/train/<class>/*, and root/val/, root/test/ where present, read in the task's class order."""
    if not (root / "train").is_dir():
        raise UserError(f"{root} has no train/ folder; an image_folder task needs {root}/train/<class>/<images>")
    arrays = {name: _read_image_split(root / name, task) for name in ("train", "val", "test")
              if (root / name).is_dir()}
    return arrays, f"image folder {root} ({', '.join(arrays)})"


def _read_image_split(folder: Path, task: TaskConfig) -> tuple[np.ndarray, np.ndarray]:
    """Every image below folder/<class>/, converted and resized like the task's input; (images, labels)."""
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
    files = [(path, label) for label, paths in enumerate(per_class) for path in paths]
    images = [read_image(path, task.data.channels, task.data.input_size)
              for path, _ in tqdm(files, desc=f"reading {folder}", leave=False)]
    return np.stack(images), np.array([label for _, label in files], dtype=np.int64)


def list_images(folder: Path) -> list[Path]:
    """The image files below `folder` (recursively, by suffix, skipping hidden files and folders such as
    .ipynb_checkpoints), sorted so the order is the same everywhere."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def read_image(path: Path, channels: int, size: int) -> np.ndarray:
    """One image file as uint8 (channels, size, size): converted to grayscale (1) or RGB (3) and
    resized to size x size (bilinear, the aspect ratio is not kept); an unreadable file is a UserError."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            image = image.resize((size, size), Image.Resampling.BILINEAR)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # what PIL raises on bad files
        raise UserError(f"cannot read image {path}: {err}") from None
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


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


class Batch(NamedTuple):
    x: torch.Tensor  # float images in [0, 1], (B, C, H, W)
    y: torch.Tensor  # labels (B,)
    index: torch.Tensor  # positions of the images in the split (B,)
    view: torch.Tensor | None  # which pooled view of each image (B,), when a view pool is used


def _generator(*seeds: int) -> torch.Generator:
    """A CPU generator seeded from several integers (seed, epoch, stream...), the same on every run.

    Always on the CPU: CUDA's generator (Philox) draws other numbers than the CPU's (mt19937) for the
    same seed, and a run's shuffling, crops and cached view pool must not depend on its device.
    """
    combined = 0
    for value in seeds:
        combined = (combined * 1_000_003 + value) % (2 ** 63)
    g = torch.Generator()
    g.manual_seed(combined)
    return g


class Batches:
    """Iterate a Split in Batch tuples of float [0, 1] images on `device`.

    Shuffling and augmentation draw from generators seeded by (seed, epoch), so an epoch's
    batches are reproducible and independent of what ran before. With `views=V`, augmentation
    comes from a fixed pool of V views per image, drawn once from `pool_seed`; each epoch picks
    one of them per image. A pooled view can be replayed exactly, so its teacher logits can be
    computed once and cached (kd.cache). With `drop_last` (training) an incomplete last batch is
    left out, as timm's loader does: BatchNorm cannot train on a batch of one image at a 1x1 map, and
    with shuffling every image is still seen over the epochs.
    """

    def __init__(self, split: Split, batch_size: int, device, *, shuffle: bool = False,
                 augment: AugmentSpec | None = None, seed: int = 0, views: int | None = None,
                 pool_seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False):
        self.split = split.to(device)
        self.drop_last = drop_last
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
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
        return torch.stack([sample_augment_params(n, self.augment, _generator(self.pool_seed, v), "cpu")
                            for v in range(views)]).to(self.device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._batch_starts(len(self.split) + (-len(self.split)) % self.world_size))

    def _batch_starts(self, n: int) -> range:
        """Where each global batch starts in an order of n images; a split smaller than one global
        batch is a single (short) batch even with drop_last."""
        step = self.batch_size * self.world_size
        stop = n - n % step if self.drop_last and n >= step else n
        return range(0, stop, step)

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.split)
        order = torch.randperm(n, generator=_generator(self.seed, self.epoch, 0)) if self.shuffle else torch.arange(n)
        aug_gen = _generator(self.seed, self.epoch, 1)
        chosen = None if self.view_params is None else torch.randint(0, self.num_views, (n,), generator=aug_gen)
        for global_batch in self._global_batches(order):
            mine = self._share(len(global_batch))
            idx = global_batch[mine].to(self.device)
            if chosen is not None:
                yield self.batch(idx, chosen[global_batch[mine]].to(self.device))
            elif self.augment is not None:
                # drawn for the whole global batch, so each process augments its images differently
                # and the processes together augment exactly as one process would
                params = sample_augment_params(len(global_batch), self.augment, aug_gen, "cpu")[mine]
                yield self._make_batch(idx, params.to(self.device), None)
            else:
                yield self._make_batch(idx, None, None)

    def _global_batches(self, order: torch.Tensor) -> Iterator[torch.Tensor]:
        """Each global batch (batch_size x world_size images) of `order`.

        With several processes the order is padded by wrapping around to a multiple of the world
        size (as DistributedSampler does), so every process takes the same number of equal steps
        and the processes' parts of a global batch together are the single-process batch.
        """
        if self.world_size > 1:
            order = torch.cat([order, order[:(-len(order)) % self.world_size]])
        step = self.batch_size * self.world_size
        for start in self._batch_starts(len(order)):
            yield order[start:start + step]

    def _share(self, global_size: int) -> slice:
        """This process's part of a global batch of `global_size` images."""
        share = global_size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def batch(self, idx: torch.Tensor, view: torch.Tensor | None = None) -> Batch:
        """The images at `idx`: pooled view `view` of each, or un-augmented without views."""
        params = self.view_params[view, idx] if self.augment is not None and view is not None else None
        return self._make_batch(idx, params, view)

    def _make_batch(self, idx: torch.Tensor, params: torch.Tensor | None, view: torch.Tensor | None) -> Batch:
        x = self.split.images[idx]
        if params is not None:
            x = apply_augment(x, self.augment, params)
        return Batch(x.float().div_(255.0), self.split.labels[idx], idx, view)
