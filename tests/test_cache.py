import dataclasses
import hashlib

import pytest
import torch

from kd.cache import TeacherLogitCache, repeated_views_note, teacher_identity
from kd.checkpoint import save_weights
from kd.config import AugmentSpec
from kd.data import Batches, Split
from kd.engine import Precision, online_teachers
from kd.builds import ModelBuild
from kd.models import create_model
from kd.teachers import TeacherEnsemble
from tests.conftest import with_random_head

CPU = Precision(torch.device("cpu"), None)
BUILD = ModelBuild("resnet10t", num_classes=3, channels=1, input_size=8, stride_reduction=1, mean=(0.4,), std=(0.3,))


def setup(tmp_path, augment=AugmentSpec(crop_padding=2, hflip=True), views=3, mixup=0.0):
    torch.manual_seed(0)
    teachers = {"r": with_random_head(create_model("resnet10t", 3, 1, [0.4], [0.3])),
                "m": with_random_head(create_model("mobilenetv3_small_050", 3, 1, [0.5], [0.2]))}
    checkpoints = []
    for name, model in teachers.items():
        checkpoints.append(tmp_path / f"{name}.safetensors")
        save_weights(model, checkpoints[-1], {})
    split = Split(torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8), torch.arange(40) % 3)
    batches = Batches(split, 16, "cpu", shuffle=True, augment=augment, seed=5, views=views, pool_seed=0, mixup=mixup)
    return TeacherEnsemble(teachers), checkpoints, batches


def open_cache(ensemble, checkpoints, batches, cache_dir, precision=CPU, builds=(BUILD, BUILD)):
    identities = [teacher_identity(c, b) for c, b in zip(checkpoints, builds)]
    return TeacherLogitCache(list(ensemble.models), identities, batches, precision, cache_dir)


@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_cached_logits_equal_fresh_ones_for_the_views_trained_on(tmp_path, mixup):
    """With mixup the views are blends, and the cache holds the teachers' logits of the blended images."""
    ensemble, checkpoints, batches = setup(tmp_path, mixup=mixup)
    cache = open_cache(ensemble, checkpoints, batches, tmp_path / "cache")
    online = online_teachers(ensemble)
    for epoch in range(3):
        batches.set_epoch(epoch)
        cache.set_epoch(epoch)
        for batch in batches:
            assert torch.equal(batch.view, torch.full_like(batch.view, epoch))  # epoch e trains on view e
            assert (batch.mix is not None) == bool(mixup)
            fresh = online(batch)
            assert torch.allclose(cache(batch).float(), fresh, rtol=2e-3, atol=2e-3)
    assert cache.store.logits.shape == (2, 3, 40, 3) and cache.store.logits.dtype == torch.float16
    batch = next(iter(batches))
    assert not torch.allclose(cache(batch._replace(view=(batch.view + 1) % 3)).float(), online(batch), atol=1e-3)


def test_each_view_is_computed_when_first_trained_on_and_kept_for_later_runs(tmp_path):
    ensemble, checkpoints, batches = setup(tmp_path, views=4)
    cache = open_cache(ensemble, checkpoints, batches, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
    cache.set_epoch(0)
    assert cache.built == [0] and len(list((tmp_path / "cache").iterdir())) == 2  # one file per teacher
    assert torch.isnan(cache.store.logits[:, 1:]).all()  # views not yet trained on are not computed
    cache.set_epoch(1)
    cache.set_epoch(1)  # twice: loaded once
    assert cache.built == [0, 1]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}

    later = open_cache(ensemble, checkpoints, batches, tmp_path / "cache")  # a later run of the same task
    later.fill(range(3))
    assert later.built == [2]  # views 0 and 1 replayed from their files, view 2 is new
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())
    assert torch.equal(later.store.logits[:, :2], cache.store.logits[:, :2])


@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_a_run_gives_the_same_floats_whether_its_cache_existed_or_not(tmp_path, mixup):
    ensemble, checkpoints, batches = setup(tmp_path, mixup=mixup)
    first = open_cache(ensemble, checkpoints, batches, tmp_path / "cache")
    first.fill(range(3))
    # another run, other batch sizes and seed: views are computed in fixed batches, so the same floats
    other = Batches(batches.split, 7, "cpu", shuffle=True, augment=batches.augment, seed=9, views=3, pool_seed=0,
                    mixup=mixup)
    fresh = open_cache(ensemble, checkpoints, other, tmp_path / "fresh")
    replayed = open_cache(ensemble, checkpoints, other, tmp_path / "cache")
    fresh.fill(range(3))
    replayed.fill(range(3))
    assert fresh.built == [0, 1, 2] and replayed.built == []
    assert torch.equal(fresh.store.logits, replayed.store.logits)


def test_the_key_holds_everything_that_determines_a_logit(tmp_path):
    ensemble, checkpoints, batches = setup(tmp_path)
    paths = open_cache(ensemble, checkpoints, batches, tmp_path / "c").paths(0)
    assert len(set(paths)) == 2 and open_cache(ensemble, checkpoints, batches, tmp_path / "c").paths(0) == paths
    assert set(open_cache(ensemble, checkpoints, batches, tmp_path / "c").paths(1)).isdisjoint(paths)

    for change in ({"stride_reduction": 2}, {"mean": (0.5,)}, {"std": (0.2,)}, {"input_size": 16},
                   {"channels": 3}, {"arch": "resnet18"}, {"num_classes": 4}):
        other = open_cache(ensemble, checkpoints, batches, tmp_path / "c",
                           builds=(dataclasses.replace(BUILD, **change), BUILD))
        assert other.paths(0)[0] != paths[0] and other.paths(0)[1] == paths[1], change

    save_weights(create_model("resnet10t", 3, 1, [0.4], [0.3]), checkpoints[0], {})  # a retrained teacher
    assert open_cache(ensemble, checkpoints, batches, tmp_path / "c").paths(0)[0] != paths[0]

    variants = {
        "augmentation": Batches(batches.split, 16, "cpu", augment=dataclasses.replace(batches.augment, hflip=False),
                                views=3),
        "data": Batches(Split(batches.split.images.flip(0), batches.split.labels), 16, "cpu",
                        augment=batches.augment, views=3),
        "view parameters": Batches(batches.split, 16, "cpu", augment=batches.augment, views=3, pool_seed=1),
        "mixup": Batches(batches.split, 16, "cpu", augment=batches.augment, views=3, mixup=0.4),
        "mixup's concentration": Batches(batches.split, 16, "cpu", augment=batches.augment, views=3, mixup=1.0),
        **{f"photo {policy}": Batches(batches.split, 16, "cpu", views=3, augment=AugmentSpec(
            crop_scale=(0.5, 1.0), policy=policy)) for policy in ("trivialaugment", "randaugment")},
    }
    keys = {what: open_cache(ensemble, checkpoints, variant, tmp_path / "c").paths(0)[1]
            for what, variant in variants.items()}
    assert paths[1] not in keys.values() and len(set(keys.values())) == len(keys)  # each its own views
    bf16 = Precision(torch.device("cpu"), torch.bfloat16)
    assert open_cache(ensemble, checkpoints, batches, tmp_path / "c", precision=bf16).paths(0)[1] != paths[1]


def test_a_pool_without_mixup_keeps_the_view_keys_it_had_before_pools_could_blend(tmp_path):
    """Caches built before blending existed stay valid: such a view's fingerprint is its parameters' hash alone."""
    _, _, batches = setup(tmp_path)
    assert batches.pool.fingerprint(1) == hashlib.sha256(batches.pool.params(1).numpy().tobytes()).hexdigest()


def test_a_pools_views_do_not_depend_on_its_size(tmp_path):
    ensemble, checkpoints, small = setup(tmp_path, views=2)
    large = Batches(small.split, 16, "cpu", augment=small.augment, views=50, pool_seed=0)
    assert torch.equal(small.pool.params(1), large.pool.params(1))
    # so a longer run of the same task replays the views a shorter one computed
    assert open_cache(ensemble, checkpoints, small, tmp_path).paths(1) == \
        open_cache(ensemble, checkpoints, large, tmp_path).paths(1)


def test_without_augmentation_the_pool_is_one_view(tmp_path):
    ensemble, checkpoints, batches = setup(tmp_path, augment=AugmentSpec(), views=8)
    cache = open_cache(ensemble, checkpoints, batches, tmp_path / "c")
    for epoch in range(3):
        cache.set_epoch(epoch)
    assert cache.built == [0] and cache.store.logits.shape[1] == 1
    batch = next(iter(batches))
    assert torch.allclose(cache(batch).float(), ensemble(batch.x), rtol=2e-3, atol=2e-3)


def test_without_augmentation_a_blending_pool_still_has_a_view_per_epoch(tmp_path):
    ensemble, checkpoints, batches = setup(tmp_path, augment=AugmentSpec(), views=3, mixup=0.4)
    cache = open_cache(ensemble, checkpoints, batches, tmp_path / "c")
    cache.fill(range(3))
    assert cache.built == [0, 1, 2] and not torch.equal(cache.store.logits[:, 0], cache.store.logits[:, 1])


def test_a_batch_without_pooled_views_is_refused(tmp_path):
    ensemble, checkpoints, batches = setup(tmp_path)
    cache = open_cache(ensemble, checkpoints, batches, tmp_path / "c")
    with pytest.raises(ValueError, match="view pool"):
        cache(next(iter(batches))._replace(view=None))
    with pytest.raises(ValueError, match="view pool"):
        open_cache(ensemble, checkpoints, Batches(batches.split, 16, "cpu"), tmp_path / "c")


def test_a_run_longer_than_the_pool_of_views_is_warned_that_its_crops_repeat(tmp_path):
    _, _, batches = setup(tmp_path, views=4)
    note = repeated_views_note(20, batches)
    assert "20 epochs replay 4 views" in note and "the default --teacher_cache_views" in note
    assert repeated_views_note(4, batches) is None  # every epoch can still get a view of its own
    _, _, plain = setup(tmp_path, augment=AugmentSpec(), views=4)
    assert repeated_views_note(20, plain) is None  # without augmentation online teachers see the same image
    _, _, blended = setup(tmp_path, augment=AugmentSpec(), views=4, mixup=0.4)
    assert "20 epochs replay 4 views" in repeated_views_note(20, blended)  # but not the same blend
