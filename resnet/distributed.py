"""One place that builds the Accelerator, so every script gets the same device and precision rules."""
from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, parse_flag_from_env

from .knobs import ConfigError
from .hardware import EMULATED_BF16_SLOWDOWN, cpu_has_native_bf16, cpu_model


def create_accelerator(**kwargs) -> Accelerator:
    """An Accelerator that falls back to CPU cleanly, trains a CPU in the precision it computes fast,
    and refuses fp16 on CPU.

    ``cpu=True`` when the machine has no accelerator: without it a 2-process MULTI_GPU launch on a
    CPU-only machine starts two unsynchronised rank-0 processes instead of one gloo group. bf16 asked
    for on a CPU without native bf16 becomes fp32, with one line saying so: emulated bf16 ran about 18x
    slower than fp32 (resnet.hardware).
    """
    on_cpu = not torch.accelerator.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
    asked = kwargs.get("mixed_precision") or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    to_fp32 = on_cpu and asked == "bf16" and not cpu_has_native_bf16()
    if to_fp32:
        kwargs["mixed_precision"] = "no"
    accelerator = Accelerator(cpu=not torch.accelerator.is_available(), **kwargs)
    if to_fp32:
        accelerator.print(f"precision: fp32, not the bf16 asked for: this CPU ({cpu_model()}) has no native bf16 "
                          f"(AVX512-BF16 or AMX) and would emulate it {EMULATED_BF16_SLOWDOWN} slower than fp32; "
                          "see python -m resnet.hardware")
    if accelerator.device.type == "cpu":
        # fp16 (and so Accelerate's GradScaler) is reachable on CUDA only. The scaler itself runs on a CPU:
        # tests/test_gpu_branches.py drives MuonSGD's amp path with torch.amp.GradScaler("cpu").
        if accelerator.mixed_precision == "fp16":
            advice = ("use bf16 instead: --config_file accelerate_configs/bf16.yaml" if cpu_has_native_bf16() else
                      "this CPU has no native bf16 either: use fp32, --config_file accelerate_configs/cpu.yaml")
            raise ConfigError(f"fp16 mixed precision on CPU runs in fp32 or crawls (7 images/s here); {advice}")
        use_all_cores()
    elif accelerator.device.type == "cuda":
        # Batch shapes are fixed, so let cuDNN time its conv algorithms once and keep the fastest (airbench does).
        # Untestable on a CPU: the flag is read by cuDNN only; CPU convolutions (oneDNN) ignore it.
        torch.backends.cudnn.benchmark = True
    return accelerator


def main_process_value(accelerator: Accelerator, value: Any) -> Any:
    """The main process's ``value``, on every process: one run folder, W&B run and plan for all, never
    one per rank's own clock or reading of the disk."""
    if accelerator.num_processes == 1:
        return value
    return broadcast_object_list([value])[0]


def end_process_group() -> None:
    """Tear the process group down before the interpreter does. A gloo rank that exits with its group
    alive can abort at exit (SIGABRT, "terminate called without an active exception", pytorch#190489):
    a finished 2-process evaluation then reports a failure."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def use_all_cores() -> None:
    """Give each local process its share of the cores, or RESNET_THREADS threads when set.

    accelerate launch sets OMP_NUM_THREADS=1 whenever the config lacks ``use_cpu: true`` (bf16.yaml,
    for one), which halves CPU training speed on a 2-core machine without a word. RESNET_THREADS is for
    sharing a machine (the tests run two at once with one thread each).
    """
    if os.environ.get("RESNET_THREADS", "").isdigit():
        torch.set_num_threads(max(1, int(os.environ["RESNET_THREADS"])))
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if torch.get_num_threads() < share:
        torch.set_num_threads(share)


def precision_of(accelerator: Accelerator) -> str:
    """The precision the run computes in: fp32, bf16 or fp16."""
    return {"no": "fp32"}.get(str(accelerator.mixed_precision), str(accelerator.mixed_precision))


def scaled_lr(lr: float, rule: str, num_processes: int) -> float:
    """The lr for ``num_processes`` times the per-process batch: none, linear (Goyal et al.) or sqrt."""
    factor = {"none": 1.0, "linear": float(num_processes), "sqrt": num_processes ** 0.5}[rule]
    return lr * factor
