"""Training techniques, one module each: its TrainConfig fields, its checks, and where it hooks into a run.

A technique module holds a dataclass of its fields and a ``Technique`` subclass registered with
``@technique``::

    @dataclass
    class ClipGradFields:                       # its TrainConfig fields: one --help section
        clip_grad: float = knob(0.0, "clip the global gradient norm to this value (0 = off)")

    @technique
    class ClipGrad(Technique):
        title, fields, order = "gradient clipping", ClipGradFields, 60

        @classmethod
        def check(cls, cfg, need):              # fail early, naming the flag
            need(cfg.clip_grad >= 0, "clip_grad", "must not be negative")

        @classmethod
        def create(cls, cfg, run):              # this run's instance, or None when it is off
            return cls(cfg.clip_grad, run.accelerator) if cfg.clip_grad > 0 else None

        def after_backward(self, model):        # the hooks it needs; the others do nothing
            self.accelerator.clip_grad_norm_(model.parameters(), self.max_norm)

Adding a technique is adding a module to this package: config.py builds TrainConfig from every
registered technique's fields, training.py runs their checks and creates them, and the loop calls
their hooks through ``ActiveTechniques``. Technique modules import their heavy libraries (timm) inside
``create``: every script imports this package, and timm alone takes ~4 s to import.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

REGISTRY: list[type["Technique"]] = []


@dataclass
class RunInfo:
    """What a technique may use when a run creates it: the model is on its device, not yet wrapped for
    DDP or compiled, and no optimizer exists yet."""

    accelerator: Any
    model: nn.Module
    train_images: Any  # uint8 (N, 32, 32, 3), the training split
    steps_per_epoch: int
    total_steps: int


class Technique:
    """Base class: every hook does nothing. ``order`` sets the order of creation and of the hooks (lower
    first); ``state_name`` is where a technique's saved tensors live in a run's state (never renumbered by
    a change of order)."""

    title: str = ""
    fields: type | None = None
    order: int = 50
    state_name: str = ""  # the prefix of its tensors in state/techniques.safetensors, when it saves any

    # --- when the config is read
    @classmethod
    def check(cls, cfg, need: Callable[[bool, str, str], None]) -> None:
        """Fail early on bad values: ``need(ok, field, what)`` raises a ConfigError naming the flag."""

    @classmethod
    def model_kwargs(cls, cfg) -> dict:
        """Model-builder arguments this technique sets (saved with the weights, so evaluate.py rebuilds the net)."""
        return {}

    @classmethod
    def create(cls, cfg, run: RunInfo) -> "Technique | None":
        """This run's instance, or None when the technique is off."""
        return None

    # --- building the optimizer
    def optimizer_options(self) -> dict:
        """Keyword arguments for ``optim.create_optimizer``."""
        return {}

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What --resume must restore, as tensors (saved with safetensors: a run folder is data, not code)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_tensors`` returned (an empty dict when it saved nothing)."""

    # --- the step (device work only: nothing here may read a tensor back)
    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch and the training target (labels, or soft targets)."""
        return x, y

    def loss_fn(self) -> Callable | None:
        """A loss for (logits, target) that replaces the label-smoothed cross-entropy."""
        return None

    def after_backward(self, model: nn.Module) -> None:
        """Between backward and the optimizer step."""

    def after_update(self, global_step: int) -> None:
        """After each optimizer update, with the number of updates done so far."""

    def end_of_epoch(self) -> None:
        """After the last update of an epoch that ran to its end (a cut last epoch included)."""

    # --- validation and the saved weights
    def eval_model(self) -> nn.Module | None:
        """The model to validate and save instead of the trained one."""
        return None


def technique(cls: type[Technique]) -> type[Technique]:
    """Register a technique class (decorator)."""
    REGISTRY.append(cls)
    REGISTRY.sort(key=lambda t: t.order)
    return cls


def _overrides(t: Technique, hook: str) -> bool:
    return getattr(type(t), hook) is not getattr(Technique, hook)


class ActiveTechniques:
    """The techniques a run created, with each hook called only on those that define it (host cost)."""

    def __init__(self, techniques: list[Technique]):
        self.all = sorted(techniques, key=lambda t: t.order)
        hooked = {h: [t for t in self.all if _overrides(t, h)] for h in
                  ("mix", "after_backward", "after_update", "end_of_epoch", "loss_fn", "eval_model")}
        self._mix, self._after_backward = hooked["mix"], hooked["after_backward"]
        self._after_update, self._end_of_epoch = hooked["after_update"], hooked["end_of_epoch"]
        self._loss_fn, self._eval_model = hooked["loss_fn"], hooked["eval_model"]
        for hook in ("loss_fn", "eval_model"):
            if len(hooked[hook]) > 1:
                raise ValueError(f"two techniques replace the {hook}: {[type(t).__name__ for t in hooked[hook]]}")

    def optimizer_options(self) -> dict:
        return {k: v for t in self.all for k, v in t.optimizer_options().items()}

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        for t in self.all:
            optimizer = t.wrap_optimizer(optimizer)
        return optimizer

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every technique's saved tensors, each key prefixed with its ``state_name``."""
        return {f"{t.state_name}/{k}": v for t in self.all if t.state_name for k, v in t.state_tensors().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Give each technique its tensors; the saved ones of a technique that is off now fail in one line."""
        names = {t.state_name for t in self.all if t.state_name}
        saved = {key.split("/", 1)[0] for key in tensors}
        if saved - names:
            raise ValueError(f"{source}: holds the state of {', '.join(sorted(saved - names))}, which this "
                             "launch does not use; resume with the run's own technique flags")
        for t in self.all:
            if t.state_name:
                prefix = t.state_name + "/"
                t.load_state_tensors({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

    def loss_fn(self) -> Callable | None:
        return self._loss_fn[0].loss_fn() if self._loss_fn else None

    def eval_model(self) -> nn.Module | None:
        return self._eval_model[0].eval_model() if self._eval_model else None

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        target = y
        for t in self._mix:
            x, target = t.mix(x, target)
        return x, target

    def after_backward(self, model: nn.Module) -> None:
        for t in self._after_backward:
            t.after_backward(model)

    def after_update(self, global_step: int) -> None:
        for t in self._after_update:
            t.after_update(global_step)

    def end_of_epoch(self) -> None:
        for t in self._end_of_epoch:
            t.end_of_epoch()


def create_techniques(cfg, run: RunInfo) -> ActiveTechniques:
    """Every registered technique that is on for ``cfg``, created in order."""
    return ActiveTechniques([t for cls in REGISTRY if (t := cls.create(cfg, run)) is not None])


def check_techniques(cfg, need: Callable[[bool, str, str], None]) -> None:
    for cls in REGISTRY:
        cls.check(cfg, need)


def technique_model_kwargs(cfg) -> dict:
    return {k: v for cls in REGISTRY for k, v in cls.model_kwargs(cfg).items()}


# Every module of this package registers its technique on import.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
