"""Clipping of the global gradient norm (before the optimizer step, after unscaling under fp16)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..knobs import knob
from . import RunInfo, Technique, technique


@dataclass
class ClipGradFields:
    clip_grad: float = knob(0.0, "clip the global gradient norm to this value (0 = off)")


@technique
class ClipGrad(Technique):
    title, fields, order = "gradient clipping", ClipGradFields, 60

    def __init__(self, max_norm: float, accelerator):
        self.max_norm, self.accelerator = max_norm, accelerator

    @classmethod
    def check(cls, cfg, need) -> None:
        need(cfg.clip_grad >= 0, "clip_grad", "must not be negative")

    @classmethod
    def create(cls, cfg, run: RunInfo) -> "ClipGrad | None":
        return cls(cfg.clip_grad, run.accelerator) if cfg.clip_grad > 0 else None

    def after_backward(self, model: nn.Module) -> None:
        # The norm it returns is never read: reading it would make the host wait for the device.
        self.accelerator.clip_grad_norm_(model.parameters(), self.max_norm)
