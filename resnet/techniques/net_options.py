"""airbench's model-side options, for any registered net: BatchNorm settings, dirac init, a logit scale.

They are model-builder arguments (models.py implements them), saved with the weights so that evaluate.py
and predict.py rebuild the same net; unset, each net keeps its own choice.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..knobs import knob
from ..models import parse_head_scale
from . import Technique, technique


@dataclass
class NetOptionFields:
    bn_momentum: float | None = knob(None, "BatchNorm running-stats momentum, PyTorch's convention: the weight of "
                                           "each new batch (airbench's 0.6 is 0.4 here; default: the net's own, 0.1)")
    bn_eps: float | None = knob(None, "BatchNorm eps (default: the net's own, PyTorch's 1e-5; airbench 1e-12)")
    bn_frozen_weight: bool | None = knob(None, "fix every BatchNorm scale at 1, untrained (airbench; "
                                               "default: the net's own)")
    dirac: bool | None = knob(None, "identity-initialise every conv's first in-channels filters, an implicit residual "
                                    "at the start (airbench; default: the net's own)")
    head_scale: str | None = knob(None, "multiply the logits by a number, a fraction like 1/9, or 1/width = 1 / "
                                        "features into the head (default: the net's own: 1/9 for resnet_airbench_*, "
                                        "else 1)")


@technique
class NetOptions(Technique):
    title, fields, order = "net options (airbench)", NetOptionFields, 5

    @classmethod
    def check(cls, cfg, need) -> None:
        need(cfg.bn_momentum is None or 0 <= cfg.bn_momentum <= 1, "bn_momentum", "must be in [0, 1]")
        need(cfg.bn_eps is None or cfg.bn_eps > 0, "bn_eps", "must be positive")
        try:
            ok = cfg.head_scale is None or parse_head_scale(cfg.head_scale) > 0
        except ValueError:
            ok = False
        need(ok, "head_scale", "expected a positive number, a fraction like 1/9, or 1/width")

    @classmethod
    def model_kwargs(cls, cfg) -> dict:
        names = ("bn_momentum", "bn_eps", "bn_frozen_weight", "dirac", "head_scale")
        return {name: getattr(cfg, name) for name in names if getattr(cfg, name) is not None}
