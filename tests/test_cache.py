import dataclasses

import torch

from kd.cache import cache_paths, load_or_build_cache, repeated_views_note
from kd.checkpoint import save_weights
from kd.config import AugmentSpec
from kd.data import Batches, Split
from kd.engine import Precision, online_teachers
from kd.models import create_model
from kd.teachers import TeacherEnsemble
from tests.conftest import with_random_head

CPU = Precision(torch.device("cpu"), None)


def setup(tmp_path, augment=AugmentSpec(crop_padding=2, hflip=True), views=3):
    torch.manual_seed(0)
    teachers = {"r": with_random_head(create_model("resnet10t", 3, 1, [0.4], [0.3])),
                "m": with_random_head(create_model("mobilenetv3_small_050", 3, 1, [0.5], [0.2]))}
    checkpoints = []
    for name, model in teachers.items():
        checkpoints.append(tmp_path / f"{name}.safetensors")
        save_weights(model, checkpoints[-1], {})
    split = Split(torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8), torch.arange(40) % 3)
    batches = Batches(split, 16, "cpu", shuffle=True, augment=augment, seed=5, views=views, pool_seed=0)
    return TeacherEnsemble(teachers), checkpoints, batches


def test_cached_logits_equal_fresh_ones_for_the_views_trained_on(tmp_path):
    ensemble, checkpoints, batches = setup(tmp_path)
    paths = cache_paths(checkpoints, batches, CPU, tmp_path / "cache")
    cache = load_or_build_cache(list(ensemble.models), paths, batches, CPU)
    assert cache.logits.shape == (2, 3, 40, 3) and cache.logits.dtype == torch.float16
    online = online_teachers(ensemble)
    for epoch in range(3):
        batches.set_epoch(epoch)
        for batch in batches:
            fresh = online(batch)
            assert torch.allclose(cache(batch).float(), fresh, rtol=2e-3, atol=2e-3)
            assert not torch.allclose(cache(batch._replace(view=(batch.view + 1) % 3)).float(), fresh, atol=1e-3)


def test_cache_is_reused_and_keyed_by_teacher_data_and_augmentation(tmp_path):
    ensemble, checkpoints, batches = setup(tmp_path)
    paths = cache_paths(checkpoints, batches, CPU, tmp_path / "cache")
    load_or_build_cache(list(ensemble.models), paths, batches, CPU)
    stamps = [p.stat().st_mtime_ns for p in paths]
    again = load_or_build_cache(list(ensemble.models), cache_paths(checkpoints, batches, CPU, tmp_path / "cache"),
                                batches, CPU)
    assert [p.stat().st_mtime_ns for p in paths] == stamps and again.logits.shape[1] == 3

    save_weights(create_model("resnet10t", 3, 1, [0.4], [0.3]), checkpoints[0], {})  # a retrained teacher
    changed = cache_paths(checkpoints, batches, CPU, tmp_path / "cache")
    assert changed[0] != paths[0] and changed[1] == paths[1]

    other_aug = dataclasses.replace(batches.augment, hflip=False)
    _, _, flipped = setup(tmp_path / "x", augment=other_aug)
    assert cache_paths(checkpoints, flipped, CPU, tmp_path / "cache")[1] != paths[1]
    other_data = Batches(Split(batches.split.images.flip(0), batches.split.labels), 16, "cpu",
                         augment=batches.augment, views=3)
    assert cache_paths(checkpoints, other_data, CPU, tmp_path / "cache")[1] != paths[1]


def test_a_cache_of_other_views_or_another_precision_is_rebuilt_not_reused(tmp_path):
    ensemble, checkpoints, batches = setup(tmp_path)
    paths = cache_paths(checkpoints, batches, CPU, tmp_path / "cache")
    load_or_build_cache(list(ensemble.models), paths, batches, CPU)
    # the same seed and settings, but other crops: what another device's generator would have drawn
    batches.view_params = batches.view_params.flip(1)
    moved = cache_paths(checkpoints, batches, CPU, tmp_path / "cache")
    assert set(moved).isdisjoint(paths)
    rebuilt = load_or_build_cache(list(ensemble.models), moved, batches, CPU)
    batch = next(iter(batches))
    assert torch.allclose(rebuilt(batch).float(), ensemble(batch.x), rtol=2e-3, atol=2e-3)
    bf16 = Precision(torch.device("cpu"), torch.bfloat16)
    assert set(cache_paths(checkpoints, batches, bf16, tmp_path / "cache")).isdisjoint(moved)


def test_without_augmentation_the_pool_is_one_view(tmp_path):
    ensemble, checkpoints, batches = setup(tmp_path, augment=AugmentSpec(), views=8)
    cache = load_or_build_cache(list(ensemble.models), cache_paths(checkpoints, batches, CPU, tmp_path / "c"),
                                batches, CPU)
    assert cache.logits.shape[1] == 1
    batch = next(iter(batches))
    assert torch.allclose(cache(batch).float(), ensemble(batch.x), rtol=2e-3, atol=2e-3)


def test_a_run_longer_than_the_pool_of_views_is_warned_that_its_crops_repeat(tmp_path):
    _, _, batches = setup(tmp_path, views=4)
    note = repeated_views_note(20, batches)
    assert "20 epochs replay 4 augmented views" in note and "--teacher_cache_views 20" in note
    assert repeated_views_note(4, batches) is None  # every epoch can still get a view of its own
    _, _, plain = setup(tmp_path, augment=AugmentSpec(), views=4)
    assert repeated_views_note(20, plain) is None  # without augmentation online teachers see the same image
