"""The loop: the step (``train_step``), the epoch with its cadenced read-backs (``train_epoch``), and
``evaluate`` (a dict) / ``predict`` (logits in input order)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .augment import normalize
from .interrupt import StopRequest
from .progress import EpochProgress, RunClock
from .state import EpochSums
from .techniques import ActiveTechniques


@dataclass
class StepParts:
    """What one update needs, built once per run (training.setup_run)."""

    model: nn.Module  # as prepared by Accelerate (DDP, compiled)
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    accelerator: Any
    techniques: ActiveTechniques


class Meters:
    """An epoch's running training sums, kept on the device: the host reads them only in ``read``."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device)
        self.seen = 0  # images, counted on the host (batch shapes are host numbers)

    @torch.no_grad()
    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        # A nan or inf loss makes loss_sum non-finite for good: that is the non-finite check, for free.
        self.loss_sum.add_(loss, alpha=len(y))
        self.correct.add_((logits.argmax(1) == y).sum())
        self.seen += len(y)

    def read(self, accelerator, stop: bool) -> tuple[EpochSums, bool]:
        """(the sums over all processes, whether any process asked to stop): one read-back and, across
        processes, one all-reduce. Every process must call it at the same step."""
        values = torch.stack([self.loss_sum, self.correct])
        if accelerator.num_processes > 1:
            flags = torch.tensor([float(self.seen), float(stop)], device=values.device)
            values = accelerator.reduce(torch.cat([values, flags]), reduction="sum")
            loss_sum, correct, seen, stops = values.tolist()
        else:
            (loss_sum, correct), seen, stops = values.tolist(), self.seen, float(stop)
        return EpochSums(loss_sum, int(correct), int(seen)), stops > 0


def train_step(parts: StepParts, x: torch.Tensor, y: torch.Tensor, meters: Meters) -> None:
    """One update: forward, loss, backward, the techniques' hooks, optimizer step. Only launches device work."""
    x, target = parts.techniques.mix(x, y)
    logits = parts.model(x)
    loss = parts.loss_fn(logits, target)
    parts.optimizer.zero_grad(set_to_none=True)
    parts.accelerator.backward(loss)
    parts.techniques.after_backward(parts.model)
    parts.optimizer.step()
    meters.add(loss, logits, y)


@dataclass
class EpochPlan:
    """Which updates of which epoch to run."""

    epoch: int  # 0-based
    start_step: int  # updates of this epoch already done (a resumed epoch)
    steps: int  # where the epoch ends (fewer than the loader's batches in a cut last epoch)
    global_step: int  # updates done before this pass
    carry: EpochSums | None = None  # the sums of the part done before (a resumed epoch), over all processes


@dataclass
class EpochOutcome:
    sums: EpochSums  # the whole epoch's so far, over all processes, ``carry`` included
    step: int  # updates of the epoch done
    global_step: int
    stopped: bool = False  # a stop request ended it early
    nonfinite: tuple[int, int] | None = None  # the steps between which the loss became nan/inf
    first_step_time: float = 0.0  # seconds of the first update, one-off costs (compiling) included

    @property
    def complete(self) -> bool:
        return not self.stopped and self.nonfinite is None


def train_epoch(parts: StepParts, loader, schedule, plan: EpochPlan, stop: StopRequest, check_every: int,
                progress: bool = True, clock: RunClock | None = None) -> EpochOutcome:
    """Run ``plan``'s updates; the lr follows the global step (``schedule.step_update``).

    The host never waits for the device inside a step: the loss and accuracy sums stay on the device and
    are read back every ``check_every`` steps and at the epoch's end (``Meters.read``: one read, and
    across processes one all-reduce that also agrees on a stop, so every rank stops at the same step).
    A non-finite loss ends the epoch at the next read, naming the steps between; a stop request (SIGTERM,
    Ctrl-C) at the next read, or at once in a single process, where reading the flag costs nothing.
    ``clock`` times the run's steps for the time left (one of this epoch alone without it).
    """
    accelerator = parts.accelerator
    parts.model.train()
    # The lr of the first update too: a resumed optimizer comes back with the lr it was saved with, which
    # belongs to another position when the global batch size changed.
    schedule.step_update(plan.global_step)
    meters, carry = Meters(accelerator.device), plan.carry or EpochSums()
    single = accelerator.num_processes == 1
    step, global_step, last_read = plan.start_step, plan.global_step, plan.start_step
    outcome = EpochOutcome(carry, step, global_step)
    clock = clock or RunClock(plan.global_step - plan.start_step + plan.steps, len(loader))
    shown = EpochProgress(clock, plan.epoch, plan.steps, step, global_step,
                          progress and accelerator.is_main_process)
    start = time.perf_counter()
    for x, y in loader if step < plan.steps else ():
        train_step(parts, x, y, meters)
        step, global_step = step + 1, global_step + 1
        schedule.step_update(global_step)
        parts.techniques.after_update(global_step)
        if not outcome.first_step_time:
            outcome.first_step_time = time.perf_counter() - start
        shown.step(step, global_step)
        if step >= plan.steps or step % check_every == 0 or (single and stop.requested):
            sums, stopping = meters.read(accelerator, stop.requested)
            outcome = _progress(outcome, sums + carry, step, global_step, stopping, last_read, plan.steps)
            last_read = step
            shown.read(global_step, outcome.sums.loss_sum / outcome.sums.seen if outcome.sums.seen else None,
                       parts.optimizer.param_groups[0]["lr"])
            if not outcome.complete or step >= plan.steps:
                break
    shown.close(global_step)
    if last_read != step:  # the loader ran out before the plan's last step: read what it did
        sums, _ = meters.read(accelerator, False)
        outcome = _progress(outcome, sums + carry, step, global_step, False, last_read, plan.steps)
    if outcome.complete and step >= plan.steps:
        parts.techniques.end_of_epoch()
    outcome.sums.elapsed = time.perf_counter() - start + carry.elapsed
    return outcome


def _progress(outcome: EpochOutcome, sums: EpochSums, step: int, global_step: int, stopping: bool,
              last_read: int, steps: int) -> EpochOutcome:
    """The outcome after a read; a stop at the epoch's last step is left to the epoch's end (saved there)."""
    nonfinite = None if math.isfinite(sums.loss_sum) else (last_read + 1, step)
    stopped = stopping and nonfinite is None and step < steps
    return EpochOutcome(sums, step, global_step, stopped, nonfinite, outcome.first_step_time)


def _inputs(x: torch.Tensor, mean, std, channels_last: bool) -> torch.Tensor:
    x = normalize(x.float().div_(255), mean, std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def tta_logits(model: nn.Module, x: torch.Tensor, level: int = 0) -> torch.Tensor:
    """Logits averaged over test-time views (airbench's scheme): 0 the image, 1 + its mirror,
    2 + mirror pairs shifted one pixel up-left and down-right (weights 1/2, 1/4, 1/4)."""
    if level == 0:
        return model(x).float()
    mirrored = (model(x).float() + model(x.flip(-1)).float()) / 2
    if level == 1:
        return mirrored
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [tta_logits(model, padded[..., :h, :w], 1), tta_logits(model, padded[..., 2:, 2:], 1)]
    return mirrored / 2 + (shifted[0] + shifted[1]) / 4


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, accelerator, mean, std, tta: int = 0,
            channels_last: bool = False, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels for every sample of a prepared loader, each counted once, in input order."""
    model.eval()
    logits_all, labels_all = [], []
    for x, y in tqdm(loader, desc="eval", leave=False, disable=not (progress and accelerator.is_main_process)):
        x = _inputs(x.to(accelerator.device), mean, std, channels_last)
        with accelerator.autocast():
            logits = tta_logits(model, x, tta)
        # gather_for_metrics drops the samples Accelerate duplicated to even out the last batch.
        logits, y = accelerator.gather_for_metrics((logits, y.to(accelerator.device)))
        logits_all.append(logits.cpu())
        labels_all.append(y.cpu())
    return torch.cat(logits_all), torch.cat(labels_all)


def evaluate(model: nn.Module, loader: Iterable, accelerator, mean, std, tta: int = 0,
             channels_last: bool = False, progress: bool = False) -> dict:
    """Loss, accuracy and per-sample predictions/targets over a prepared loader."""
    logits, labels = predict(model, loader, accelerator, mean, std, tta, channels_last, progress)
    preds = logits.argmax(1)
    return {
        "loss": F.cross_entropy(logits, labels).item(),
        "acc": (preds == labels).float().mean().item(),
        "n": len(labels),
        "preds": preds.numpy(),
        "targets": labels.numpy(),
    }


def confusion_matrix(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    return np.bincount(targets * num_classes + preds, minlength=num_classes ** 2).reshape(num_classes, num_classes)
