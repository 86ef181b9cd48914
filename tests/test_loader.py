import numpy as np
import pytest
import torch

from resnet.augment import AugmentConfig, BatchAugment
from resnet.loader import DeviceLoader


def make(world_size=1, rank=0, n=103, batch=10, seed=0):
    images = np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(32, 1).repeat(32, 2).repeat(3, 3)
    labels = np.arange(n)
    # Identity "augmentation" that keeps the index readable from the pixels.
    return DeviceLoader(images, labels, batch, torch.device("cpu"), lambda x, g: x.float(), seed=seed,
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
        loader = DeviceLoader(images, np.zeros(40), 20, torch.device("cpu"), aug, rank=rank, world_size=2)
        outs.append(next(iter(loader))[0])
    assert not torch.equal(outs[0], outs[1])


def test_too_few_images_for_one_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="--batch-size"):
        make(n=15, batch=10, world_size=2)
