"""One place that builds the Accelerator, so every script gets the same device and precision rules."""
from __future__ import annotations

import torch
from accelerate import Accelerator

from .config import ConfigError


def create_accelerator(**kwargs) -> Accelerator:
    """An Accelerator that falls back to CPU cleanly and refuses fp16 on CPU.

    ``cpu=True`` when the machine has no accelerator: without it a 2-process MULTI_GPU launch on a
    CPU-only machine starts two unsynchronised rank-0 processes instead of one gloo group.
    """
    accelerator = Accelerator(cpu=not torch.accelerator.is_available(), **kwargs)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("fp16 mixed precision on CPU runs in fp32 or crawls (7 images/s here); "
                          "use bf16 instead: accelerate launch --mixed_precision bf16 ... "
                          "or --config_file accelerate_configs/bf16.yaml")
    return accelerator
