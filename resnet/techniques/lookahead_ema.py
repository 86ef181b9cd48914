"""airbench94's lookahead-EMA: every N updates the weights jump to an EMA whose decay rises with training
progress, and become it at every epoch's end."""
from __future__ import annotations

from dataclasses import dataclass

from ..knobs import knob
from ..optim import LookaheadEMA as Average
from . import RunInfo, Technique, technique


@dataclass
class LookaheadEmaFields:
    lookahead_ema: int = knob(0, "airbench's lookahead-EMA every N steps (0 = off; airbench 5): the weights jump to "
                                 "an EMA whose decay rises with progress, and become it at every epoch's end")
    lookahead_ema_decay: float = knob(0.95, "lookahead-EMA decay per step: an update at progress p (0..1) uses "
                                            "decay^N x p^power")
    lookahead_ema_power: float = knob(3.0, "lookahead-EMA: power of the training progress in its decay")
    lookahead_ema_start: float = knob(3.0, "lookahead-EMA: epochs before its first update")


@technique
class LookaheadEma(Technique):
    title, fields, order, state_name = "lookahead-EMA (airbench)", LookaheadEmaFields, 30, "lookahead_ema"

    def __init__(self, average: Average):
        self.average = average

    @classmethod
    def check(cls, cfg, need) -> None:
        need(cfg.lookahead_ema >= 0, "lookahead_ema", "is a step count (0 = off)")
        need(0 < cfg.lookahead_ema_decay <= 1, "lookahead_ema_decay", "must be in (0, 1]")
        need(cfg.lookahead_ema_power >= 0, "lookahead_ema_power", "must not be negative")
        need(cfg.lookahead_ema_start >= 0, "lookahead_ema_start", "must not be negative")

    @classmethod
    def create(cls, cfg, run: RunInfo) -> "LookaheadEma | None":
        if not cfg.lookahead_ema:
            return None
        return cls(Average(run.model, cfg.lookahead_ema, cfg.lookahead_ema_decay, cfg.lookahead_ema_power,
                           round(cfg.lookahead_ema_start * run.steps_per_epoch), run.total_steps))

    def after_update(self, global_step: int) -> None:
        self.average.step(global_step)

    def end_of_epoch(self) -> None:
        self.average.sync()

    def state_tensors(self) -> dict:
        return self.average.ema or {}  # None before its first update

    def load_state_tensors(self, tensors: dict) -> None:
        self.average.load_state_dict({"ema": tensors or None})
