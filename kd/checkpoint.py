"""Atomic saving and safe loading: safetensors or torch.load(weights_only=True), never arbitrary pickles."""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kd.errors import UserError
from kd.files import atomic_write


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_weights(model: nn.Module, path: Path, metadata: dict) -> None:
    """Save a model's state dict as safetensors, with JSON metadata (architecture, accuracy...)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"kd": json.dumps(metadata)}))


def save_half_copy(source: Path, target: Path) -> None:
    """A half-precision copy of a weights file, its metadata kept: trained teachers at half the size, to
    ship with the project. Integer buffers (BatchNorm's batch count) stay as they are; loading casts the
    weights back to the model's fp32."""
    state, metadata = load_weights(source)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    metadata = {**metadata, "precision": "fp16"}
    atomic_write(Path(target), lambda tmp: save_file(half, tmp, metadata={"kd": json.dumps(metadata)}))


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read (state_dict, metadata) from a .safetensors file or a weights-only torch checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    return _load_torch(path)


def _load_safetensors(path: Path):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("kd", "{}"))
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err})") from None


def load_torch_checkpoint(path: Path) -> dict:
    """torch.load with weights_only=True: a pickle that would run code is refused, not run."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{path} was refused: it is not a plain weights checkpoint ({first})") from None
    except (RuntimeError, OSError, EOFError) as err:
        raise UserError(f"{path} is not a readable checkpoint ({err})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} does not hold a state dict")
    return obj


def _load_torch(path: Path):
    obj = load_torch_checkpoint(path)
    if "model" in obj and isinstance(obj["model"], dict):  # a training checkpoint of this project
        return obj["model"], obj.get("metadata", {})
    return obj, {}


def check_classes(meta: dict, classes: Sequence[str], source: str) -> None:
    """A checkpoint whose metadata names its classes must have been trained for exactly the task's
    classes, in order (a different class count alone also shows as a shape error on loading)."""
    saved = meta.get("classes")
    if saved is not None and list(saved) != list(classes):
        raise UserError(f"{source} was trained for {len(saved)} classes {_preview(saved)}, the task has "
                        f"{len(classes)}: {_preview(classes)} (the same names in the same order are needed)")


def _preview(names: Sequence[str]) -> str:
    return ", ".join(map(str, names[:4])) + (", ..." if len(names) > 4 else "")


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`, explaining key and shape mismatches in one line."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{source} does not fit this architecture: {len(missing)} missing key(s) "
                        f"{missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise UserError(f"{source}: {key} has shape {tuple(value.shape)}, the model expects "
                            f"{tuple(expected[key].shape)} (a different class count or channels?)")
    model.load_state_dict(state)
