"""How a network is built and fed, as data: a run's record and its weights' metadata hold one.

Kept free of torch, so that reading and finding runs (kd.record) answers at once; `ModelBuild.create`
builds the network (kd.models).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kd.errors import UserError

if TYPE_CHECKING:
    from kd.models import Normalized

SMALL_INPUT_LIMIT = 64  # inputs below this many pixels get one halved stride by default


def default_stride_reduction(input_size: int) -> int:
    """Halvings for an input size when the config names none: one below SMALL_INPUT_LIMIT, where timm's 32x
    downsampling would leave less than a 2x2 final map; none from 64 px on, where timm's architecture
    (and its pretrained weights) is used as built."""
    return 1 if input_size < SMALL_INPUT_LIMIT else 0


@dataclass(frozen=True)
class ModelBuild:
    """How a network is built and fed: what its weights file alone does not say.

    Halving a stride changes no weight's shape, so weights load without error into a network built
    with other halvings (or fed with other statistics) and compute something else. A run stores its
    model's build with the weights and in its record (kd.record), and everything that rebuilds the
    model later (evaluation, export, predict, resume, the tuner) builds it from there.
    """

    arch: str  # the timm architecture
    num_classes: int
    channels: int
    input_size: int
    stride_reduction: int  # halved first downsampling layers (see `create_model`)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # eval mode averages each image's prediction with its mirror image's (kd.models.Normalized); records
    # written before this setting existed have none, and their networks judged images alone
    test_time_flip: bool = False

    def create(self, pretrained: bool | Path = False) -> "Normalized":
        from kd.models import create_model  # torch and timm load when a network is built, not with a record

        return create_model(self.arch, self.num_classes, self.channels, self.mean, self.std, pretrained=pretrained,
                            stride_reduction=self.stride_reduction, flip_average=self.test_time_flip)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, raw, source: str) -> "ModelBuild":
        try:
            return cls(**{**raw, "mean": tuple(raw["mean"]), "std": tuple(raw["std"])})
        except (TypeError, KeyError) as err:
            raise UserError(f"{source}: the model's build record is unreadable ({err})") from None

    def differences(self, other: "ModelBuild") -> dict[str, tuple]:
        """{field: (this build's value, the other's)} for each field in which the two differ."""
        return {f.name: (getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)}
