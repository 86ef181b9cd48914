"""Mixup and CutMix (timm's Mixup): each batch mixed with its own reverse, trained on soft targets."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import CLASSES
from ..knobs import knob
from . import RunInfo, Technique, technique


@dataclass
class MixupFields:
    mixup: float = knob(0.0, "Mixup alpha (0 = off), timm Mixup")
    cutmix: float = knob(0.0, "CutMix alpha (0 = off), timm Mixup")
    mix_prob: float = knob(1.0, "probability a batch is mixed when mixup/cutmix is on")


@technique
class Mixup(Technique):
    title, fields, order = "Mixup / CutMix", MixupFields, 40

    def __init__(self, cfg):
        from timm.data import Mixup as TimmMixup  # timm takes ~4 s to import: only when asked for
        from timm.loss import SoftTargetCrossEntropy

        self.mixer = TimmMixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob,
                               label_smoothing=cfg.label_smoothing, num_classes=len(CLASSES))
        self.loss = SoftTargetCrossEntropy()

    @classmethod
    def check(cls, cfg, need) -> None:
        for name in ("mixup", "cutmix"):
            need(getattr(cfg, name) >= 0, name, "must not be negative")
        need(0 <= cfg.mix_prob <= 1, "mix_prob", "is a probability in [0, 1]")
        need(not (cfg.mixup or cfg.cutmix) or cfg.batch_size % 2 == 0, "batch_size", "must be even with Mixup/CutMix")

    @classmethod
    def create(cls, cfg, run: RunInfo) -> "Mixup | None":
        return cls(cfg) if cfg.mixup or cfg.cutmix else None

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mixer(x, y)

    def loss_fn(self):
        return self.loss
