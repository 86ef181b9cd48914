"""Optimizers (no weight decay on norms and biases) and timm's cosine schedule stepped per update."""
from __future__ import annotations

import torch
from timm.optim import Lookahead
from timm.scheduler import CosineLRScheduler
from torch import nn

# Per-optimizer defaults used when --lr / --weight-decay are not given.
DEFAULT_LR = {"sgd": 0.1, "nesterov": 0.1, "adam": 1e-3, "adamw": 2e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "nesterov": 5e-4, "adam": 0.0, "adamw": 0.05}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay conv/linear weights only: decaying BN scales and biases hurts accuracy and buys nothing."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def create_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                     lookahead: bool = False) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name in ("sgd", "nesterov"):
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=name == "nesterov")
    elif name == "adam":
        opt = torch.optim.Adam(groups, lr=lr)
    elif name == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr)
    else:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(DEFAULT_LR)}")
    # Lookahead shares the base optimizer's param_groups, so the scheduler still sets the lr.
    return Lookahead(opt, alpha=0.5, k=6) if lookahead else opt


def create_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                     warmup_lr_ratio: float, min_lr_ratio: float) -> CosineLRScheduler:
    """Cosine decay over ``total_steps`` optimizer updates after a linear warm-up.

    timm schedulers do not store their position: the caller calls ``step_update(global_step)``
    after every update and after a resume, so the lr is a pure function of the step.
    """
    peak = optimizer.param_groups[0]["lr"]
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps - warmup_steps, 1),
        lr_min=peak * min_lr_ratio,
        warmup_t=warmup_steps,
        warmup_lr_init=peak * warmup_lr_ratio,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    scheduler.step_update(0)
    return scheduler
