"""A run's checkpoints, and continuing a run from them (--resume).

checkpoint_last.pt, written after every epoch, holds all a run needs to continue bit for bit;
checkpoint_best.pt and <role>.safetensors the best-validation weights. A resumed run takes its
settings from its record (kd.record), except a larger epoch count, which trains on.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection
from pathlib import Path

import torch

from kd.checkpoint import atomic_torch_save, load_state_into, load_torch_checkpoint, save_weights
from kd.engine import Precision, WeightAverage, evaluate, rng_state, set_rng_state
from kd.errors import UserError
from kd.models import count_parameters
from kd.record import LAST_CHECKPOINT, RunRecord
from kd.settings import TrainSettings

log = logging.getLogger("kd")


RESUME_CHANGEABLE = ("num_epochs", "resume")  # what a resumed run takes from the command line


def resumed_settings(saved: TrainSettings, requested: TrainSettings, given: Collection[str] | None,
                     run_dir: Path) -> tuple[TrainSettings, list[str]]:
    """The run's own settings, with a newly given num_epochs; and the other given settings that differ
    from the run's, as 'flag value (run: value)' for the warning."""
    fields = [f.name for f in dataclasses.fields(TrainSettings)]
    defaults = TrainSettings()
    given = [name for name in fields if (name in given if given is not None
                                         else getattr(requested, name) != getattr(defaults, name))]
    ignored = [f"--{name} {_flag_value(getattr(requested, name))} (run: {_flag_value(getattr(saved, name))})"
               for name in given if name not in RESUME_CHANGEABLE and getattr(requested, name) != getattr(saved, name)]
    epochs = requested.num_epochs if "num_epochs" in given else saved.num_epochs
    return dataclasses.replace(saved, resume=str(run_dir), num_epochs=epochs), ignored


def _flag_value(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def extend_to(num_epochs: int, record: RunRecord, checkpoints: "RunCheckpoints", is_main: bool) -> None:
    """Resume with a changed epoch count: check it, set the restored optimizer's learning rate to the
    schedule's value for the next epoch, and record the new count (the record keeps its creation time)."""
    if num_epochs < checkpoints.epoch:
        raise UserError(f"{record.run_dir} has trained {checkpoints.epoch} epochs already; --num_epochs "
                        f"{num_epochs} would end before them (give a larger count to train on)")
    scheduler = checkpoints.scheduler
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        for group, base, factor in zip(checkpoints.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
    started_for = record.settings.num_epochs
    if is_main and started_for != num_epochs:
        log.info("training %s on to %d epochs (it was started for %d)", record.run_dir, num_epochs, started_for)
        record.with_epochs(num_epochs).save()


class RunCheckpoints:
    """checkpoint_last.pt every epoch: model, optimizer, scheduler, grad scaler, the weights' moving
    average, RNG states and the metrics history, all a resumed run needs to continue bit for bit;
    checkpoint_best.pt (weights only) and student.safetensors on a new best validation accuracy: the
    weights validated, the moving average's where the run keeps one."""

    def __init__(self, run_dir: Path, model, optimizer, scheduler, precision: Precision, role: str, metadata: dict,
                 average: WeightAverage | None = None):
        self.run_dir, self.model, self.optimizer = run_dir, model, optimizer
        self.scheduler, self.precision, self.metadata, self.average = scheduler, precision, dict(metadata), average
        self.validated = average.model if average else model
        self.weights_path = run_dir / f"{role}.safetensors"
        self.metadata["params"] = count_parameters(model)
        self.best_val_acc, self.best_val_loss, self.best_epoch, self.epoch = -1.0, float("inf"), 0, 0
        self.history: list[dict] = []

    def _weights(self, model) -> dict:
        return {"model": model.state_dict(), "epoch": self.epoch, "best_val_acc": self.best_val_acc,
                "best_val_loss": self.best_val_loss, "best_epoch": self.best_epoch, "metadata": self.metadata}

    def _full_state(self) -> dict:
        average = {"average": self.average.state_dict()} if self.average else {}
        return {**self._weights(self.model), "optimizer": self.optimizer.state_dict(), "history": self.history,
                "scheduler": self.scheduler.state_dict(), "scaler": self.precision.scaler.state_dict(),
                "rng": rng_state(), **average}

    def save(self, row: dict) -> None:
        self.epoch = row["epoch"]
        self.history.append(row)
        if self._is_best(row):
            self.best_val_acc, self.best_val_loss, self.best_epoch = row["val_acc"], row["val_loss"], row["epoch"]
            self.metadata.update(val_acc=row["val_acc"], epoch=row["epoch"])
            atomic_torch_save(self._weights(self.validated), self.run_dir / "checkpoint_best.pt")
            save_weights(self.validated, self.weights_path, self.metadata)
        atomic_torch_save(self._full_state(), self.run_dir / LAST_CHECKPOINT)

    def _is_best(self, row: dict) -> bool:
        """Higher validation accuracy; at equal accuracy (common on a small validation split that a good
        model gets all right) the lower validation loss, not the earlier epoch."""
        return (row["val_acc"], -row["val_loss"]) > (self.best_val_acc, -self.best_val_loss)

    def restore(self) -> list[dict]:
        """Load checkpoint_last.pt into the model, optimizer, scheduler, scaler and RNGs; return the history."""
        state = load_torch_checkpoint(self.run_dir / LAST_CHECKPOINT)
        load_state_into(self.model, state["model"], f"{self.run_dir / LAST_CHECKPOINT}")
        if self.average:
            self.average.load_state_dict(state["average"], f"{self.run_dir / LAST_CHECKPOINT}: its moving average")
        self.optimizer.load_state_dict(state["optimizer"])
        scheduler_state = state["scheduler"]
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):  # also an earlier release's cosine
            scheduler_state = {"lr_lambdas": [None] * len(self.scheduler.lr_lambdas), **scheduler_state}
        self.scheduler.load_state_dict(scheduler_state)
        self.precision.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.epoch, self.history = state["epoch"], state["history"]
        self.best_val_acc, self.best_epoch = state["best_val_acc"], state["best_epoch"]
        self.best_val_loss = state.get("best_val_loss", float("inf"))  # absent from earlier releases' checkpoints
        self.metadata.update({k: v for k, v in state["metadata"].items() if k in ("val_acc", "epoch")})
        return self.history

    def finish(self, test_batches) -> float:
        """Report the best checkpoint's test accuracy (selection used validation only)."""
        self.validated.load_state_dict(load_torch_checkpoint(self.run_dir / "checkpoint_best.pt")["model"])
        test_acc = evaluate(self.validated, test_batches, self.precision)["acc"]
        self.metadata["test_acc"] = test_acc
        save_weights(self.validated, self.weights_path, self.metadata)
        log.info("best epoch %d: val acc %.4f, test acc %.4f", self.best_epoch, self.best_val_acc, test_acc)
        return test_acc
