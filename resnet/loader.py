"""Batches for training and evaluation.

``DeviceLoader`` keeps the whole uint8 training set on the accelerator and augments whole batches
there: it is faster to move 150 MB of uint8 once than to decode, augment and copy every image every
epoch in worker processes. ``eval_loader`` is a plain DataLoader that Accelerate prepares, so that
``gather_for_metrics`` can drop the padding it adds and every image is counted exactly once.

Both training paths (``DeviceLoader``, ``WorkerLoader``) draw their batches from ``global_batch_indices``
and seed all randomness from (seed, epoch, position), never from a stream that runs across batches:
any batch of any epoch can be rebuilt on its own, so ``set_epoch(epoch, skip)`` resumes exactly.
"""
from __future__ import annotations

import math
import random
import signal
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset, get_worker_info

from .augment import AugmentConfig, alternating_flip_half, batch_alternating_flip, batch_cutout
from .knobs import ConfigError


def to_chw_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) numpy -> uint8 (N, C, H, W) contiguous tensor."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from integers (run seed, stream, epoch, ...); nearby tuples give unrelated seeds.

    SeedSequence hashes its input, where a linear mix (seed * a + epoch * b + ...) lets, say, (epoch 1,
    batch 0) and (epoch 0, batch b) collide.
    """
    return int(np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(1, np.uint64)[0])


# Streams derived from the run seed; the stream id comes right after it, so streams never share a seed.
_ORDER, _BATCH_AUG, _IMAGE_AUG, _FLIP_HALF = range(4)


def flip_half(n: int, seed: int) -> torch.Tensor:
    """The run's fixed half for ``--flip alternate``: one coin per training image, from the run seed only."""
    return alternating_flip_half(n, derive_seed(seed, _FLIP_HALF))


def check_fits(n: int, batch_size: int, world_size: int) -> None:
    """Both training loaders drop the last partial global batch; with none left there is nothing to train on."""
    if n < batch_size * world_size:
        where = f" on each of {world_size} processes" if world_size > 1 else ""
        raise ConfigError(f"--batch-size: {n} training images cannot fill one batch of {batch_size}{where}; "
                          f"lower --batch-size (or --val-split)")


def global_batch_indices(n: int, batch_size: int, world_size: int, rank: int, seed: int, epoch: int) -> torch.Tensor:
    """Rank ``rank``'s index batches for ``epoch``: (n // (batch_size * world_size), batch_size) int64, on the CPU.

    One permutation seeded by (seed, epoch), the same on every rank, cut into global batches of
    ``batch_size * world_size``; rank r takes the r-th slice of each. So the sequence of global batches
    does not depend on the number of processes (a 2 x 128 run sees what a 1 x 256 run sees), every rank
    runs the same number of steps, and the last partial global batch is dropped.
    """
    order = torch.Generator().manual_seed(derive_seed(seed, _ORDER, epoch))
    perm = torch.randperm(n, generator=order)
    steps = n // (batch_size * world_size)
    return perm[:steps * batch_size * world_size].view(steps, world_size, batch_size)[:, rank]


def _check_skip(skip: int, steps: int) -> None:
    if not 0 <= skip <= steps:
        raise ValueError(f"skip must be in [0, {steps}] (batches per epoch), got {skip}")


class DeviceLoader:
    """Iterate augmented training batches from a dataset held on ``device``.

    Batches follow ``global_batch_indices`` (same global batches for any process count). Batch i of
    an epoch is augmented with a generator seeded by (seed, epoch, rank, i): ranks never share crops,
    and ``set_epoch(epoch, skip=k)`` yields exactly batches k.. of the full epoch without replaying
    the first k. ``len`` is always the full number of batches per epoch. With ``alternate_flip`` the
    loader mirrors images by airbench's every-other-epoch scheme before ``augment`` (which should then
    not flip): whether image i is mirrored in epoch e depends on (seed, i, e) only.
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
        alternate_flip: bool = False,
    ):
        check_fits(len(images), batch_size, world_size)
        self.images = to_chw_tensor(images).to(device)
        self.flip_half = flip_half(len(images), seed).to(device) if alternate_flip else None
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(device)
        self.batch_size, self.device, self.augment = batch_size, device, augment
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.channels_last = channels_last
        self.epoch, self.skip = 0, 0
        self.generator = torch.Generator(device=device)

    def __len__(self) -> int:
        return len(self.images) // (self.batch_size * self.world_size)

    def close(self) -> None:
        """Nothing to release (WorkerLoader's counterpart shuts its workers down)."""

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next pass yields batches ``skip``.. of ``epoch`` (skip > 0 resumes mid-epoch)."""
        _check_skip(skip, len(self))
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, skip = self.epoch, self.skip
        self.skip = 0  # a skip applies to one pass
        return self._batches(epoch, skip)

    def _batches(self, epoch: int, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = global_batch_indices(len(self.images), self.batch_size, self.world_size, self.rank, self.seed,
                                       epoch).to(self.device)
        for i in range(skip, len(batches)):
            # Reseeding is host-side only (no device sync), and makes batch i independent of batches before it.
            self.generator.manual_seed(derive_seed(self.seed, _BATCH_AUG, epoch, self.rank, i))
            idx = batches[i]
            x = self.images[idx]
            if self.flip_half is not None:
                x = batch_alternating_flip(x, self.flip_half[idx], epoch)
            x = self.augment(x, self.generator)
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
@contextmanager
def _seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, Python's ``random`` and NumPy's global RNG; restore them afterwards.

    torchvision's v1 transforms draw from torch's, timm's policies from ``random`` and NumPy's. The
    restore keeps the training process's own streams undisturbed when workers=0; a worker process
    has no other users of its RNGs, so it skips it (NumPy's get/set_state alone cost ~100 us an image).
    """
    restore = get_worker_info() is None
    if restore:
        saved = torch.default_generator.get_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that would reseed the CUDA generators too
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        if restore:
            torch.default_generator.set_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


class ImageDataset(Dataset):
    """uint8 (N, H, W, C) images as PIL images through ``transform``, indexed by (index, epoch) pairs.

    Image i of epoch e is transformed with the global RNGs seeded by (seed, e, i), so its augmentation
    does not depend on which worker process runs it or on what ran there before. With
    ``alternate_flip`` it is first mirrored as on the device path (``batch_alternating_flip``).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable, seed: int = 0,
                 alternate_flip: bool = False):
        self.images, self.labels, self.transform, self.seed = images, labels, transform, seed
        self.flip_half = flip_half(len(images), seed).numpy() if alternate_flip else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, epoch = key
        image = self.images[i]
        if self.flip_half is not None and self.flip_half[i] != bool(epoch % 2):
            image = np.ascontiguousarray(image[:, ::-1])
        with _seeded_global_rngs(derive_seed(self.seed, _IMAGE_AUG, epoch, i)):
            x = self.transform(Image.fromarray(image))
        return x, int(self.labels[i])


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """A DataLoader ``batch_sampler``: this rank's ``global_batch_indices`` as lists of (index, epoch) pairs.

    The epoch travels with each index because the sampler runs in the main process while the images
    are transformed in worker processes, which must seed by it.
    """

    def __init__(self, n: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        self.n, self.batch_size, self.world_size, self.rank, self.seed = n, batch_size, world_size, rank, seed
        self.epoch, self.skip = 0, 0

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        _check_skip(skip, len(self))
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # Not one-shot: a worker DataLoader calls iter() twice for its first pass (WorkerLoader resets skip).
        batches = global_batch_indices(self.n, self.batch_size, self.world_size, self.rank, self.seed, self.epoch)
        return iter([[(i, self.epoch) for i in batch] for batch in batches[self.skip:].tolist()])


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


def _leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """Workers ignore SIGINT and SIGTERM, which Ctrl-C and job schedulers send to the whole process group.

    Killed by them, a worker would take the batch in flight with it, and the main process would stop with
    DataLoader's traceback instead of saving. The main process stops after its step and shuts its workers
    down; a worker whose main process died exits by itself (DataLoader's watchdog).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class WorkerLoader:
    """The per-image path with DeviceLoader's interface and guarantees, yielding batches on ``device``.

    Batches follow ``global_batch_indices`` (``GlobalBatchSampler``) and each image's augmentation is a
    function of (seed, epoch, index) (``ImageDataset``): an epoch is the same for any worker count and
    any process count, and ``set_epoch(epoch, skip=k)`` yields exactly batches k.. of the full epoch.
    It shards by itself rather than through ``accelerator.prepare``, whose sharding and shuffling would
    make the batches depend on the process count and on a generator seeded once per run.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        device: torch.device,
        transform: Callable,
        *,
        workers: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        alternate_flip: bool = False,
    ):
        check_fits(len(images), batch_size, world_size)
        self.sampler = GlobalBatchSampler(len(images), batch_size, world_size, rank, seed)
        self.device, self.channels_last = device, channels_last
        dataset = ImageDataset(images, labels, transform, seed, alternate_flip)
        # A private generator: each pass DataLoader draws a worker base seed from it, which would
        # otherwise advance the global torch RNG (the images reseed per image anyway).
        self.loader = DataLoader(dataset, batch_sampler=self.sampler,
                                 num_workers=workers, persistent_workers=workers > 0,
                                 pin_memory=device.type == "cuda", generator=torch.Generator(),  # no pinning w/o a GPU
                                 worker_init_fn=_leave_stop_signals_to_the_main_process)

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next pass yields batches ``skip``.. of ``epoch`` (skip > 0 resumes mid-epoch)."""
        self.sampler.set_epoch(epoch, skip)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(self.loader)  # the sampler reads epoch and skip now
        self.sampler.skip = 0  # a skip applies to one pass
        return self._to_device(batches)

    def close(self) -> None:
        """Shut the persistent workers down now. Left to the interpreter's exit, they can outlive it: torch
        skips their shutdown once its exit flag is set, and multiprocessing ends daemonic workers with
        SIGTERM, which ours ignore (``_leave_stop_signals_to_the_main_process``): the process then hangs."""
        iterator = self.loader._iterator  # private: where DataLoader keeps its persistent workers' iterator
        if iterator is not None:
            iterator._shutdown_workers()
            self.loader._iterator = None

    def _to_device(self, batches: Iterator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in batches:
            # Pinned on CUDA, so the copy overlaps with the previous step.
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield (x.contiguous(memory_format=torch.channels_last) if self.channels_last else x), y


def worker_loader(accelerator, images: np.ndarray, labels: np.ndarray, batch_size: int, transform: Callable,
                  **options) -> WorkerLoader:
    """``WorkerLoader`` on the accelerator's device, sharded over its processes; ``options`` as WorkerLoader's."""
    return WorkerLoader(images, labels, batch_size, accelerator.device, transform, rank=accelerator.process_index,
                        world_size=accelerator.num_processes, **options)
