"""The streaming data path: image files decoded batch by batch by DataLoader worker processes.

For image folders too large to hold decoded (kd.data.choose_storage): a `FileSplit`. The batches are those of the
resident path: the same `BatchPlan` decides each batch's images and augmentation parameters in the
main process, from (seed, epoch), so shuffling, crops and flips do not depend on the workers, a
resumed run is exact, and under torchrun each process reads only its share of every global batch.
The workers read, resize and augment single images (torchvision transforms v2); batches arrive in
pinned memory on CUDA and are copied without blocking.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from kd.augment import center_crop
from kd.batches import Augment, Batch, BatchPlan, PlannedBatches, ViewPool, input_size
from kd.errors import UserError
from kd.images import read_image

log = logging.getLogger("kd")
Item = tuple[int, tuple[int, ...] | None, int | None]  # (image index, augmentation params, pooled view)


@dataclass(frozen=True)
class FileSplit:
    """A split read from its image files batch by batch, never held whole (data.storage stream)."""

    paths: tuple[Path, ...]
    labels: torch.Tensor  # int64 (N,)
    channels: int
    size: int  # every image is resized to size x size
    num_workers: int  # DataLoader worker processes that decode the files
    input_size: int | None = None  # what the model is fed (see kd.data.Split); None: size

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
        """This split's batches on `device`, decoded by worker processes (`StreamBatches`)."""
        return StreamBatches(self, batch_size, device, **options)


class ImageFiles(Dataset):
    """Decodes one image per item: read and resized like the resident path (kd.images.read_image), then
    augmented with the given parameters, or else centre-cropped to the model's input. An unreadable file
    gives None, reported by `collate`."""

    def __init__(self, split: FileSplit, augment: Augment | None):
        self.split, self.augment, self.input_size = split, augment, input_size(split)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: Item):
        index, params, view = item
        path = self.split.paths[index]
        try:
            image = torch.from_numpy(read_image(path, self.split.channels, self.split.size))
        except UserError as err:
            return None, str(err)
        image = center_crop(image, self.input_size) if params is None else self.augment.apply_one(image, params)
        return (image, int(self.split.labels[index]), index, view), None


def collate(samples: list) -> tuple:
    """((images uint8 (B, C, H, W), labels, indices, views or None), [unreadable file messages]); the batch
    is None when none of its files could be read."""
    good = [sample for sample, _ in samples if sample is not None]
    bad = [error for sample, error in samples if sample is None]
    if not good:
        return None, bad
    images, labels, indices, views = zip(*good)
    view = None if views[0] is None else torch.tensor(views)
    return (torch.stack(images), torch.tensor(labels), torch.tensor(indices), view), bad


class StreamBatches(PlannedBatches):
    """Iterate a FileSplit in Batch tuples of float [0, 1] images on `device`, like kd.data.Batches
    (the same options, see `PlannedBatches`, and the same batches for the same seed), with the images
    decoded by `split.num_workers` worker processes (0: in this process).

    An unreadable image found mid-epoch is skipped: its batch is one image shorter, and its path and
    the reason are logged once per loader. A batch of nothing but unreadable files stops the run.
    """

    def __init__(self, split: FileSplit, batch_size: int, device, **options):
        if options.get("mixup"):  # a blend would need its partner's file decoded beside each image's
            raise ValueError("a streamed split's pooled views are not blended; its mixup runs online (kd.engine.Mixup)")
        super().__init__(split, batch_size, device, **options)
        self.reported: set[str] = set()
        self._loader = self._make_loader(PlanItems(self.plan, self.pool, self.augmenter), persistent=True)

    def __iter__(self) -> Iterator[Batch]:
        return self._batches(self._loader)

    def view_batches(self, view: int, batch_size: int) -> Iterator[Batch]:
        """Every image of the split in order, as pooled view `view`: what a teacher-logit cache is built from."""
        n = len(self.split)
        starts = range(0, n, batch_size)
        items = [[pooled_item(i, view, self.pool, self.augmenter) for i in range(s, min(s + batch_size, n))]
                 for s in starts]
        return self._batches(self._make_loader(items, persistent=False))

    def _make_loader(self, batch_sampler: Iterable[list[Item]], persistent: bool) -> DataLoader:
        """A DataLoader with a generator of its own: a loader draws its workers' base seed when it starts,
        from torch's global generator unless given one, and that draw would shift the global stream that
        mixup and the checkpoints' RNG states follow (persistent workers start once per process, so a
        resumed run would draw where the uninterrupted one did not). The workers draw nothing random."""
        workers = self.split.num_workers
        return DataLoader(ImageFiles(self.split, self.augmenter), batch_sampler=batch_sampler, num_workers=workers,
                          collate_fn=collate, pin_memory=self.device.type == "cuda",
                          persistent_workers=persistent and workers > 0, prefetch_factor=2 if workers else None,
                          generator=torch.Generator())

    def _batches(self, loader: DataLoader) -> Iterator[Batch]:
        for batch, bad in loader:
            self._report(bad)
            if batch is None:
                raise UserError(f"every image of a batch is unreadable, e.g. {bad[0]}; check the data folder")
            images, labels, indices, view = (t if t is None else t.to(self.device, non_blocking=True) for t in batch)
            yield Batch(images.float().div_(255.0), labels, indices, view)

    def _report(self, errors: list[str]) -> None:
        for error in errors:
            if error not in self.reported:
                self.reported.add(error)
                log.warning("skipped an unreadable image: %s", error)


def pooled_item(index: int, view: int, pool: ViewPool, augment: Augment | None) -> Item:
    """What a worker needs for pooled view `view` of an image: its index, augmentation parameters, the view."""
    return index, None if augment is None else tuple(pool.params(view)[index].tolist()), view


class PlanItems:
    """The batch sampler of the training loader: each batch of the plan as per-image items, drawn in the
    main process, so the workers decode what the plan says and nothing depends on their number.

    It holds the plan, not the StreamBatches: a reference back would make a cycle that only the garbage
    collector frees, which may then run in a worker forked later and fail to stop this loader's workers.
    """

    def __init__(self, plan: BatchPlan, pool: ViewPool | None, augment: Augment | None):
        self.plan, self.pool, self.augment = plan, pool, augment

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[list[Item]]:
        for idx, params, view in self.plan:
            if view is not None:
                yield [pooled_item(i, v, self.pool, self.augment) for i, v in zip(idx.tolist(), view.tolist())]
            elif params is not None:
                yield [(i, tuple(p), None) for i, p in zip(idx.tolist(), params.tolist())]
            else:
                yield [(i, None, None) for i in idx.tolist()]
