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
    """timm's Lookahead, except that a group at lr 0 is left out of the slow-weights sync.

    A group the schedule stopped (the whitening bias after ``train_steps``) would otherwise move once
    more, toward slow weights that lag its last trained values. Built on first use: timm takes ~4 s to
    import.
    """
    from timm.optim import Lookahead as TimmLookahead

    class FrozenGroupsLookahead(TimmLookahead):
        @torch.no_grad()
        def update_slow(self, group):
            if group["lr"] != 0:
                super().update_slow(group)

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
