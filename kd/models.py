"""timm models fitted to small images, wrapped with their own input normalisation."""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from kd.allocator import keep_freed_memory
from kd.errors import UserError
from kd.layers import use_fast_layers

# Flush denormal floats to zero on the CPU (x86's FTZ/DAZ; ignored where unsupported), as TensorFlow does by
# default. Weights that training stops using, and Adam's moments of their gradients, decay towards zero;
# once denormal, every multiplication with them takes the slow path: a MobileNetV3 student after 10 task B
# epochs trained 3.1x slower than at its start (docs/training.md). It is set when networks are first
# imported, before torch starts its CPU thread pool: the pool's threads inherit the setting, which set
# later covers one thread.
torch.set_flush_denormal(True)
# Large tensors freed in one training step are allocated again in the next: keep their memory (kd/allocator.py).
keep_freed_memory()


class Normalized(nn.Module):
    """A classifier that takes [0, 1] images and normalises them itself.

    Keeping mean/std as buffers puts them in every checkpoint, so each model (a teacher trained
    with other statistics, an exported student) always sees inputs normalised its own way.

    With `flip_average`, the network in eval mode judges each image together with its mirror image: it
    returns log((softmax(f(x)) + softmax(f(flipped x))) / 2), logits whose softmax is the mean of the two
    predictions, so accuracy, calibration and an exported file all see the averaged prediction. In
    training mode it is the plain network, so the loss and its gradients are untouched. It adds no weight:
    the same weights file loads with or without it.
    """

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float],
                 flip_average: bool = False):
        super().__init__()
        self.backbone = backbone
        self.flip_average = flip_average
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip_average and not self.training:
            # one batch of both views: one pass through the network instead of two half-size ones
            logits = self.backbone((torch.cat([x, x.flip(-1)]) - self.mean) / self.std)
            # unflatten, not chunk: chunk would fix the exported graph's batch size
            return torch.logsumexp(logits.log_softmax(1).unflatten(0, (2, -1)), dim=0) - math.log(2)
        return self.backbone((x - self.mean) / self.std)


def create_model(arch: str, num_classes: int, in_chans: int, mean: Sequence[float], std: Sequence[float], *,
                 pretrained: bool | Path = False, stride_reduction: int = 1, flip_average: bool = False
                 ) -> Normalized:
    """Build a timm architecture inside a Normalized wrapper.

    Its weights are random, timm's published ones (`pretrained=True`, downloaded) or those of a local
    weights file (`pretrained=path`); the classifier is new whenever num_classes differs from theirs,
    and a new classifier starts at zero (see `zero_classifier`). `stride_reduction` halves that many
    of the first downsampling layers (each halving doubles every later feature map); 0 keeps timm's
    architecture exactly, for weights trained elsewhere. `flip_average`: see `Normalized`. Its depthwise
    and 1x1 convolutions compute as `kd.layers` says (faster on the CPU, the same layers and weights).
    """
    backbone = create_backbone(arch, num_classes, in_chans, pretrained)
    if not pretrained or getattr(backbone, "pretrained_cfg", {}).get("num_classes") != num_classes:
        zero_classifier(backbone)
    for _ in range(stride_reduction):
        halve_first_downsampling(backbone)
    use_fast_layers(backbone)
    return Normalized(backbone, mean, std, flip_average)


def zero_classifier(model: nn.Module) -> None:
    """Zero the final linear layer, so a new model predicts the uniform distribution (cross-entropy ln C).

    timm draws EfficientNet's and MobileNetV3's classifiers from uniform(+-1/sqrt(num_classes)), a range
    meant for 1,000 classes: with 10 classes the first predictions are confidently wrong (cross-entropy
    up to 5.7 instead of ln 10 = 2.3) and the first epochs are spent shrinking the head. A zero classifier
    still learns at once: its gradient is the features times the error.
    """
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)


def create_backbone(arch: str, num_classes: int, in_chans: int, pretrained: bool | Path = False) -> nn.Module:
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        raise UserError(f"unknown timm architecture {arch!r}" + (f"; close matches: {', '.join(close)}" if close
                                                                  else "; timm.list_models() lists them all"))
    if not pretrained:
        return timm.create_model(arch, num_classes=num_classes, in_chans=in_chans)
    overlay = {"file": str(pretrained)} if isinstance(pretrained, Path) else None
    try:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes,
                                 in_chans=in_chans)
    except Exception as err:  # the hub client, urllib, torch.hub and file loaders each raise their own types
        raise UserError(pretrained_error(arch, pretrained, err)) from None


def pretrained_error(arch: str, pretrained: bool | Path, err: Exception) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
    reason = lines[0]
    if reason.endswith(":") and len(lines) > 1:  # load_state_dict's heading: the first key list says what is wrong
        reason = f"{reason} {lines[1][:160]}{'...' if len(lines[1]) > 160 else ''}"
    if isinstance(pretrained, Path):
        return f"cannot load pretrained weights for {arch} from {pretrained} ({reason})"
    return (f"could not fetch timm's pretrained weights for {arch} ({reason}); offline, download them on a "
            f"machine with internet (timm.create_model('{arch}', pretrained=True) caches them, or get the "
            f"model's .safetensors from its hub page) and pass that file: --pretrained FILE for a student, "
            f"`pretrained: FILE` for a teacher (or its `checkpoint:`, an already trained teacher)")


def halve_first_downsampling(model: nn.Module) -> nn.Module:
    """Halve the stride of the first downsampling layer (conv or max-pool), in place.

    ImageNet models shrink the input 32x; a 28x28 image would reach 1x1 after three stages.
    Halving the first stride keeps a 2x2 final map on 28x28 inputs; every layer after it then
    runs on a map twice as wide and high, so the model costs up to 4x the compute (docs/training.md,
    "Fitting ImageNet models to small images"). Calling it again halves the next downsampling layer.
    Patchify stems (kernel == stride, as in ConvNeXt) are rebuilt with half the kernel so they
    still tile the image.
    """
    for name, module in model.named_modules():
        downsamples = isinstance(module, (nn.Conv2d, nn.MaxPool2d)) and _stride(module) > 1
        if not downsamples:
            continue
        stride = _stride(module)
        if isinstance(module, nn.Conv2d) and _size(module.kernel_size) == stride:
            _replace(model, name, _halved_patchify(module))
        elif isinstance(module, nn.Conv2d):
            module.stride = (stride // 2, stride // 2)
        elif stride == 2:
            _replace(model, name, nn.Identity())
        else:
            module.stride = stride // 2
        return model
    return model


def _halved_patchify(conv: nn.Conv2d) -> nn.Conv2d:
    """A patchify conv with half the kernel and stride whose weights are the old kernel's 2x2 blocks summed.

    On an image it computes what the old conv computed on that image upscaled 2x (nearest), so
    pretrained weights carry over; for random weights the sum keeps their spread right for the
    smaller fan-in.
    """
    half = _stride(conv) // 2
    new = nn.Conv2d(conv.in_channels, conv.out_channels, half, half, bias=conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(F.avg_pool2d(conv.weight, 2) * 4)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _size(value) -> int:
    return value[0] if isinstance(value, tuple) else value


def _stride(module: nn.Module) -> int:
    return _size(module.stride)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
