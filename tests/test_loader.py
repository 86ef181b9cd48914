import random

import numpy as np
import pytest
import torch

from resnet.augment import AugmentConfig, BatchAugment
from resnet.config import ConfigError
from resnet.loader import DeviceLoader, WorkerLoader, global_batch_indices, per_image_transform

CPU = torch.device("cpu")


def make(world_size=1, rank=0, n=103, batch=10, seed=0):
    images = np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(32, 1).repeat(32, 2).repeat(3, 3)
    labels = np.arange(n)
    # Identity "augmentation" that keeps the index readable from the pixels.
    return DeviceLoader(images, labels, batch, CPU, lambda x, g: x.float(), seed=seed,
                        rank=rank, world_size=world_size)


def epoch_labels(loader, epoch):
    loader.set_epoch(epoch)
    return torch.cat([y for _, y in loader]).tolist()


def test_ranks_get_disjoint_equal_shards():
    loaders = [make(world_size=2, rank=r) for r in (0, 1)]
    assert len(loaders[0]) == len(loaders[1]) == 103 // 20
    seen = [epoch_labels(l, 0) for l in loaders]
    assert set(seen[0]).isdisjoint(seen[1])
    assert len(seen[0]) == len(seen[1]) == 50


def test_global_batches_do_not_depend_on_the_process_count():
    single = make(batch=20)
    pair = [make(world_size=2, rank=r, batch=10) for r in (0, 1)]
    for one, *halves in zip(single, *pair):
        assert sorted(one[1].tolist()) == sorted(torch.cat([y for _, y in halves]).tolist())


def test_global_batch_indices_slice_one_permutation_by_rank():
    whole = global_batch_indices(103, 20, 1, 0, seed=4, epoch=2)
    halves = [global_batch_indices(103, 10, 2, r, seed=4, epoch=2) for r in (0, 1)]
    assert whole.shape == (5, 20) and halves[0].shape == halves[1].shape == (5, 10)
    torch.testing.assert_close(torch.cat(halves, 1), whole)  # rank r holds the r-th slice of each global batch
    assert len(set(whole.flatten().tolist())) == 100  # last partial global batch (3 images) dropped
    assert not torch.equal(whole, global_batch_indices(103, 20, 1, 0, seed=4, epoch=3))
    assert not torch.equal(whole, global_batch_indices(103, 20, 1, 0, seed=5, epoch=2))


def test_each_epoch_is_a_new_seeded_permutation():
    loader = make()
    e0, e1 = epoch_labels(loader, 0), epoch_labels(loader, 1)
    assert e0 != e1 and len(set(e0)) == len(e0) == 100
    assert epoch_labels(make(), 1) == e1  # same seed and epoch -> same order (exact resume)


def test_labels_travel_with_their_images():
    loader = make()
    for x, y in loader:
        assert torch.equal(x[:, 0, 0, 0].long(), y)


def test_per_rank_augmentation_draws_differ():
    images = np.zeros((40, 32, 32, 3), np.uint8)
    aug = BatchAugment(AugmentConfig(translate=4, color_jitter=0.5), (0.5,) * 3, (0.5,) * 3)
    images[:, 8:24, 8:24] = 200
    outs = []
    for rank in (0, 1):
        loader = DeviceLoader(images, np.zeros(40), 20, CPU, aug, rank=rank, world_size=2)
        outs.append(next(iter(loader))[0])
    assert not torch.equal(outs[0], outs[1])


# ------------------------------------------------------------------------------------------------
# Both paths, with real augmentation: batches are a function of (seed, epoch, position) alone.
def structured(n=103, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 1, 1, 3)) * np.linspace(0.2, 1, 32)[None, :, None, None]
    return (images + rng.normal(0, 20, (n, 32, 32, 3))).clip(0, 255).astype(np.uint8), np.arange(n)


CFG = AugmentConfig(crop_scale=0.6, translate=2, hflip=0.5, rotation=10, color_jitter=0.3, hue=0.05, cutout=6)
STATS = (0.5,) * 3, (0.25,) * 3


def device_path(batch=10, rank=0, world_size=1, seed=0):
    images, labels = structured()
    return DeviceLoader(images, labels, batch, CPU, BatchAugment(CFG, *STATS), seed, rank, world_size)


def worker_path(batch=10, workers=0, rank=0, world_size=1, seed=0):
    """The per-image path with timm RandAugment (draws from `random` and NumPy) and random erasing."""
    images, labels = structured()
    transform = per_image_transform(CFG, *STATS, auto_augment="rand-m9-mstd0.5", random_erasing=0.5)
    return WorkerLoader(images, labels, batch, CPU, transform, workers=workers, seed=seed, rank=rank,
                        world_size=world_size)


def run(loader, epoch, skip=0):
    loader.set_epoch(epoch, skip)
    return list(loader)


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)


PATHS = {"device": device_path, "workers": worker_path, "2 workers": lambda: worker_path(workers=2)}


@pytest.mark.parametrize("path", PATHS)
def test_an_epoch_is_the_same_after_earlier_epochs_as_on_a_fresh_loader(path):
    ran = PATHS[path]()
    for epoch in range(3):
        last = run(ran, epoch)
    assert_same(last, run(PATHS[path](), 2))
    assert not torch.equal(last[0][0], run(ran, 1)[0][0])  # and epochs differ


@pytest.mark.parametrize("path", PATHS)
def test_set_epoch_with_skip_yields_the_tail_of_the_full_epoch(path):
    full = run(PATHS[path](), 3)
    resumed = PATHS[path]()
    tail = run(resumed, 3, skip=4)
    assert len(resumed) == len(full) == 10  # len stays the full epoch
    assert_same(tail, full[4:])
    assert_same(list(resumed), full)  # the skip applies to one pass only
    assert run(resumed, 3, skip=10) == []
    with pytest.raises(ValueError, match="skip"):
        resumed.set_epoch(3, skip=11)


def test_worker_path_does_not_depend_on_the_worker_count():
    inline, pool = worker_path(workers=0), worker_path(workers=2)
    for epoch in (0, 1):
        assert_same(run(inline, epoch), run(pool, epoch))


def test_worker_path_global_batches_do_not_depend_on_the_process_count():
    """Same global batches, same pixels: an image's augmentation depends on (seed, epoch, index) only."""
    single = run(worker_path(batch=20), 1)
    halves = [run(worker_path(batch=10, rank=r, world_size=2), 1) for r in (0, 1)]
    assert len(single) == len(halves[0]) == len(halves[1]) == 5
    for (x, y), (x0, y0), (x1, y1) in zip(single, *halves):
        assert torch.equal(y, torch.cat([y0, y1]))
        torch.testing.assert_close(x, torch.cat([x0, x1]), rtol=0, atol=0)


def test_worker_path_leaves_the_training_process_rngs_alone():
    loader = worker_path(workers=0)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    run(loader, 0)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1] and np.array_equal(np.random.get_state()[1], before[2])


@pytest.mark.parametrize("path", PATHS)
def test_too_few_images_for_one_batch_is_a_one_line_config_error(path):
    images, labels = structured(15)
    message = ("--batch-size: 15 training images cannot fill one batch of 10 on each of 2 processes; "
               "lower --batch-size (or --val-split)")
    with pytest.raises(ConfigError) as err:
        if path == "device":
            DeviceLoader(images, labels, 10, CPU, BatchAugment(CFG, *STATS), world_size=2)
        else:
            WorkerLoader(images, labels, 10, CPU, per_image_transform(CFG, *STATS), world_size=2)
    assert str(err.value) == message
