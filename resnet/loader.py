"""Batches for training and evaluation.

``DeviceLoader`` keeps the whole uint8 training set on the accelerator and augments whole batches
there: it is faster to move 150 MB of uint8 once than to decode, augment and copy every image every
epoch in worker processes. ``eval_loader`` is a plain DataLoader that Accelerate prepares, so that
``gather_for_metrics`` can drop the padding it adds and every image is counted exactly once.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .augment import AugmentConfig, batch_cutout


def to_chw_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) numpy -> uint8 (N, C, H, W) contiguous tensor."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, epoch, rank): resuming at an epoch replays it exactly."""
    return (seed * 1_000_003 + epoch * 1_009 + rank * 7_919) % (2**63)


class DeviceLoader:
    """Iterate augmented training batches from a dataset held on ``device``.

    Each epoch all ranks draw the same seeded permutation and cut it into global batches of
    ``batch_size * world_size``; rank r takes the r-th slice of each. So the sequence of global
    batches does not depend on the number of processes (a 2 x 128 run sees what a 1 x 256 run sees),
    every rank runs the same number of steps, and the last partial global batch is dropped.
    Augmentation draws come from a per-rank generator, so ranks never share crops.
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
        channels_last: bool = False,
    ):
        if len(images) < world_size * batch_size:
            raise ValueError(f"{len(images)} training images cannot fill one batch of {batch_size} "
                             f"on each of {world_size} processes; lower --batch-size")
        self.images = to_chw_tensor(images).to(device)
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(device)
        self.batch_size, self.device, self.augment = batch_size, device, augment
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.channels_last = channels_last
        self.epoch = 0
        self.generator = torch.Generator(device=device)

    def __len__(self) -> int:
        return len(self.images) // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        perm = torch.randperm(len(self.images), generator=order).to(self.device)
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch, self.rank + 1))
        global_batch = self.batch_size * self.world_size
        for i in range(len(self)):
            if i < getattr(self, "skip", 0):  # TEMP until the loader branch lands
                self.augment(self.images[perm[:self.batch_size]], self.generator)
                continue
            start = i * global_batch + self.rank * self.batch_size
            idx = perm[start:start + self.batch_size]
            x = self.augment(self.images[idx], self.generator)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]


def eval_loader(images: np.ndarray, labels: np.ndarray | None, batch_size: int) -> DataLoader:
    """Unshuffled uint8 batches in input order; pass it through ``accelerator.prepare`` to shard it."""
    x = to_chw_tensor(images)
    y = torch.as_tensor(labels, dtype=torch.long) if labels is not None else torch.zeros(len(x), dtype=torch.long)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


# ------------------------------------------------------------------------------------------------
# Classic path: per-image PIL transforms in DataLoader workers, for what has no batched form
# (timm RandAugment / AutoAugment / AugMix, timm random erasing).
class ImageDataset(Dataset):
    """uint8 (N, H, W, C) images as PIL images through ``transform``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class Cutout:
    """Per-image cutout for the worker path (the batched one is augment.batch_cutout)."""

    def __init__(self, size: int, p: float):
        self.size, self.p = size, p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return batch_cutout(x[None], self.size, torch.default_generator, self.p)[0]


def timm_auto_augment(spec: str, mean: tuple[float, ...]) -> Callable:
    """timm's policy for a config string: 'rand-m9-mstd0.5', 'augmix-m5-w3', or 'original'/'v0' AutoAugment."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    hparams = {"translate_const": 14, "img_mean": tuple(round(255 * m) for m in mean)}
    if spec.startswith("rand"):
        return rand_augment_transform(spec, hparams)
    if spec.startswith("augmix"):
        return augment_and_mix_transform(spec, hparams)
    return auto_augment_transform(spec, hparams)


def per_image_transform(cfg: AugmentConfig, mean: tuple[float, ...], std: tuple[float, ...],
                        auto_augment: str | None = None, random_erasing: float = 0.0) -> Callable:
    """torchvision/timm equivalent of BatchAugment(cfg), plus the timm policies, for one PIL image."""
    from timm.data.random_erasing import RandomErasing
    from torchvision import transforms as T

    steps: list[Callable] = []
    if cfg.crop_scale < 1:
        steps.append(T.RandomResizedCrop(32, scale=(cfg.crop_scale, 1.0), ratio=(cfg.crop_ratio, 1 / cfg.crop_ratio)))
    if cfg.translate:
        steps.append(T.RandomCrop(32, padding=cfg.translate, padding_mode="reflect"))
    if cfg.hflip:
        steps.append(T.RandomHorizontalFlip(cfg.hflip))
    if cfg.vflip:
        steps.append(T.RandomVerticalFlip(cfg.vflip))
    if cfg.rotation:
        steps.append(T.RandomRotation(cfg.rotation))
    if cfg.color_jitter or cfg.hue:
        jitter = T.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter, cfg.hue)
        steps.append(T.RandomApply([jitter], p=cfg.jitter_p))
    if auto_augment:
        steps.append(timm_auto_augment(auto_augment, mean))
    if cfg.blur_sigma:
        kernel = 2 * min(math.ceil(3 * cfg.blur_sigma), 15) + 1
        steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, cfg.blur_sigma))], p=cfg.blur_p))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if cfg.cutout:
        steps.append(Cutout(cfg.cutout, cfg.cutout_p))
    if random_erasing:
        steps.append(RandomErasing(random_erasing, mode="pixel", device="cpu"))
    return T.Compose(steps)


class WorkerLoader:
    """A prepared DataLoader with DeviceLoader's interface (len, set_epoch, channels_last batches)."""

    def __init__(self, loader, channels_last: bool):
        self.loader, self.channels_last = loader, channels_last

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield (x.contiguous(memory_format=torch.channels_last) if self.channels_last else x), y


def worker_loader(accelerator, images: np.ndarray, labels: np.ndarray, batch_size: int, transform: Callable,
                  workers: int, seed: int, channels_last: bool) -> WorkerLoader:
    """Shuffled per-image pipeline in ``workers`` processes, sharded by Accelerate."""
    loader = DataLoader(ImageDataset(images, labels, transform), batch_size=batch_size, shuffle=True,
                        drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(seed), pin_memory=accelerator.device.type == "cuda")
    return WorkerLoader(accelerator.prepare(loader), channels_last)
