"""timm models fitted to small images, wrapped with their own input normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
import torch.nn as nn

from kd.errors import UserError


class Normalized(nn.Module):
    """A classifier that takes [0, 1] images and normalises them itself.

    Keeping mean/std as buffers puts them in every checkpoint, so each model (a teacher trained
    with other statistics, an exported student) always sees inputs normalised its own way.
    """

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)


def create_model(arch: str, num_classes: int, in_chans: int, mean: Sequence[float],
                 std: Sequence[float]) -> Normalized:
    """Build a timm architecture for small inputs, untrained, inside a Normalized wrapper."""
    try:
        backbone = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    except RuntimeError as err:  # timm's "Unknown model" error
        raise UserError(f"unknown timm architecture {arch!r} ({err})") from None
    return Normalized(halve_first_downsampling(backbone), mean, std)


def halve_first_downsampling(model: nn.Module) -> nn.Module:
    """Halve the stride of the first downsampling layer (conv or max-pool), in place.

    ImageNet models shrink the input 32x; a 28x28 image would reach 1x1 after three stages.
    Halving the first stride keeps a 2x2 final map on 28x28 inputs at a small extra cost,
    since only the stem runs at the higher resolution. Patchify stems (kernel == stride,
    as in ConvNeXt) are rebuilt with half the kernel so they still tile the image.
    """
    for name, module in model.named_modules():
        downsamples = isinstance(module, (nn.Conv2d, nn.MaxPool2d)) and _stride(module) > 1
        if not downsamples:
            continue
        stride = _stride(module)
        if isinstance(module, nn.Conv2d) and _size(module.kernel_size) == stride:
            half = stride // 2
            _replace(model, name, nn.Conv2d(module.in_channels, module.out_channels, half, half,
                                            bias=module.bias is not None))
        elif isinstance(module, nn.Conv2d):
            module.stride = (stride // 2, stride // 2)
        elif stride == 2:
            _replace(model, name, nn.Identity())
        else:
            module.stride = stride // 2
        return model
    return model


def _size(value) -> int:
    return value[0] if isinstance(value, tuple) else value


def _stride(module: nn.Module) -> int:
    return _size(module.stride)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
