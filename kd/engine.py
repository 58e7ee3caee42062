"""Training and evaluation loops: one code path for CPU, CUDA and MPS, with optional mixed precision."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from tqdm import tqdm

from kd.batches import Batch
from kd.checkpoint import load_state_into
from kd.distributed import broadcast_tensors, reduce_sum
from kd.errors import UserError
from kd.distillers.base import Distiller

log = logging.getLogger("kd")
EVAL_BATCH_SIZE = 512  # validation and test batches: no gradients, so larger than training's


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU; an explicit device must exist."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    available = {"cpu": True, "cuda": cuda, "mps": mps}
    if name not in available:
        raise UserError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    if not available[name]:
        raise UserError(f"--device {name} was asked for but is not available here; use --device auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG's state, as tensors and plain values that weights-only loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                      "gauss": gauss},
            "random": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    r = state["random"]
    random.setstate((r["version"], tuple(r["internal"]), r["gauss_next"]))


@dataclass
class Precision:
    """Autocast dtype (None = full fp32) and the matching GradScaler (active for fp16 only)."""

    device: torch.device
    dtype: torch.dtype | None

    def __post_init__(self):
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext()

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def select_precision(device: torch.device, amp: bool) -> Precision:
    """Mixed precision on CUDA only: bf16 where the GPU runs it natively (Ampere and newer), else fp16
    with loss scaling."""
    if not amp or device.type != "cuda":
        return Precision(device, None)
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)  # emulated bf16 is slower than fp16
    return Precision(device, torch.bfloat16 if native_bf16 else torch.float16)


class WeightAverage:
    """An exponential moving average of a model's weights and buffers, updated after every optimiser step
    (timm's ModelEmaV3): the network a run validates, keeps and tests when --ema_decay is set.

    The decay ramps up as 1 - (1 + step) ** -0.75 to at most `decay` (timm's warm-up for runs of
    thousands of steps, not millions; it reaches 0.99 after 460 steps, 0.999 after 10,000): a fixed
    0.999 would still hold a fifth of the random start after 1,700 steps, four epochs of task B at
    batch 128. The average only reads the model, so training is the same with or without it, and it
    draws no random numbers.
    """

    WARMUP_POWER = 0.75

    def __init__(self, model: nn.Module, decay: float):
        self.source, self.steps = model, 0
        self.average = ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=self.WARMUP_POWER)

    @property
    def model(self) -> nn.Module:
        return self.average.module

    def synchronised(self) -> nn.Module:
        """The average with rank 0's BatchNorm statistics on every process of a distributed run: the
        weights agree everywhere, but each process's statistics follow its own shard of the batches
        (DDP itself broadcasts rank 0's at every forward), and every process validates the same network."""
        broadcast_tensors(self.model.buffers())
        return self.model

    def update(self) -> None:
        self.steps += 1
        self.average.update(self.source, step=self.steps)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict, source: str) -> None:
        load_state_into(self.model, state["model"], source)
        self.steps = state["steps"]


TeacherLogits = Callable[[Batch], torch.Tensor]  # a batch -> the teachers' logits (K, B, C)


def online_teachers(ensemble: nn.Module) -> TeacherLogits:
    """Run the teachers on every batch (the alternative is kd.cache's replayed logits)."""
    return lambda batch: ensemble(batch.x)


@dataclass(frozen=True)
class Mixup:
    """Mixup (Zhang et al., 2018): each batch is blended with a shuffled copy of itself, by one weight
    lam ~ Beta(concentration, concentration) per batch, and so are its one-hot labels.

    The teachers' targets are those of the blended images, so they describe exactly what the student
    sees: the "function matching" of Beyer et al. (2022), where mixup is what makes a patient teacher
    consistent. Draws come from torch's global generators, which checkpoints save, so a resumed run
    blends as the uninterrupted one would. A batch of a view pool that blends (kd.batches.ViewPool,
    whose blends the teacher-logit cache holds) is blended already and only gets its soft labels.
    """

    concentration: float
    num_classes: int

    def __call__(self, batch: Batch) -> tuple[Batch, torch.Tensor]:
        """(the blended batch, its soft labels (B, C)); the batch's labels stay the larger part's."""
        if batch.mix is not None:
            return batch, batch.mix.soft_labels(self.num_classes)
        lam = torch.distributions.Beta(self.concentration, self.concentration).sample().item()
        order = torch.randperm(len(batch.y), device=batch.x.device)
        labels = F.one_hot(batch.y, self.num_classes).float()
        x = lam * batch.x + (1 - lam) * batch.x[order]
        soft = lam * labels + (1 - lam) * labels[order]
        return batch._replace(x=x, y=batch.y if lam >= 0.5 else batch.y[order]), soft


@dataclass(frozen=True)
class Warmup:
    """A linear rise of the learning rate over a run's first `steps` optimiser steps: step s (from 0) runs
    at (s + 1) / steps of the rate the epoch's schedule sets, so no step runs at zero. With a cosine
    schedule it makes the one-cycle shape of fast-training recipes. It depends on the step's index alone,
    so a resumed run (which starts at an epoch's boundary) rises as the uninterrupted one would."""

    steps: int

    def factor(self, step: int) -> float:
        return min(1.0, (step + 1) / self.steps)


def train_one_epoch(model: nn.Module, batches: Iterable[Batch], optimizer: torch.optim.Optimizer,
                    criterion: Distiller, precision: Precision, teachers: TeacherLogits | None = None,
                    desc: str = "train", progress: bool = True, mixup: Mixup | None = None,
                    average: WeightAverage | None = None, warmup: Warmup | None = None,
                    first_step: int = 0) -> dict[str, float]:
    """One pass over `batches`; returns sample-mean loss, ce, kd, accuracy and teacher weights over the
    steps whose loss was finite, and how many steps were not (`skipped`). With `mixup`, every batch is
    blended first (teachers included) and accuracy counts the larger part's label; `average` is updated
    after every step; `warmup` scales the rate of the run's steps `first_step` on (this epoch's first) and
    leaves the scheduled rate in place at the end.

    A non-finite step is left out of the means rather than poisoning them: under fp16 the GradScaler
    skips such a step's update and lowers its scale, which is how mixed precision is meant to recover.
    """
    model.train()
    use_teachers = teachers is not None and criterion.uses_teachers
    sums = torch.zeros(4, device=precision.device)  # loss, ce, kd, correct (sample-weighted, finite steps)
    weight_sum, count = None, torch.zeros(2, device=precision.device)  # images in finite steps, skipped steps
    scheduled = [group["lr"] for group in optimizer.param_groups]
    for i, batch in enumerate(tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, disable=not progress)):
        if warmup is not None and first_step + i < warmup.steps:
            set_rates(optimizer, scheduled, warmup.factor(first_step + i))
        if batch.mix is not None and mixup is None:  # its hard label alone would hide the blend's other part
            raise ValueError("a blended batch (a view pool with mixup) needs mixup= for its soft labels")
        batch, targets = mixup(batch) if mixup else (batch, batch.y)
        x, y = batch.x, batch.y
        with precision.autocast():
            teacher_logits = teachers(batch) if use_teachers else None
            logits = model(x)
        parts, weights = criterion(logits, targets, teacher_logits)
        optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(parts.total).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update()
        if average is not None:
            average.update()
        n = torch.isfinite(parts.total.detach()).float() * len(y)  # 0 for a non-finite step; no sync
        correct = (logits.argmax(dim=1) == y).sum()
        step = torch.stack([parts.total.detach(), parts.ce, parts.kd, correct.float() / len(y)])
        sums += torch.where(n > 0, step * n, 0.0)
        if weights is not None:
            weighted = torch.where(n > 0, weights * n, 0.0)
            weight_sum = weighted if weight_sum is None else weight_sum + weighted
        count += torch.stack([n, (n == 0).float()])
    set_rates(optimizer, scheduled)  # the epoch scheduler (StepLR chains on it) and the checkpoint see its own
    images, skipped = reduce_sum(count).tolist()
    loss, ce, kd, correct = (reduce_sum(sums) / max(images, 1)).tolist()
    result = {"loss": loss if images else math.nan, "ce": ce, "kd": kd, "acc": correct, "skipped": int(skipped)}
    if weight_sum is not None:
        result["teacher_weights"] = (reduce_sum(weight_sum) / max(images, 1)).tolist()
    return result


def set_rates(optimizer: torch.optim.Optimizer, rates: Sequence[float], factor: float = 1.0) -> None:
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate * factor


@torch.inference_mode()
def collect_logits(model: nn.Module, batches: Iterable, precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits (float32, CPU) and labels for `batches`, in order."""
    model.eval()
    outputs, labels = [], []
    for batch in batches:
        with precision.autocast():
            outputs.append(model(batch.x).float().cpu())
        labels.append(batch.y.cpu())
    return torch.cat(outputs), torch.cat(labels)


def evaluate(model: nn.Module, batches: Iterable, precision: Precision) -> dict[str, float]:
    logits, labels = collect_logits(model, batches, precision)
    return {"loss": F.cross_entropy(logits, labels).item(),
            "acc": (logits.argmax(dim=1) == labels).float().mean().item()}


EpochCallback = Callable[[dict], None]


def fit(model: nn.Module, train_batches, val_batches, *, optimizer, scheduler, criterion: Distiller,
        epochs: int, precision: Precision, teachers: TeacherLogits | None = None,
        teacher_names: Sequence[str] = (), start_epoch: int = 0, on_epoch: EpochCallback | None = None,
        desc: str = "", progress: bool = True, mixup: Mixup | None = None,
        average: WeightAverage | None = None, warmup: Warmup | None = None) -> list[dict]:
    """Train for epochs [start_epoch, epochs); after each, call on_epoch(row) with its metrics.
    `progress`: show progress bars; `mixup`: blend every training batch (see Mixup); `average`: the
    weights' moving average, which is what is validated; `warmup`: the rate's rise over the first steps
    (the row's lr is the epoch's scheduled rate)."""
    history = []
    bar = tqdm(range(start_epoch, epochs), desc=desc or "epochs", dynamic_ncols=True, disable=not progress)
    for epoch in bar:
        started = time.perf_counter()
        train_batches.set_epoch(epoch)
        if hasattr(teachers, "set_epoch"):  # a logit cache readies the epoch's views
            teachers.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        train = train_one_epoch(model, train_batches, optimizer, criterion, precision, teachers,
                                desc=f"epoch {epoch + 1}/{epochs}", progress=progress, mixup=mixup, average=average,
                                warmup=warmup, first_step=epoch * len(train_batches))
        val = evaluate(average.synchronised() if average else model, val_batches, precision)
        if not (np.isfinite(train["loss"]) and np.isfinite(val["loss"])):  # no finite step, or broken weights
            raise NonFiniteLoss(epoch + 1)
        if train["skipped"]:
            log.warning("epoch %d: %d training step(s) with a non-finite loss were skipped", epoch + 1,
                        train["skipped"])
        scheduler.step()
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train["loss"], "train_ce": train["ce"],
               "train_kd": train["kd"], "train_acc": train["acc"], "val_loss": val["loss"],
               "val_acc": val["acc"]}
        for name, w in zip(teacher_names, train.get("teacher_weights", ())):
            row[f"w_{name}"] = w
        bar.set_postfix(train_loss=f"{row['train_loss']:.3f}", val_acc=f"{row['val_acc']:.4f}")
        log.info("%s epoch %d/%d  train loss %.4f (ce %.4f, kd %.4f) acc %.4f | val loss %.4f acc %.4f | "
                 "lr %.2e | %.1fs", desc, epoch + 1, epochs, row["train_loss"], row["train_ce"], row["train_kd"],
                 row["train_acc"], row["val_loss"], row["val_acc"], lr, time.perf_counter() - started)
        history.append(row)
        if on_epoch:
            on_epoch(row)
    return history


class NonFiniteLoss(UserError):
    def __init__(self, epoch: int):
        super().__init__(f"the training loss became NaN or infinite in epoch {epoch}; "
                         "the last good checkpoint is kept; try a lower --lr")
