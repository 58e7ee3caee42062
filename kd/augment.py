"""Training augmentation: each view of an image is a row of integer parameters, drawn from seeded CPU
generators (kd.batches), and the same row gives the same image on both data paths and every device.

The task config's `augment:` block chooses the kind (`make_augment`):
- `PadCropFlip` (crop_padding, hflip): a crop of the zero-padded image and a horizontal flip, for small
  centred images such as the digits and Fashion-MNIST; batched on the device.
- `PhotoAugment` (crop_scale, crop_ratio, hflip, policy): a random-resized crop of the decoded image,
  a flip and one of torchvision's automatic policies (TrivialAugmentWide or RandAugment), image by
  image with torchvision transforms v2.
Outside training, images larger than the model's input are centre-cropped to it (`center_crop`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from kd.config import POLICY_BINS, AugmentSpec


class PadCropFlip:
    """A crop of the image zero-padded by crop_padding at offsets (dy, dx), then a flip: rows (dy, dx, flip)."""

    width = 3  # parameters per image

    def __init__(self, spec: AugmentSpec):
        self.spec = spec

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        high = 2 * self.spec.crop_padding + 1
        dy = torch.randint(0, high, (n,), generator=generator)
        dx = torch.randint(0, high, (n,), generator=generator)
        flip = (torch.rand(n, generator=generator) < 0.5) & self.spec.hflip
        return torch.stack([dy, dx, flip.long()], dim=1)

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """The batch x (N, C, H, W) augmented by params (N, 3), at once on x's device."""
        n, c, h, w = x.shape
        if self.spec.crop_padding > 0:
            p = self.spec.crop_padding
            padded = F.pad(x, (p, p, p, p))
            rows = (params[:, 0, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (params[:, 1, None] + torch.arange(w, device=x.device))[:, None, None, :]
            batch = torch.arange(n, device=x.device)[:, None, None, None]
            chans = torch.arange(c, device=x.device)[None, :, None, None]
            x = padded[batch, chans, rows, cols]
        if self.spec.hflip:
            x = torch.where(params[:, 2, None, None, None].bool(), x.flip(-1), x)
        return x

    def apply_one(self, image: torch.Tensor, params) -> torch.Tensor:
        return self.apply(image[None], torch.as_tensor(params).view(1, -1))[0]


class PhotoAugment:
    """A random-resized crop of the decoded image (source_size square) to output_size, a flip, then the
    policy's operations. Rows: (top, left, height, width, flip) and per operation (index, magnitude bin,
    negated), so a view's every choice is in its parameters (and in the teacher-logit cache's key).

    The crop box is drawn as torchvision's RandomResizedCrop draws it (ten tries at an area in crop_scale
    and a log-uniform aspect in crop_ratio, else the whole image narrowed to the ratio range). The
    operations, their magnitude bins and how each is applied are torchvision's: TrivialAugmentWide draws
    one operation and its bin, RandAugment policy_ops operations at bin policy_magnitude; a signed
    operation is negated with probability 1/2.
    """

    TRIES = 10

    def __init__(self, spec: AugmentSpec, source_size: int, output_size: int):
        self.spec, self.source, self.output = spec, source_size, output_size
        self.policy = None
        self.ops = 0
        if spec.policy == "trivialaugment":
            self.policy, self.ops = v2.TrivialAugmentWide(num_magnitude_bins=POLICY_BINS), 1
        elif spec.policy == "randaugment":
            self.policy = v2.RandAugment(num_ops=spec.policy_ops, magnitude=spec.policy_magnitude,
                                         num_magnitude_bins=POLICY_BINS)
            self.ops = spec.policy_ops
        self.width = 5 + 3 * self.ops  # parameters per image
        # (name, magnitude per bin or None, signed) of each operation, for images of the output size
        self.operations = [] if self.policy is None else [
            (name, magnitudes(POLICY_BINS, output_size, output_size), signed)
            for name, (magnitudes, signed) in self.policy._AUGMENTATION_SPACE.items()]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        box = self._sample_boxes(n, generator) if self.spec.crop_scale else \
            torch.tensor([0, 0, self.source, self.source]).expand(n, 4)
        flip = (torch.rand(n, generator=generator) < 0.5) & self.spec.hflip
        columns = [box, flip.long()[:, None]]
        for _ in range(self.ops):
            op = torch.randint(0, len(self.operations), (n,), generator=generator)
            level = torch.full((n,), self.spec.policy_magnitude) if self.spec.policy == "randaugment" else \
                torch.randint(0, POLICY_BINS, (n,), generator=generator)
            negated = torch.rand(n, generator=generator) < 0.5
            columns.append(torch.stack([op, level, negated.long()], dim=1))
        return torch.cat(columns, dim=1)

    def _sample_boxes(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, 4) crop boxes (top, left, height, width) in the source image."""
        size, (low, high) = self.source, self.spec.crop_scale
        log_ratio = [math.log(r) for r in self.spec.crop_ratio]
        height, width = torch.full((n,), size), torch.full((n,), size)
        found = torch.zeros(n, dtype=torch.bool)
        for _ in range(self.TRIES):
            area = size * size * (low + (high - low) * torch.rand(n, generator=generator))
            aspect = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(n, generator=generator))
            w, h = torch.sqrt(area * aspect).round().long(), torch.sqrt(area / aspect).round().long()
            fits = ~found & (w > 0) & (w <= size) & (h > 0) & (h <= size)
            width[fits], height[fits], found = w[fits], h[fits], found | fits
        fallback = self._fallback_box()
        width[~found], height[~found] = fallback
        top = (torch.rand(n, generator=generator) * (size - height + 1)).long()
        left = (torch.rand(n, generator=generator) * (size - width + 1)).long()
        top[~found], left[~found] = (size - fallback[1]) // 2, (size - fallback[0]) // 2
        return torch.stack([top, left, height, width], dim=1)

    def _fallback_box(self) -> tuple[int, int]:
        """(width, height) of the centred box when no try fits: the square source narrowed to the ratios."""
        low, high = self.spec.crop_ratio
        if low > 1:
            return self.source, round(self.source / low)
        if high < 1:
            return round(self.source * high), self.source
        return self.source, self.source

    def apply_one(self, image: torch.Tensor, params) -> torch.Tensor:
        """One uint8 image (C, source, source) as the view `params` describes, (C, output, output)."""
        top, left, height, width, flip, *ops = torch.as_tensor(params).tolist()
        image = TF.resized_crop(image, top, left, height, width, [self.output, self.output], antialias=True)
        if flip:
            image = TF.horizontal_flip(image)
        for op, level, negated in zip(ops[0::3], ops[1::3], ops[2::3]):
            name, magnitudes, signed = self.operations[op]
            magnitude = 0.0 if magnitudes is None or magnitudes.ndim == 0 else float(magnitudes[level])
            image = self.policy._apply_image_or_video_transform(
                image, name, -magnitude if signed and negated else magnitude,
                interpolation=self.policy.interpolation, fill=self.policy._fill)
        return image

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """The batch x augmented image by image on the CPU, where a view's resampling is the same whatever the
        device the batch lives on (and a GPU would spend a kernel launch per operation per image)."""
        return torch.stack([self.apply_one(image, row) for image, row in zip(x.cpu(), params.cpu())]).to(x.device)


def make_augment(spec: AugmentSpec | None, source_size: int, output_size: int) -> PadCropFlip | PhotoAugment | None:
    """The augmentation a spec describes for images decoded at source_size and fed at output_size; None
    when it changes no image (no work per batch)."""
    if spec is None:
        return None
    if spec.crop_scale is not None or spec.policy is not None:
        return PhotoAugment(spec, source_size, output_size)
    return PadCropFlip(spec) if spec.crop_padding or spec.hflip else None


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images (..., H, W) cropped to their central size x size: what evaluation and prediction see."""
    return images if images.shape[-1] == size and images.shape[-2] == size else TF.center_crop(images, [size, size])
