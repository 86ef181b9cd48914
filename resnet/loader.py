"""Batches for training and evaluation.

``DeviceLoader`` keeps the whole uint8 training set on the accelerator and augments whole batches
there: it is faster to move 150 MB of uint8 once than to decode, augment and copy every image every
epoch in worker processes. ``eval_loader`` is a plain DataLoader that Accelerate prepares, so that
``gather_for_metrics`` can drop the padding it adds and every image is counted exactly once.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


def to_chw_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) numpy -> uint8 (N, C, H, W) contiguous tensor."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, epoch, rank): resuming at an epoch replays it exactly."""
    return (seed * 1_000_003 + epoch * 1_009 + rank * 7_919) % (2**63)


class DeviceLoader:
    """Iterate augmented training batches from a dataset held on ``device``.

    Each epoch all ranks draw the same seeded permutation and each takes a disjoint, equal-length
    slice of it, so every rank runs the same number of steps. Augmentation draws come from a
    per-rank generator, so ranks never share crops.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        device: torch.device,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        channels_last: bool = False,
    ):
        if len(images) < world_size * (batch_size if drop_last else 1):
            raise ValueError(f"{len(images)} training images cannot fill one batch of {batch_size} "
                             f"on each of {world_size} processes; lower --batch-size")
        self.images = to_chw_tensor(images).to(device)
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(device)
        self.batch_size, self.device, self.augment = batch_size, device, augment
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last, self.channels_last = drop_last, channels_last
        self.epoch = 0
        self.generator = torch.Generator(device=device)

    @property
    def per_rank(self) -> int:
        """Images each rank sees per epoch (the remainder of N / world_size is skipped)."""
        return len(self.images) // self.world_size

    def __len__(self) -> int:
        if self.drop_last:
            return self.per_rank // self.batch_size
        return -(-self.per_rank // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        perm = torch.randperm(len(self.images), generator=order).to(self.device)
        mine = perm[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch, self.rank + 1))
        for i in range(len(self)):
            idx = mine[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.augment(self.images[idx], self.generator)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]


def eval_loader(images: np.ndarray, labels: np.ndarray | None, batch_size: int) -> DataLoader:
    """Unshuffled uint8 batches in input order; pass it through ``accelerator.prepare`` to shard it."""
    x = to_chw_tensor(images)
    y = torch.as_tensor(labels, dtype=torch.long) if labels is not None else torch.zeros(len(x), dtype=torch.long)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
