"""Data sources, fixed splits, the batch plan, and a device-resident batch iterator with batched augmentation.

The built-in datasets, and image folders that fit the memory budget, are loaded into memory: each
split is one uint8 tensor (N, C, H, W) (`Split`). Batches are sliced, augmented and scaled to [0, 1]
on the training device; each model normalises its own input (see kd.models.Normalized). A larger
image folder is kept as a list of files (`FileSplit`), whose batches kd.streaming decodes; both kinds
take their batches from the same `BatchPlan`.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Iterator
from typing import NamedTuple
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from kd.config import STORAGES, AugmentSpec, TaskConfig, list_class_folders
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
class FileSplit:
    """A split read from its image files batch by batch, never held whole (data.storage stream)."""

    paths: tuple[Path, ...]
    labels: torch.Tensor  # int64 (N,)
    channels: int
    size: int  # every image is resized to size x size
    num_workers: int  # DataLoader worker processes that decode the files

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.channels, self.size, self.size

    def image(self, i: int) -> torch.Tensor:
        return torch.from_numpy(read_image(self.paths[i], self.channels, self.size))

    @cached_property
    def fingerprint(self) -> str:
        """A hash of every file's path, size and modification time, and its label: a folder changed since
        a cache was built (or a run started) has another fingerprint, without reading every image."""
        digest = hashlib.sha256()
        for path, label in zip(self.paths, self.labels.tolist()):
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode())
        return digest.hexdigest()

    def batches(self, batch_size: int, device, **options):
        """This split's batches on `device`, decoded by worker processes (kd.streaming.StreamBatches)."""
        from kd.streaming import StreamBatches  # here: kd.streaming builds on this module

        return StreamBatches(self, batch_size, device, **options)


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
        splits = [FileSplit(tuple(paths), torch.from_numpy(labels), task.data.channels, task.data.input_size, workers)
                  for paths, labels in (arrays[n] for n in names)]
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
    decoded = count * task.data.channels * task.data.input_size ** 2
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
    """Images as uint8 arrays: file paths (an image folder's) are read and resized like the task's input."""
    if images.dtype != object:
        return images, labels
    decoded = [read_image(path, task.data.channels, task.data.input_size)
               for path in tqdm(images, desc=f"reading {len(images)} images", leave=False)]
    return np.stack(decoded), labels


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
    return np.ascontiguousarray(array[None] if channels == 1 else array.transpose(2, 0, 1))  # writable, for torch


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


def active_augment(augment: AugmentSpec | None) -> AugmentSpec | None:
    """The spec when it changes images, else None (no work per batch)."""
    return augment if augment and (augment.crop_padding or augment.hflip) else None


class ViewPool:
    """A pool of `size` augmented views per image. View v of every image is drawn on the CPU from its own
    generator (pool_seed, v), so a view is the same whatever the pool's size, the run's seed or its
    device, and is made only when first asked for. Without augmentation the pool is one view: the image."""

    def __init__(self, n: int, augment: AugmentSpec | None, size: int, pool_seed: int):
        self.n, self.augment, self.pool_seed = n, augment, pool_seed
        self.size = size if augment is not None else 1
        self._last: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.size

    def params(self, view: int) -> torch.Tensor:
        """(N, 3) augmentation parameters of view `view` of every image (zeros without augmentation)."""
        if not 0 <= view < self.size:
            raise IndexError(f"view {view} of a pool of {self.size}")
        if self._last is None or self._last[0] != view:  # an epoch asks for one view batch after batch
            params = torch.zeros((self.n, 3), dtype=torch.long) if self.augment is None else \
                sample_augment_params(self.n, self.augment, _generator(self.pool_seed, view), "cpu")
            self._last = (view, params)
        return self._last[1]

    def params_at(self, view: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(B, 3) parameters of pooled view view[i] of image index[i] (CPU tensors in and out)."""
        out = torch.empty((len(index), 3), dtype=torch.long)
        for v in view.unique().tolist():
            rows = view == v
            out[rows] = self.params(v)[index[rows]]
        return out

    def fingerprint(self, view: int) -> str:
        """A hash of view `view`'s exact parameters (every crop offset and flip, not only their seed)."""
        return hashlib.sha256(self.params(view).numpy().tobytes()).hexdigest()


class BatchPlan:
    """Which images, with which augmentation, make up each of this process's batches, epoch by epoch.

    The one source of order for both data paths (the resident `Batches` and kd.streaming's
    `StreamBatches`), so they give the same batches for the same seed. Shuffling and augmentation
    draw from CPU generators seeded by (seed, epoch): an epoch's batches are reproducible and
    independent of what ran before, which makes a resumed run exact. With `num_views` V, epoch e trains
    every image on pooled view e mod V instead of drawing new parameters: a run of at most V epochs sees
    a distinct view of each image every epoch, as online augmentation would. Yields (index, params,
    view) CPU tensors; params (B, 3) for fresh augmentation, view (B,) for a pooled one, else None.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool = False, augment: AugmentSpec | None = None,
                 seed: int = 0, num_views: int | None = None, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        self.n, self.batch_size, self.shuffle, self.augment = n, batch_size, shuffle, augment
        self.seed, self.num_views, self.drop_last = seed, num_views, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._batch_starts(self.n + (-self.n) % self.world_size))

    def _batch_starts(self, n: int) -> range:
        """Where each global batch starts in an order of n images; a split smaller than one global
        batch is a single (short) batch even with drop_last."""
        step = self.batch_size * self.world_size
        stop = n - n % step if self.drop_last and n >= step else n
        return range(0, stop, step)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
        n = self.n
        order = torch.randperm(n, generator=_generator(self.seed, self.epoch, 0)) if self.shuffle else torch.arange(n)
        aug_gen = _generator(self.seed, self.epoch, 1)
        for global_batch in self._global_batches(order):
            mine = self._share(len(global_batch))
            idx = global_batch[mine]
            if self.num_views is not None:
                yield idx, None, torch.full_like(idx, self.epoch % self.num_views)
            elif self.augment is not None:
                # drawn for the whole global batch, so each process augments its images differently
                # and the processes together augment exactly as one process would
                yield idx, sample_augment_params(len(global_batch), self.augment, aug_gen, "cpu")[mine], None
            else:
                yield idx, None, None

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


class PlannedBatches:
    """What both data paths share: a split, its augmentation, the pool of views and the BatchPlan.

    With `views=V`, augmentation comes from a `ViewPool` of V views per image drawn from `pool_seed`;
    epoch e trains on view e mod V. A pooled view can be replayed exactly, so its teacher logits can be
    computed once and cached (kd.cache). With `drop_last` (training) an
    incomplete last batch is left out, as timm's loader does: BatchNorm cannot train on a batch of one
    image at a 1x1 map, and with shuffling every image is still seen over the epochs.
    """

    def __init__(self, split, batch_size: int, device, *, shuffle: bool = False,
                 augment: AugmentSpec | None = None, seed: int = 0, views: int | None = None,
                 pool_seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False):
        self.split = split
        self.device = torch.device(device)
        self.augment = active_augment(augment)
        self.pool = ViewPool(len(split), self.augment, views, pool_seed) if views else None
        self.plan = BatchPlan(len(split), batch_size, shuffle=shuffle, augment=self.augment, seed=seed,
                              num_views=self.num_views, rank=rank, world_size=world_size, drop_last=drop_last)

    @property
    def num_views(self) -> int | None:
        return None if self.pool is None else len(self.pool)

    def set_epoch(self, epoch: int) -> None:
        self.plan.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.plan)


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
        """The images at `idx`: pooled view `view` of each, or un-augmented without views."""
        idx, view = idx.cpu(), None if view is None else view.cpu()  # the pool's parameters live on the CPU
        params = self.pool.params_at(view, idx) if self.augment is not None and view is not None else None
        return self._make_batch(idx, params, view)

    def _make_batch(self, idx: torch.Tensor, params: torch.Tensor | None, view: torch.Tensor | None) -> Batch:
        """The batch of CPU indices `idx`, augmented with CPU `params`, moved to the device."""
        idx, params, view = (t if t is None else t.to(self.device) for t in (idx, params, view))
        x = self.split.images[idx]
        if params is not None:
            x = apply_augment(x, self.augment, params)
        return Batch(x.float().div_(255.0), self.split.labels[idx], idx, view)
