"""Benchmark (runs on a CPU): tensor operations dispatched per training step, adding one part at a time.

    python bench/host_ops.py [--batch-size 8]

On a GPU each operation costs the host a few microseconds in eager PyTorch (checks, dispatch, a kernel
launch), whatever the batch size, and the suite's step is bound by the host there (README, "On one GPU").
This counts the aten operations of real steps of the suite's loop (``train_one_epoch``, bf16 autocast) with
a TorchDispatchMode, from the bare forward + backward + optimizer step up to each shipped recipe's
extras, so the parts that cost the host the most show without a GPU. Counts do not depend on the batch
size; views are counted too (no kernel, but host time).
"""
import argparse
import importlib
import os
import sys
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resnet.augment import AugmentConfig, BatchAugment  # noqa: E402
from resnet.data import MEAN, STD  # noqa: E402
from resnet.distributed import create_accelerator  # noqa: E402
from resnet.engine import train_one_epoch  # noqa: E402
from resnet.loader import DeviceLoader  # noqa: E402
from resnet.models import create_model  # noqa: E402
from resnet.ema import ModelEma  # noqa: E402
from resnet.optim import LookaheadEMA, create_optimizer, create_scheduler  # noqa: E402


# On CUDA, SGD updates all its tensors with a few foreach ops by default; on a CPU it loops over them. Count
# the CUDA way.
importlib.import_module("torch.optim.sgd")._default_to_fused_or_foreach = lambda *args, **kwargs: (False, True)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(accelerator, model_name: str, opt: str, augment: AugmentConfig, ema: type | None, lookahead: bool,
                 batch_size: int, alternate_flip: bool = False) -> Counter:
    """(ops of a 4-step pass - ops of a 2-step pass) / 2, after a first pass that creates the optimizer's
    state: the steady state of one step, without each pass's own start and end."""
    torch.manual_seed(0)
    model = create_model(model_name).to(accelerator.device, memory_format=torch.channels_last)
    n = batch_size * 4
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    loader = DeviceLoader(images, np.arange(n) % 10, batch_size, accelerator.device,
                          BatchAugment(augment, MEAN, STD), channels_last=True, alternate_flip=alternate_flip)
    optimizer = create_optimizer(model, opt, 0.05, 5e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = create_scheduler(optimizer, 100, 0, 0.1, 0.0)
    average = ema(model, decay=0.999, use_warmup=True) if ema else None
    look = LookaheadEMA(model, 1, 0.95, 3, 0, 100) if lookahead else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    counts = []
    for steps in (2, 2, 4):
        counter = OpCounter()
        loader.set_epoch(0)
        with counter:
            train_one_epoch(model, loader, optimizer, scheduler, accelerator, loss_fn, 0, 0, ema=average,
                            progress=False, steps=steps, lookahead=look)
        counts.append(counter.ops)
    return Counter({k: (counts[2][k] - counts[1][k]) / 2 for k in counts[2] if counts[2][k] > counts[1][k]})


def bare_ops(accelerator, model_name: str, batch_size: int) -> Counter:
    model = create_model(model_name).to(accelerator.device, memory_format=torch.channels_last)
    optimizer = create_optimizer(model, "nesterov", 0.05, 5e-4)
    x = torch.randn(batch_size, 3, 32, 32, device=accelerator.device).contiguous(memory_format=torch.channels_last)
    y = torch.arange(batch_size, device=accelerator.device) % 10
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    counter = OpCounter()
    for counting in (False, True):  # count the second step: the first creates the momentum buffers
        with counter if counting else nullcontext():
            with torch.autocast(accelerator.device.type, dtype=torch.bfloat16):
                loss = loss_fn(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return counter.ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("RESNET_CPU_BF16", "1")  # bf16 autocast's ops on any CPU: counted, not timed
    accelerator = create_accelerator(mixed_precision="bf16")
    report = dict(accelerator=accelerator, model_name="resnet_report_4m", opt="nesterov",
                  batch_size=args.batch_size, lookahead=False)
    flip = AugmentConfig(translate=4, hflip=0.5)
    cutout = AugmentConfig(translate=4, hflip=0.5, cutout=16)
    # (what, ops per step, the row it adds to)
    rows = [("report net: bare forward + backward + Nesterov step",
             bare_ops(accelerator, "resnet_report_4m", args.batch_size), None)]
    rows.append(("  train_one_epoch, translate 4 + flip", ops_per_step(augment=flip, ema=None, **report), 0))
    rows.append(("  + cutout 16", ops_per_step(augment=cutout, ema=None, **report), 1))
    rows.append(("  + EMA of the weights, timm's ModelEmaV3", ops_per_step(augment=cutout, ema=ModelEmaV3, **report), 2))
    rows.append(("  + EMA of the weights, the suite's ModelEma instead (best.yaml)",
                 ops_per_step(augment=cutout, ema=ModelEma, **report), 2))
    rows.append(("airbench whiten net: bare forward + backward + Nesterov step",
                 bare_ops(accelerator, "resnet_airbench_whiten_2m", args.batch_size), None))
    fast = dict(accelerator=accelerator, model_name="resnet_airbench_whiten_2m", opt="muon",
                augment=AugmentConfig(translate=2), ema=None, batch_size=args.batch_size, alternate_flip=True)
    rows.append(("  train_one_epoch, Muon, translate 2, alternating flip (fast.yaml)",
                 ops_per_step(lookahead=False, **fast), 5))
    rows.append(("  + airbench's lookahead-EMA, counted at every step (the previous fast.yaml moved it every 10th)",
                 ops_per_step(lookahead=True, **fast), 6))
    for name, ops, base in rows:
        print(f"{sum(ops.values()):7.0f} ops/step  {name}")
        if base is not None:
            added = ops - rows[base][1]
            print("         most added: " + ", ".join(f"{k} {v:g}" for k, v in added.most_common(6)))


if __name__ == "__main__":
    main()
