"""Photo augmentation (kd.augment): a random-resized crop, a flip and torchvision's automatic policies,
drawn as parameters per view; evaluation centre-crops; the task config's augment block is validated."""

import dataclasses

import pytest
import torch
from torchvision.transforms import v2

from kd.augment import PhotoAugment, make_augment
from kd.config import AugmentSpec, parse_task_config
from kd.data import Split
from kd.errors import UserError
from tests.conftest import tiny_task_raw

PHOTO = AugmentSpec(crop_scale=(0.25, 1.0), hflip=True, policy="trivialaugment")


def images(n=6, size=16, channels=3, seed=0):
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def test_crop_boxes_lie_in_the_image_within_the_scale_and_ratio_ranges():
    augment = PhotoAugment(dataclasses.replace(PHOTO, policy=None), source_size=64, output_size=48)
    top, left, height, width = augment.sample(2000, torch.Generator().manual_seed(0))[:, :4].T
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 64).all() and (left + width <= 64).all()
    area = height * width / 64 ** 2
    assert area.min() >= 0.24 and area.max() <= 1.0 and area.median() < 0.7  # spread over [0.25, 1]
    aspect = width / height
    assert aspect.min() >= 0.7 and aspect.max() <= 1.4  # 3/4 to 4/3, up to rounding
    again = augment.sample(2000, torch.Generator().manual_seed(0))
    assert torch.equal(again[:, :4], torch.stack([top, left, height, width], dim=1))  # seeded: the same views


def test_a_view_is_torchvisions_trivialaugment_for_the_same_draws():
    """torchvision's TrivialAugmentWide draws the operation, its bin and its sign from the global
    generator; replaying those draws as a view's parameters gives torchvision's own image."""
    augment = PhotoAugment(dataclasses.replace(PHOTO, crop_scale=None, hflip=False), 16, 16)
    reference = v2.TrivialAugmentWide()
    names = list(reference._AUGMENTATION_SPACE)
    image, seen = images(1)[0], set()
    for seed in range(60):
        torch.manual_seed(seed)
        expected = reference(image)
        torch.manual_seed(seed)
        op = int(torch.randint(len(names), ()))
        level = int(torch.randint(31, ()))
        negated = bool(torch.rand(()) <= 0.5) if reference._AUGMENTATION_SPACE[names[op]][1] else False
        assert torch.equal(augment.apply_one(image, [0, 0, 16, 16, 0, op, level, int(negated)]), expected), names[op]
        seen.add(names[op])
    assert len(seen) >= 12  # nearly every operation of the policy was compared


def test_randaugment_applies_its_number_of_operations_at_its_magnitude():
    spec = dataclasses.replace(PHOTO, policy="randaugment", policy_ops=3, policy_magnitude=7)
    params = make_augment(spec, 16, 12).sample(500, torch.Generator().manual_seed(1))
    assert params.shape == (500, 5 + 3 * 3)
    assert (params[:, 6::3] == 7).all() and len(params[:, 5::3].unique()) == 14  # every operation drawn
    out = make_augment(spec, 16, 12).apply(images(4), params[:4])
    assert out.shape == (4, 3, 12, 12) and out.dtype == torch.uint8


def test_evaluation_centre_crops_and_training_crops_from_the_decoded_image():
    split = Split(images(6, size=18), torch.arange(6) % 3, input_size=16)
    plain = next(iter(split.batches(6, "cpu")))
    assert torch.equal(plain.x, images(6, size=18)[:, :, 1:17, 1:17].float() / 255)  # the central 16 of 18
    augmented = next(iter(split.batches(6, "cpu", shuffle=True, augment=PHOTO, seed=3)))
    assert augmented.x.shape == (6, 3, 16, 16) and not torch.equal(augmented.x, plain.x[augmented.index])


def photo_task(tmp_path, **augment):
    raw = tiny_task_raw(tmp_path)
    raw["data"] = {"source": "digits", "input_size": 28, "channels": 1}
    raw["augment"] = augment
    return parse_task_config(raw, "photo.yaml")


def test_a_photo_task_decodes_larger_for_its_centre_crop(tmp_path):
    task = photo_task(tmp_path, crop_scale=[0.35, 1], hflip=True, policy="randaugment")
    assert task.augment.crop_scale == (0.35, 1.0) and task.decode_size == 32  # floor(28 / 0.875)
    assert photo_task(tmp_path, crop_scale=[0.35, 1], eval_crop=1.0).decode_size == 28
    assert photo_task(tmp_path, crop_padding=2).decode_size == 28


@pytest.mark.parametrize("augment, message", [
    ({"crop_scale": [0.5, 1], "crop_padding": 2}, "two kinds of crop"),
    ({"crop_scale": [0, 1]}, "0 < low <= high <= 1"),
    ({"crop_scale": [0.5]}, "pair"),
    ({"crop_scale": [0.5, 1], "crop_ratio": [2, 1]}, "crop_ratio"),
    ({"policy": "autoaugment"}, "trivialaugment, randaugment"),
    ({"policy": "randaugment", "policy_magnitude": 31}, "policy_magnitude 0-30"),
    ({"eval_crop": 0.9}, "needs crop_scale"),
    ({"crop_scale": [0.5, 1], "eval_crop": 1.5}, "(0, 1]"),
])
def test_a_bad_augment_block_is_one_line(tmp_path, augment, message):
    with pytest.raises(UserError, match="photo.yaml") as err:
        photo_task(tmp_path, **augment)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_epoch_of_pooled_views_draws_its_view_once():
    """Drawing a view costs ten crop tries per image: an epoch draws its view once, not once per batch."""
    batches = Split(images(20, size=18), torch.arange(20) % 3, input_size=16).batches(5, "cpu", augment=PHOTO,
                                                                                    views=3, shuffle=True)
    augment, calls = batches.pool.augment, []
    draw = augment.sample
    augment.sample = lambda n, generator: calls.append(n) or draw(n, generator)
    batches.set_epoch(2)
    assert [b.x.shape for b in batches] == [(5, 3, 16, 16)] * 4 and calls == [20]
