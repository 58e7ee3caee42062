"""Image files: which files a folder holds, and reading one as the task's input (grayscale or RGB, resized)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kd.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


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
