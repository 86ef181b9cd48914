"""timm's Lookahead (k=6, alpha=0.5) around the optimizer: the slow weights follow the fast ones."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from ..knobs import knob
from . import RunInfo, Technique, technique


@dataclass
class LookaheadFields:
    lookahead: bool = knob(False, "wrap the optimizer in timm's Lookahead (k=6, alpha=0.5)")


@cache
def lookahead_class() -> type[torch.optim.Optimizer]:
    """timm's Lookahead, except that a group at lr 0 is left out of the slow-weights sync, and that under
    fp16 it passes GradScaler's ``found_inf`` on to an optimizer that takes it (no read-back a step).

    A group the schedule stopped (the whitening bias after ``train_steps``) would otherwise move once
    more, toward slow weights that lag its last trained values. Built on first use: timm takes ~4 s to
    import.
    """
    from timm.optim import Lookahead as TimmLookahead

    class FrozenGroupsLookahead(TimmLookahead):
        @property
        def _step_supports_amp_scaling(self) -> bool:
            # As the optimizer it wraps: GradScaler then hands it grad_scale/found_inf instead of reading
            # found_inf back (.item()) every step.
            return getattr(self._base_optimizer, "_step_supports_amp_scaling", False)

        @torch.no_grad()
        def update_slow(self, group, keep: torch.Tensor | None = None):
            if group["lr"] == 0:
                return
            if keep is None:
                return super().update_slow(group)
            for fast in (p for p in group["params"] if p.grad is not None):  # timm's update, kept on device
                slow = self._base_optimizer.state[fast].setdefault("lookahead_slow_buff", fast.detach().clone())
                slow.add_((fast - slow) * keep, alpha=group["lookahead_alpha"])
                fast.lerp_(slow, keep)

        @torch.no_grad()
        def step(self, closure=None):
            found_inf = getattr(self, "found_inf", None)  # set by GradScaler (fp16) for the step
            if found_inf is None:
                return super().step(closure)
            base = self._base_optimizer
            base.grad_scale, base.found_inf = getattr(self, "grad_scale", None), found_inf
            try:
                loss = base.step(closure)
            finally:
                del base.grad_scale, base.found_inf
            keep = 1 - found_inf.to(torch.float32)  # 0 on a skipped step: neither weights move
            for group in base.param_groups:
                group["lookahead_step"] += 1
                if group["lookahead_step"] % group["lookahead_k"] == 0:
                    self.update_slow(group, keep)
            return loss

    return FrozenGroupsLookahead


@technique
class Lookahead(Technique):
    title, fields, order = "Lookahead (timm)", LookaheadFields, 15

    @classmethod
    def create(cls, cfg, run: RunInfo) -> "Lookahead | None":
        return cls() if cfg.lookahead else None

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        # It shares the base optimizer's param_groups, so the schedule still sets the lr.
        return lookahead_class()(optimizer, alpha=0.5, k=6)
