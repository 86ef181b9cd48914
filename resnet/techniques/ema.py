"""An EMA of the weights (timm's ModelEmaV3 with its warm-up); validation and the saved weights use it."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..knobs import knob
from . import RunInfo, Technique, technique


@dataclass
class EmaFields:
    ema_decay: float = knob(0.0, "EMA of weights with this decay per step, e.g. 0.999 (0 = off), warmed up as "
                                 "timm's: min(decay, 1 - (1 + step)^-2/3); validation and checkpoints use the EMA "
                                 "weights when on")


@technique
class Ema(Technique):
    # After every technique that moves the weights (lookahead-EMA jumps at 30): the average follows the
    # weights the run continues from.
    title, fields, order, state_name = "EMA of the weights", EmaFields, 70, "ema"

    def __init__(self, model: nn.Module, decay: float):
        from ..ema import ModelEma  # imports timm (~4 s): only for runs with an EMA

        # timm's warm-up: without it a long-run decay such as 0.9998 leaves the average of a short run
        # close to the random initial weights.
        self.model, self.average = model, ModelEma(model, decay=decay, use_warmup=True)

    @classmethod
    def check(cls, cfg, need) -> None:
        need(0 <= cfg.ema_decay < 1, "ema_decay", "must be in [0, 1)")

    @classmethod
    def create(cls, cfg, run: RunInfo) -> "Ema | None":
        return cls(run.model, cfg.ema_decay) if cfg.ema_decay else None

    def after_update(self, global_step: int) -> None:
        self.average.update(self.model, step=global_step)

    def eval_model(self) -> nn.Module:
        return self.average.module

    def state_tensors(self) -> dict:
        return self.average.module.state_dict()

    def load_state_tensors(self, tensors: dict) -> None:
        self.average.module.load_state_dict(tensors)
