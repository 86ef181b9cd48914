"""timm's Lookahead (k=6, alpha=0.5) around the optimizer: the slow weights follow the fast ones."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..knobs import knob
from . import RunInfo, Technique, technique


@dataclass
class LookaheadFields:
    lookahead: bool = knob(False, "wrap the optimizer in timm's Lookahead (k=6, alpha=0.5)")


@technique
class Lookahead(Technique):
    title, fields, order = "Lookahead (timm)", LookaheadFields, 15

    @classmethod
    def create(cls, cfg, run: RunInfo) -> "Lookahead | None":
        return cls() if cfg.lookahead else None

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        from timm.optim import Lookahead as TimmLookahead  # timm takes ~4 s to import: only when asked for

        # It shares the base optimizer's param_groups, so the schedule still sets the lr.
        return TimmLookahead(optimizer, alpha=0.5, k=6)
