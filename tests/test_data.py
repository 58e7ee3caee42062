import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kd.data
from kd.config import AugmentSpec, load_task_config, parse_task_config
from kd.augment import PadCropFlip
from kd.data import Batches, Split, _read_idx, load_task_data
from kd.errors import UserError
from tests.conftest import tiny_task_raw


def write_idx(path, array: np.ndarray, compress=True):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_like(folder, n_train=200, n_test=50):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(folder / "t10k-labels-idx1-ubyte", np.arange(n_test) % 10, compress=False)


def test_digits_split_is_fixed_stratified_and_disjoint():
    task = load_task_config("A")
    data = load_task_data(task)
    again = load_task_data(task)
    sizes = (len(data.train), len(data.val), len(data.test))
    assert sum(sizes) == 1797 and sizes == (1221, 216, 360)
    assert torch.equal(data.test.images, again.test.images)
    assert data.train.images.shape[1:] == (1, 16, 16) and data.train.images.dtype == torch.uint8
    for split in (data.train, data.val, data.test):
        counts = torch.bincount(split.labels, minlength=10).float() / len(split)
        assert counts.min() > 0.08 and counts.max() < 0.12  # stratified: every class ~10%
    rows = {tuple(x.flatten().tolist()) for x in data.test.images}
    assert not rows & {tuple(x.flatten().tolist()) for x in data.val.images}


def test_fashion_mnist_from_a_data_dir(tmp_path):
    write_fashion_like(tmp_path, n_train=6000)
    data = load_task_data(load_task_config("B"), data_dir=tmp_path)
    assert (len(data.train), len(data.val), len(data.test)) == (1000, 5000, 50)
    assert str(tmp_path) in data.source


def test_too_small_pool_for_the_validation_split(tmp_path):
    write_fashion_like(tmp_path, n_train=200)
    with pytest.raises(UserError, match="cannot hold out 5000 images from a pool of 200"):
        load_task_data(load_task_config("B"), data_dir=tmp_path)


def test_truncated_idx_file_is_named(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    write_idx(path, np.zeros((4, 28, 28)))
    raw = gzip.decompress(path.read_bytes())[:-10]
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(UserError, match="truncated"):
        _read_idx(path)


def test_missing_fashion_mnist_names_every_way_to_get_it(tmp_path, monkeypatch):
    import kd.data

    monkeypatch.setattr(kd.data, "REPO_DATA_DIR", tmp_path)
    monkeypatch.setattr(kd.data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.setattr(kd.data, "_download_fashion_mnist", lambda data_dir: None)
    with pytest.raises(UserError) as err:
        load_task_data(load_task_config("B"))
    message = str(err.value)
    assert str(tmp_path / "TaskB") in message and "dataset-fashion-mnist" in message and "online" in message


def test_a_given_data_dir_is_the_only_place_looked_in(tmp_path, monkeypatch):
    import kd.data

    monkeypatch.setattr(kd.data, "_download_fashion_mnist", lambda data_dir: None)
    write_fashion_like(tmp_path / "elsewhere", n_train=6000)
    monkeypatch.setattr(kd.data, "DEBIAN_FASHION_MNIST", tmp_path / "elsewhere")  # the system's copy exists
    with pytest.raises(UserError, match=f"--data_dir {tmp_path / 'missing'} does not exist"):
        load_task_data(load_task_config("B"), data_dir=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"--data_dir {tmp_path / 'empty'} holds no Fashion-MNIST"):
        load_task_data(load_task_config("B"), data_dir=tmp_path / "empty")


def test_augmentation_is_a_shifted_crop_and_flip():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    augment = PadCropFlip(AugmentSpec(crop_padding=1, hflip=True))
    out = augment.apply(x, augment.sample(2, torch.Generator().manual_seed(0)))
    assert out.shape == x.shape
    for i in range(2):
        padded = torch.nn.functional.pad(x[i], (1, 1, 1, 1))
        views = [padded[:, dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)]
        views += [v.flip(-1) for v in views]
        assert any(torch.equal(out[i], v) for v in views)


def test_batches_cover_each_sample_once_and_replay_per_epoch():
    split = Split(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous(),
                  torch.arange(10))
    batches = Batches(split, 4, "cpu", shuffle=True, seed=3)
    seen = torch.cat([b.y for b in batches])
    assert sorted(seen.tolist()) == list(range(10)) and len(batches) == 3
    first = [b.y.tolist() for b in batches]
    batches.set_epoch(1)
    second = [b.y.tolist() for b in batches]
    batches.set_epoch(0)
    assert [b.y.tolist() for b in batches] == first != second
    x, y, index, view, mix = next(iter(batches))
    assert torch.equal(split.labels[index], y) and view is None and mix is None
    assert x.dtype == torch.float32 and torch.allclose(x[:, 0, 0, 0] * 255, y.float())


def test_view_pool_replays_the_same_views():
    split = Split(torch.randint(0, 256, (20, 1, 6, 6), dtype=torch.uint8), torch.arange(20) % 2)
    spec = AugmentSpec(crop_padding=2, hflip=True)
    batches = Batches(split, 8, "cpu", shuffle=True, augment=spec, seed=1, views=3, pool_seed=7)
    again = Batches(split, 8, "cpu", shuffle=True, augment=spec, seed=99, views=3, pool_seed=7)
    assert batches.num_views == 3 and all(torch.equal(batches.pool.params(v), again.pool.params(v)) for v in range(3))
    for epoch in range(5):
        batches.set_epoch(epoch)
        for batch in batches:
            replay = again.batch(batch.index, batch.view)
            assert torch.equal(batch.x, replay.x) and set(batch.view.tolist()) == {epoch % 3}
    views = [torch.equal(batches.batch(torch.arange(20), torch.full((20,), v)).x,
                         batches.batch(torch.arange(20), torch.zeros(20, dtype=torch.long)).x) for v in range(3)]
    assert views == [True, False, False]  # the pool's views differ from each other


def test_a_blending_pool_blends_each_image_with_its_partner_by_its_own_share():
    split = Split(torch.randint(0, 256, (30, 1, 6, 6), dtype=torch.uint8), torch.arange(30) % 4)
    spec = AugmentSpec(crop_padding=2, hflip=True)
    blended = Batches(split, 8, "cpu", shuffle=True, augment=spec, seed=1, views=3, pool_seed=7, mixup=0.4)
    plain = Batches(split, 8, "cpu", augment=spec, views=3, pool_seed=7)  # the same views, unblended
    for epoch in range(3):
        blended.set_epoch(epoch)
        for batch in blended:
            partner, share = blended.pool.pairing_at(batch.view, batch.index)
            own, other = plain.batch(batch.index, batch.view), plain.batch(partner, batch.view)
            lam = share.view(-1, 1, 1, 1)
            assert torch.allclose(batch.x, lam * own.x + (1 - lam) * other.x)
            assert torch.equal(batch.y, torch.where(share >= 0.5, own.y, other.y))  # the larger part's label
            lam = share.unsqueeze(1)  # the labels blended as the images were
            expected = lam * F.one_hot(own.y, 4) + (1 - lam) * F.one_hot(other.y, 4)
            assert torch.allclose(batch.mix.soft_labels(4), expected)
            assert torch.equal(batch.index, own.index)  # a blend is filed under its own image (the cache's row)
    partner, share = blended.pool.pairing(0)
    assert sorted(partner.tolist()) == list(range(30)) and ((0 < share) & (share < 1)).all()
    assert not torch.equal(partner, blended.pool.pairing(1)[0])  # each view pairs anew


def test_a_blend_is_the_same_whatever_the_run_seed_or_the_pool_size():
    split = Split(torch.randint(0, 256, (30, 1, 6, 6), dtype=torch.uint8), torch.arange(30) % 4)
    pools = [Batches(split, 8, "cpu", shuffle=True, seed=seed, views=views, pool_seed=7, mixup=0.4).pool
             for seed, views in ((1, 3), (99, 50))]
    assert all(torch.equal(a, b) for a, b in zip(pools[0].pairing(2), pools[1].pairing(2)))
    other_seed = Batches(split, 8, "cpu", views=3, pool_seed=8, mixup=0.4).pool
    assert not torch.equal(pools[0].pairing(2)[1], other_seed.pairing(2)[1])


def test_shares_follow_mixups_beta_distribution():
    """Beta(a, a) has mean 1/2 and variance 1 / (4 (2a + 1)): 0.0463 for a = 0.4."""
    split = Split(torch.zeros((20000, 1, 4, 4), dtype=torch.uint8), torch.zeros(20000, dtype=torch.long))
    share = Batches(split, 8, "cpu", views=1, mixup=0.4).pool.pairing(0)[1]
    assert share.mean().item() == pytest.approx(0.5, abs=0.01)
    assert share.var().item() == pytest.approx(1 / (4 * 1.8), rel=0.05)


def test_processes_blend_their_shards_as_one_process_would():
    split = Split(torch.randint(0, 256, (16, 1, 6, 6), dtype=torch.uint8), torch.arange(16) % 5)
    spec = AugmentSpec(crop_padding=2, hflip=True)
    options = dict(shuffle=True, augment=spec, seed=2, views=2, mixup=0.4)
    single = Batches(split, 8, "cpu", **options)
    ranks = [Batches(split, 4, "cpu", rank=r, world_size=2, **options) for r in range(2)]
    for epoch in range(2):
        for batches in (single, *ranks):
            batches.set_epoch(epoch)
        for whole, *shards in zip(single, *ranks):
            assert torch.equal(torch.cat([s.x for s in shards]), whole.x)
            assert torch.equal(torch.cat([s.mix.soft_labels(5) for s in shards]), whole.mix.soft_labels(5))


def test_only_pooled_views_blend():
    split = Split(torch.zeros((4, 1, 4, 4), dtype=torch.uint8), torch.arange(4))
    with pytest.raises(ValueError, match="mixup blends pooled views only"):
        Batches(split, 2, "cpu", mixup=0.4)
    with pytest.raises(ValueError, match="does not blend"):
        Batches(split, 2, "cpu", views=2).pool.pairing(0)


def test_view_pool_without_augmentation_is_the_image_itself():
    split = Split(torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8), torch.arange(5))
    batches = Batches(split, 5, "cpu", views=4)
    assert batches.num_views == 1
    batch = next(iter(batches))
    assert torch.equal(batch.x * 255, split.images.float())


def test_shards_of_a_global_batch_make_up_the_single_process_batch():
    split = Split(torch.zeros(11, 1, 2, 2, dtype=torch.uint8), torch.arange(11))
    single = [b.index.tolist() for b in Batches(split, 6, "cpu", shuffle=True, seed=4)]
    ranks = [[b.index.tolist() for b in Batches(split, 3, "cpu", shuffle=True, seed=4, rank=r, world_size=2)]
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 2
    for step, batch in enumerate(single):
        together = ranks[0][step] + ranks[1][step]
        assert len(ranks[0][step]) == len(ranks[1][step])
        assert together == batch or (step == 1 and together == batch + single[0][:1])  # padded by wrapping


def test_processes_augment_their_shards_differently_and_together_as_one_process():
    split = Split(torch.randint(0, 256, (16, 1, 6, 6), dtype=torch.uint8), torch.arange(16))
    spec = AugmentSpec(crop_padding=2, hflip=True)
    single = Batches(split, 8, "cpu", shuffle=True, augment=spec, seed=2)
    ranks = [Batches(split, 4, "cpu", shuffle=True, augment=spec, seed=2, rank=r, world_size=2) for r in range(2)]
    for whole, *shards in zip(single, *ranks):
        assert torch.equal(torch.cat([s.x for s in shards]), whole.x)
    # the same image at the same place in each process's shard would have got the same crop before
    same = Split(split.images[:1].expand(16, 1, 6, 6).contiguous(), torch.arange(16))
    first, second = (next(iter(Batches(same, 4, "cpu", augment=spec, seed=2, rank=r, world_size=2)))
                     for r in range(2))
    assert not torch.equal(first.x, second.x)


def test_the_splits_are_disjoint_by_index_and_together_hold_every_image(monkeypatch):
    """Each image carries its index in two pixels, so the splits can be told apart by index, not by
    content (scikit-learn's digits hold duplicate images)."""
    n = 1797
    ids = np.arange(n)
    images = np.zeros((n, 1, 2, 2), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = ids // 256, ids % 256
    monkeypatch.setattr(kd.data, "_read_source", lambda task, data_dir: ({"train": (images, ids % 10)}, "ids"))
    raw = tiny_task_raw(Path("teachers"), classes=[str(i) for i in range(10)], size=2)
    raw["data"].update(test_size=0.2, val_size=0.15)
    data = load_task_data(parse_task_config(raw, "ids"))
    index = {name: set((split.images[:, 0, 0, 0].long() * 256 + split.images[:, 0, 0, 1].long()).tolist())
             for name, split in (("train", data.train), ("val", data.val), ("test", data.test))}
    assert [len(index[name]) for name in ("train", "val", "test")] == [1221, 216, 360]
    assert not index["train"] & index["val"] and not index["train"] & index["test"] and not index["val"] & index["test"]
    assert index["train"] | index["val"] | index["test"] == set(range(n))
