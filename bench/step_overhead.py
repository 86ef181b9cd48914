"""Benchmark: a full train.py step vs the bare model's forward + backward + optimizer step.

    python bench/step_overhead.py [--model resnet_report_4m] [--batch-size 128] [--mixed-precision bf16]
    accelerate launch --config_file accelerate_configs/bf16.yaml bench/step_overhead.py   (same thing)

The full step is the suite's own (engine.train_epoch): DeviceLoader batch with the default augmentation
(translate + flip, drawn per image), label-smoothed loss through the prepared model, Accelerate
backward, optimizer, scheduler.step_update, metric accumulation, a read-back every 25 steps and at the
block's end. The bare step feeds one fixed, ready tensor to the same net and reads its loss at the block's
end. Both run in this process in rounds: a block of --steps of each, back to back, the order swapped every
round. Each path's figure is its best block; the overhead is bare best / full best - 1, printed with the
spread of the blocks. Goal: overhead at most 10%.

Why short blocks, many rounds: on a shared machine someone else's load comes and goes, and it only ever
slows a block down, so a path's best block is its speed on a quiet machine once one block of it ran
clean. Blocks of 10-20 steps (10-20 s on a 2-core CPU), 3 rounds, were rarely clean: with a torch job on
and off beside it (5-30 s each) they read +82% and -54% "overhead" in bf16 (issue 28 read 23-36%), where
the same steps timed one by one, alternating, differ by 1%, a quiet machine reads 0-1%, and these
defaults read -0.1% under that load. Swapping the order each round keeps a drift from always favouring
the path that runs second.
"""
import argparse
import copy
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from statistics import median
from typing import Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resnet.augment import AugmentConfig, BatchAugment  # noqa: E402
from resnet.data import MEAN, STD  # noqa: E402
from resnet.distributed import create_accelerator, precision_of  # noqa: E402
from resnet.engine import EpochPlan, StepParts, train_epoch  # noqa: E402
from resnet.interrupt import StopRequest  # noqa: E402
from resnet.loader import DeviceLoader  # noqa: E402
from resnet.models import create_model  # noqa: E402
from resnet.optim import create_optimizer, create_scheduler  # noqa: E402
from resnet.techniques import ActiveTechniques  # noqa: E402
from results import record  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_steps(model, optimizer, x, y, steps, autocast) -> float:
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    sync(x.device)
    start = time.perf_counter()
    for _ in range(steps):
        with autocast():
            loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    loss.item()
    return steps * len(x) / (time.perf_counter() - start)


def paired_rounds(full_block: Callable[[int], float], bare_block: Callable[[int], float],
                  rounds: int) -> tuple[list[float], list[float]]:
    """(full rates, bare rates), round r's two blocks run back to back: full first in even rounds, bare first
    in odd ones, so that neither path is always the one that runs later."""
    full, bare = [], []
    for r in range(rounds):
        if r % 2:
            bare.append(bare_block(r))
            full.append(full_block(r))
        else:
            full.append(full_block(r))
            bare.append(bare_block(r))
    return full, bare


def overhead_pct(full: list[float], bare: list[float]) -> float:
    """How much faster the bare step's best block ran than the full step's, in percent."""
    return 100 * (max(bare) / max(full) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet_report_4m")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="steps per block (each round: a block of each path)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds, after one warm-up round")
    parser.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"],
                        help="default: the accelerate config's")
    parser.add_argument("--record", action="store_true", help="append the figures to results/")
    parser.add_argument("--no-cudnn-benchmark", action="store_true",
                        help="GPU: keep cuDNN's default conv algorithms (the suite times them once per shape)")
    args = parser.parse_args()

    kw = {"mixed_precision": args.mixed_precision} if args.mixed_precision else {}
    accelerator = create_accelerator(**kw)
    if args.no_cudnn_benchmark:
        torch.backends.cudnn.benchmark = False
    device = accelerator.device
    torch.manual_seed(0)
    base = create_model(args.model).to(device, memory_format=torch.channels_last)
    bare = copy.deepcopy(base)

    # Full path: everything train.py runs per step.
    n = args.batch_size * args.steps
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(n) % 10
    loader = DeviceLoader(images, labels, args.batch_size, device, BatchAugment(AugmentConfig(translate=4, hflip=0.5),
                          MEAN, STD), channels_last=True)
    opt = create_optimizer(base, "nesterov", 0.05, 5e-4)
    model, opt = accelerator.prepare(base, opt)
    sched = create_scheduler(opt, 10**6, 0, 0.1, 0.0)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)

    # Bare path: the same net and batch size, one ready tensor, the same dtype policy.
    bare_opt = create_optimizer(bare, "nesterov", 0.05, 5e-4)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext

    parts = StepParts(model, opt, loss_fn, accelerator, ActiveTechniques([]))
    step = 0

    def full_block(round_: int) -> float:
        nonlocal step
        loader.set_epoch(round_)
        out = train_epoch(parts, loader, sched, EpochPlan(round_, 0, len(loader), step), stop, 25, progress=False)
        step = out.global_step
        return out.sums.seen / out.sums.elapsed

    with StopRequest() as stop:
        full_rates, bare_rates = paired_rounds(full_block, lambda _: bare_steps(bare, bare_opt, x, y, args.steps,
                                                                                autocast), args.repeats + 1)
    full_rates, bare_rates = full_rates[1:], bare_rates[1:]  # round 0 warms both paths up
    full, bare_best, overhead = max(full_rates), max(bare_rates), overhead_pct(full_rates, bare_rates)
    print(f"{args.model}, batch {args.batch_size}, {accelerator.mixed_precision} precision, {device}, "
          f"cudnn.benchmark {torch.backends.cudnn.benchmark}, torch threads {torch.get_num_threads()}, "
          f"best of {args.repeats} rounds x {args.steps} steps of each")
    print(f"bare forward+backward+step: {bare_best:8.1f} img/s (blocks {min(bare_rates):.1f}..{median(bare_rates):.1f}"
          f"..{bare_best:.1f}: slowest, median, best)")
    print(f"full train.py step:         {full:8.1f} img/s (blocks {min(full_rates):.1f}..{median(full_rates):.1f}"
          f"..{full:.1f})")
    print(f"overhead: {overhead:.1f}% (goal: at most 10%)")
    if args.record:
        subject = f"{args.model}, batch {args.batch_size}, {precision_of(accelerator)}"
        command = (f"python bench/step_overhead.py --model {args.model} --batch-size {args.batch_size} "
                   f"--steps {args.steps} --repeats {args.repeats}"
                   + (f" --mixed-precision {args.mixed_precision}" if args.mixed_precision else ""))
        record("step_overhead", subject, "bare_images_per_sec", bare_best, command)
        record("step_overhead", subject, "full_images_per_sec", full, command)
        record("step_overhead", subject, "overhead_pct", overhead, command)


if __name__ == "__main__":
    main()
