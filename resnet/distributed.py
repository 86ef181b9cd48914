"""One place that builds the Accelerator, so every script gets the same device and precision rules."""
from __future__ import annotations

import os

import torch
from accelerate import Accelerator

from .config import ConfigError


def create_accelerator(**kwargs) -> Accelerator:
    """An Accelerator that falls back to CPU cleanly and refuses fp16 on CPU.

    ``cpu=True`` when the machine has no accelerator: without it a 2-process MULTI_GPU launch on a
    CPU-only machine starts two unsynchronised rank-0 processes instead of one gloo group.
    """
    accelerator = Accelerator(cpu=not torch.accelerator.is_available(), **kwargs)
    if accelerator.device.type == "cpu":
        if accelerator.mixed_precision == "fp16":
            raise ConfigError("fp16 mixed precision on CPU runs in fp32 or crawls (7 images/s here); "
                              "use bf16 instead: accelerate launch --mixed_precision bf16 ... "
                              "or --config_file accelerate_configs/bf16.yaml")
        use_all_cores()
    elif accelerator.device.type == "cuda":
        # Batch shapes are fixed, so let cuDNN time its conv algorithms once and keep the fastest (airbench does).
        torch.backends.cudnn.benchmark = True
    return accelerator


def use_all_cores() -> None:
    """Give each local process its share of the cores.

    accelerate launch sets OMP_NUM_THREADS=1 whenever the config lacks ``use_cpu: true`` (bf16.yaml,
    for one), which halves CPU training speed on a 2-core machine without a word.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if torch.get_num_threads() < share:
        torch.set_num_threads(share)


def scaled_lr(lr: float, rule: str, num_processes: int) -> float:
    """The lr for ``num_processes`` times the per-process batch: none, linear (Goyal et al.) or sqrt."""
    factor = {"none": 1.0, "linear": float(num_processes), "sqrt": num_processes ** 0.5}[rule]
    return lr * factor
