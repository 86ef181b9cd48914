"""The loop: ``train_one_epoch`` and ``evaluate`` return dicts; ``predict`` returns logits in input order."""
from __future__ import annotations

import time
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .augment import normalize


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler,
    accelerator,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    global_step: int,
    epoch: int,
    mixup: Callable | None = None,
    ema: nn.Module | None = None,
    clip_grad: float = 0.0,
    progress: bool = True,
    start_step: int = 0,
    carry: dict | None = None,
    stop: Callable[[], bool] | None = None,
    steps: int | None = None,
    lookahead=None,
) -> dict:
    """One pass over ``loader``; the lr follows ``global_step`` (scheduler.step_update after each update).

    ``start_step`` and ``carry`` continue an epoch that was stopped part-way (the loader already skips the
    batches done; ``carry`` holds the sums so far over all ranks: give them to one rank only). After every
    step the loop checks ``stop()`` and that the loss is finite, agreed across processes; it then returns
    early with ``stopped`` or ``nonfinite`` set and ``step_in_epoch`` = the steps done. ``train_sums`` lets the caller save a partial epoch.
    ``steps`` ends the epoch after that many batches (the cut last epoch of a fractional --epochs);
    ``lookahead`` (optim.LookaheadEMA) steps after every update and syncs the weights at the epoch's end.
    """
    model.train()
    # The lr of the first update too: a resumed optimizer comes back with the lr it was saved with, which
    # belongs to another position when the global batch size changed.
    scheduler.step_update(global_step)
    device = accelerator.device
    carry = carry or {}
    loss_sum = torch.tensor(float(carry.get("loss_sum", 0.0)), device=device)
    correct = torch.tensor(int(carry.get("correct", 0)), device=device, dtype=torch.long)
    seen = int(carry.get("seen", 0))
    total = len(loader) if steps is None else min(steps, len(loader))
    bar = tqdm(total=total, initial=start_step, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
               disable=not (progress and accelerator.is_main_process))
    start = time.perf_counter()
    first_step = 0.0
    step, stopped, nonfinite = start_step, False, False
    for x, y in loader if step < total else ():
        target = y
        if mixup is not None:
            x, target = mixup(x, y)
        logits = model(x)
        loss = loss_fn(logits, target)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if clip_grad > 0:
            accelerator.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        global_step += 1
        step += 1
        scheduler.step_update(global_step)
        if ema is not None:
            ema.update(model, step=global_step)
        if lookahead is not None:
            lookahead.step(global_step)
        # Accumulate on the device; only the one flag check below reads back from it each step.
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        if not first_step:
            first_step = time.perf_counter() - start  # includes one-off costs such as torch.compile
        bar.update()
        if bar.n % 25 == 0 and not bar.disable:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}")
        flags = torch.stack([~torch.isfinite(loss.detach()),
                             torch.tensor(bool(stop and stop()), device=device)]).float()
        if accelerator.num_processes > 1:  # every rank must stop at the same step
            flags = accelerator.reduce(flags, reduction="sum")
        nonfinite, stopped = (bool(v > 0) for v in flags.tolist())
        if nonfinite or stopped or step >= total:
            break
    bar.close()
    if lookahead is not None and step >= total and not nonfinite:
        lookahead.sync()
    elapsed = time.perf_counter() - start + float(carry.get("elapsed", 0.0))
    totals = accelerator.reduce(torch.stack([loss_sum.float(), correct.float(),
                                             torch.tensor(float(seen), device=device)]), reduction="sum")
    loss_total, correct_total, seen_total = totals.tolist()
    # Sums over all ranks: a resumed epoch carries them on the main process only (see ``carry``).
    sums = {"loss_sum": loss_total, "correct": int(correct_total), "seen": int(seen_total), "elapsed": elapsed}
    return {
        "train_loss": loss_total / max(seen_total, 1),
        "train_acc": correct_total / max(seen_total, 1),
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_sec": seen_total / max(elapsed, 1e-9),
        "epoch_time": elapsed,
        "first_step_time": first_step,
        "global_step": global_step,
        "step_in_epoch": step,
        "stopped": stopped and step < total,
        "nonfinite": nonfinite,
        "train_sums": sums,
    }


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
