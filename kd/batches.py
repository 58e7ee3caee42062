"""The batch plan: which images, in which order and with which augmentation, make up each batch.

Shared by both data paths, the resident one (kd.data.Batches) and the streamed one
(kd.streaming.StreamBatches), so they give the same batches for the same seed; the pool of
augmented views (`ViewPool`) is what the teacher-logit cache (kd.cache) stores logits for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from kd.augment import PadCropFlip, PhotoAugment, make_augment
from kd.config import AugmentSpec

Augment = PadCropFlip | PhotoAugment


class Mix(NamedTuple):
    """How a pooled view blended each image of a batch with a partner (see `ViewPool`)."""
    own_label: torch.Tensor  # each image's label (B,)
    partner_label: torch.Tensor  # its partner's label (B,)
    share: torch.Tensor  # the image's own share of the blend, mixup's lam (B,)

    def soft_labels(self, num_classes: int) -> torch.Tensor:
        """The blend's labels as class probabilities (B, C), blended as the images were."""
        share = self.share.unsqueeze(1)
        return share * F.one_hot(self.own_label, num_classes) + (1 - share) * F.one_hot(self.partner_label,
                                                                                          num_classes)


class Batch(NamedTuple):
    x: torch.Tensor  # float images in [0, 1], (B, C, H, W)
    y: torch.Tensor  # labels (B,); of a blended image, its larger part's
    index: torch.Tensor  # positions of the images in the split (B,)
    view: torch.Tensor | None  # which pooled view of each image (B,), when a view pool is used
    mix: Mix | None = None  # how a pooled view blended the images, when its pool blends


def blend(batch: Batch, partners: Batch, share: torch.Tensor) -> Batch:
    """Image i of `batch` blended with image i of `partners`, share[i] of it its own: the batch keeps
    its indices and views (a cached view's logits are those of the blend), its label is the larger part's."""
    lam = share.view(-1, *[1] * (batch.x.dim() - 1))
    x = lam * batch.x + (1 - lam) * partners.x
    y = torch.where(share >= 0.5, batch.y, partners.y)
    return batch._replace(x=x, y=y, mix=Mix(batch.y, partners.y, share))


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


def _rows_of_views(table, view: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` filled with row index[i] of table(view[i]), a per-view (N, ...) tensor, asking once per view."""
    for v in view.unique().tolist():
        rows = view == v
        out[rows] = table(v)[index[rows]]
    return out


class ViewPool:
    """A pool of `size` augmented views per image. View v of every image is drawn on the CPU from its own
    generator (pool_seed, v), so a view is the same whatever the pool's size, the run's seed or its
    device, and is made only when first asked for. Without augmentation or mixup the pool is one view:
    the image.

    With `mixup` (a Beta concentration a > 0) view v also blends each image i with a partner: the
    view is lam_i * (view v of i) + (1 - lam_i) * (view v of partner_i), partner a permutation of the
    split and lam_i ~ Beta(a, a), both drawn from (pool_seed, v, 1). A blend is then as exactly
    replayable as a crop, so the teachers' logits of the blended images can be cached: mixup's
    "function matching" at the cost of replayed logits. One lam per image, where online mixup
    (kd.engine.Mixup) draws one per batch and pairs images within it."""

    def __init__(self, n: int, augment: Augment | None, size: int, pool_seed: int, mixup: float = 0.0):
        self.n, self.augment, self.pool_seed, self.mixup = n, augment, pool_seed, mixup
        self.size = size if self.varies else 1
        self._last: tuple[int, torch.Tensor] | None = None
        self._last_pairing: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.size

    @property
    def varies(self) -> bool:
        """Whether views differ from one another (augmented or blended), so that replaying few costs."""
        return self.augment is not None or self.mixup > 0

    def _check(self, view: int) -> None:
        if not 0 <= view < self.size:
            raise IndexError(f"view {view} of a pool of {self.size}")

    def params(self, view: int) -> torch.Tensor:
        """(N, P) augmentation parameters of view `view` of every image (zeros without augmentation)."""
        self._check(view)
        if self._last is None or self._last[0] != view:  # an epoch asks for one view batch after batch
            params = torch.zeros((self.n, 3), dtype=torch.long) if self.augment is None else \
                self.augment.sample(self.n, _generator(self.pool_seed, view))
            self._last = (view, params)
        return self._last[1]

    def pairing(self, view: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(partner (N,), share (N,) float32) of view `view`: whom each image is blended with, and its lam."""
        if not self.mixup:
            raise ValueError("this view pool does not blend (mixup is 0)")
        self._check(view)
        if self._last_pairing is None or self._last_pairing[0] != view:
            g = _generator(self.pool_seed, view, 1)
            partner = torch.randperm(self.n, generator=g)
            # torch's Beta sampler takes no generator; numpy's does, seeded from this view's
            beta = np.random.default_rng(int(torch.randint(2 ** 62, (1,), generator=g)))
            share = torch.from_numpy(beta.beta(self.mixup, self.mixup, self.n).astype(np.float32))
            self._last_pairing = (view, partner, share)
        return self._last_pairing[1:]

    def pairing_at(self, view: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(partner (B,), share (B,)) of pooled view view[i] of image index[i] (CPU tensors in and out)."""
        return (_rows_of_views(lambda v: self.pairing(v)[0], view, index, torch.empty_like(index)),
                _rows_of_views(lambda v: self.pairing(v)[1], view, index, torch.empty(len(index))))

    def params_at(self, view: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(B, P) parameters of pooled view view[i] of image index[i] (CPU tensors in and out)."""
        out = torch.empty((len(index), 3 if self.augment is None else self.augment.width), dtype=torch.long)
        return _rows_of_views(self.params, view, index, out)

    def fingerprint(self, view: int) -> str:
        """A hash of view `view`'s exact parameters (every crop offset and flip, and with mixup every
        partner and share, not only their seed)."""
        digest = hashlib.sha256(self.params(view).numpy().tobytes())
        for part in self.pairing(view) if self.mixup else ():
            digest.update(part.numpy().tobytes())
        return digest.hexdigest()


class BatchPlan:
    """Which images, with which augmentation, make up each of this process's batches, epoch by epoch.

    The one source of order for both data paths (the resident `Batches` and kd.streaming's
    `StreamBatches`), so they give the same batches for the same seed. Shuffling and augmentation
    draw from CPU generators seeded by (seed, epoch): an epoch's batches are reproducible and
    independent of what ran before, which makes a resumed run exact. With `num_views` V, epoch e trains
    every image on pooled view e mod V instead of drawing new parameters: a run of at most V epochs sees
    a distinct view of each image every epoch, as online augmentation would. Yields (index, params,
    view) CPU tensors; params (B, P) for fresh augmentation, view (B,) for a pooled one, else None.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool = False, augment: Augment | None = None,
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
                yield idx, self.augment.sample(len(global_batch), aug_gen)[mine], None
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

    With `views=V`, augmentation comes from a `ViewPool` of V views per image drawn from `pool_seed`
    (blended with `mixup`, the Beta concentration: kd.data's resident batches only);
    epoch e trains on view e mod V. A pooled view can be replayed exactly, so its teacher logits can be
    computed once and cached (kd.cache). With `drop_last` (training) an
    incomplete last batch is left out, as timm's loader does: BatchNorm cannot train on a batch of one
    image at a 1x1 map, and with shuffling every image is still seen over the epochs.
    """

    def __init__(self, split, batch_size: int, device, *, shuffle: bool = False,
                 augment: AugmentSpec | None = None, seed: int = 0, views: int | None = None,
                 pool_seed: int = 0, mixup: float = 0.0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        if mixup and not views:
            raise ValueError("mixup blends pooled views only: give views=V")
        self.split = split
        self.device = torch.device(device)
        self.input_size = input_size(split)
        self.augmenter = make_augment(augment, split.image_shape[-1], self.input_size)
        self.augment = augment if self.augmenter else None  # the spec, for the cache's key
        self.pool = ViewPool(len(split), self.augmenter, views, pool_seed, mixup) if views else None
        self.plan = BatchPlan(len(split), batch_size, shuffle=shuffle, augment=self.augmenter, seed=seed,
                              num_views=self.num_views, rank=rank, world_size=world_size, drop_last=drop_last)

    @property
    def num_views(self) -> int | None:
        return None if self.pool is None else len(self.pool)

    def set_epoch(self, epoch: int) -> None:
        self.plan.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.plan)


def input_size(split) -> int:
    """The size the model is fed a split's images at: they are decoded at their own size, larger where
    training crops at random and evaluation centre-crops (kd.config.TaskConfig.decode_size)."""
    return split.input_size or split.image_shape[-1]
