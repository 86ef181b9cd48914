"""airbench's whitening stem: a frozen 2x2 conv fitted to the training patches' covariance, its bias
trained for the first epochs only."""
from __future__ import annotations

from dataclasses import dataclass

from ..augment import normalize
from ..data import MEAN, STD
from ..knobs import knob
from ..loader import to_chw_tensor
from ..models import has_whitening
from . import RunInfo, Technique, technique

# airbench fits its whitening stem on the first 5,000 training images: plenty for a 12 x 12 covariance.
WHITEN_IMAGES = 5000


@dataclass
class WhiteningFields:
    stem: str | None = knob(None, "first layer: conv, or whiten = airbench's 2x2 conv fitted to the training "
                                  "images' patch covariance, filters frozen (default: the net's own)",
                            choices=["conv", "whiten"])
    whiten_bias_epochs: float = knob(3.0, "whitening stem: train its bias this many epochs, then freeze it "
                                          "(airbench 3)")


@technique
class Whitening(Technique):
    """Fits the stem of any net built with ``stem: whiten`` (the flag, or the net's own default)."""

    title, fields, order = "whitening stem (airbench)", WhiteningFields, 0

    def __init__(self, bias_steps: int):
        self.bias_steps = bias_steps

    @classmethod
    def check(cls, cfg, need) -> None:
        need(cfg.whiten_bias_epochs >= 0, "whiten_bias_epochs", "must not be negative")

    @classmethod
    def model_kwargs(cls, cfg) -> dict:
        return {"stem": cfg.stem} if cfg.stem is not None else {}

    @classmethod
    def create(cls, cfg, run: RunInfo) -> "Whitening | None":
        """Fit the stem on the first training images, unaugmented, before the optimizer, the EMA and DDP
        copy the weights: every rank fits the same way, and DDP then broadcasts rank 0's weights anyway."""
        if not has_whitening(run.model):
            return None
        images = to_chw_tensor(run.train_images[:WHITEN_IMAGES]).to(run.accelerator.device).float() / 255
        run.model.init_whitening(normalize(images, MEAN, STD))
        return cls(round(cfg.whiten_bias_epochs * run.steps_per_epoch))

    def optimizer_options(self) -> dict:
        return {"whiten_bias_steps": self.bias_steps}
