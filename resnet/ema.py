"""The EMA of the weights: timm's ModelEmaV3 with its tensors found once (a module of its own because
timm takes ~4 s to import, paid only by runs that use an EMA)."""
from __future__ import annotations

import weakref

import torch
from timm.utils import ModelEmaV3
from torch import nn


class ModelEma(ModelEmaV3):
    """timm's ModelEmaV3 (same decay, warm-up and averages, bit for bit), with its tensors found once.

    ModelEmaV3 walks both models' state dicts at every update: for the report net that is 340 detach ops
    and 28 one-element copies (BatchNorm's step counters) around its one foreach lerp, 369 of the 906 tensor
    ops of a best.yaml step (bench/host_ops.py). On a GPU each op costs the host a few microseconds and the
    suite's step is bound by the host. Here the first update pairs the tensors themselves (state_dict with
    keep_vars: they follow every in-place change, optimizer steps and resumed checkpoints included) and
    later updates are one foreach lerp and one foreach copy. A model whose tensors are replaced rather than
    changed in place (``.to()`` another device or dtype) must be passed as a new object, or given a new EMA.
    """

    _pairs: tuple | None = None
    # A weak reference: storing the model would make it a submodule, and an id() can be reused by a new
    # model once the old one is freed.
    _paired_with: weakref.ref | None = None

    def apply_update_(self, model: nn.Module, decay: float) -> None:
        if not self.foreach:  # the EMA lives on another device: timm's per-tensor path
            return super().apply_update_(model, decay)
        if self._paired_with is None or self._paired_with() is not model:
            floats, counters = ([], []), ([], [])
            for ema_v, model_v in zip(self.module.state_dict(keep_vars=True).values(),
                                      model.state_dict(keep_vars=True).values()):
                group = floats if ema_v.is_floating_point() else counters
                group[0].append(ema_v)
                group[1].append(model_v)
            self._pairs, self._paired_with = (floats, counters), weakref.ref(model)
        (ema_floats, model_floats), (ema_counters, model_counters) = self._pairs
        if ema_counters:
            torch._foreach_copy_(ema_counters, model_counters)
        self._foreach_lerp_(ema_floats, model_floats, weight=1.0 - decay)
