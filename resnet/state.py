"""The run's state between steps: a typed object of host numbers, saved as state/trainer.json.

Everything else a resume needs (weights, optimizer, EMA, RNGs) is saved beside it (state_folder.py);
this holds where the run is (updates done, the epoch and the step in it, the epoch's sums so far) and
what it has found (the best validation accuracy and its epoch). Only host numbers, updated from host
counters: reading it never waits for the device.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

SCHEMA = 3  # trainer.json written before the schema field (free-form dicts) reads as 1


class StateError(ValueError):
    """A trainer.json this version cannot continue from; the message says what to do."""


@dataclass
class EpochSums:
    """An epoch's training sums so far, over all ranks: what a mid-epoch save carries into the resumed epoch."""

    loss_sum: float = 0.0  # sum over images of the training loss
    correct: int = 0  # images classified right (before mixing)
    seen: int = 0  # images trained on
    elapsed: float = 0.0  # seconds of training

    def __add__(self, other: "EpochSums") -> "EpochSums":
        return EpochSums(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclass
class TrainState:
    epoch: int = 0  # whole epochs done
    step_in_epoch: int = 0  # updates done in the epoch after those (a stopped or cut epoch), at global_batch
    global_batch: int = 0  # images per update over all processes when saved
    partial: EpochSums | None = None  # the sums of that part of an epoch
    best_val_acc: float = -1.0  # -1: not validated yet
    best_epoch: int | None = None
    train_time_s: float = 0.0  # seconds of training (not start-up, validation or saving), over all launches
    started_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    saves: int = 0  # how many times the state was saved: orders what a cut save leaves (state_folder.py)
    processes: int = 0  # processes of the launch that saved it (0: not recorded)
    precision: str = ""  # fp32, bf16 or fp16 of that launch
    changes: list = field(default_factory=list)  # {"epoch", "flag", "from", "to"}: what a resume changed, and when
    budget: dict | None = None  # a --time-budget run's plan and the seconds its launches used (budget.Budget.record)
    schema: int = SCHEMA

    def position(self, steps_per_epoch: int, global_batch: int) -> tuple[int, int]:
        """(epoch, step in that epoch) to continue from, at the current global batch size.

        The schedule is a function of training progress (epochs and the fraction of one done), so a run
        resumed with another process count gets the lr the uninterrupted run would have had there. Part
        of an epoch done at another global batch maps to the last whole batch at the new size (at most
        one global batch of images is seen twice).
        """
        step = self.step_in_epoch
        if step and self.global_batch and self.global_batch != global_batch:
            step = step * self.global_batch // global_batch
        return self.epoch, min(step, steps_per_epoch)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "trainer.json") -> "TrainState":
        """A saved state, this schema's or the free-form dict of earlier versions (schema 1)."""
        if not isinstance(data, dict):
            raise StateError(f"{source}: expected a JSON object, found {type(data).__name__}")
        schema = int(data.get("schema", 1))
        if schema > SCHEMA:
            raise StateError(f"{source}: written by a newer version of the suite (state schema {schema}, this "
                             f"version reads up to {SCHEMA}); update the code to resume this run")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}  # schema 1 also kept e.g. "global_step"
        if values.get("partial") is not None:
            sums = {f.name for f in dataclasses.fields(EpochSums)}
            values["partial"] = EpochSums(**{k: v for k, v in values["partial"].items() if k in sums})
        values["schema"] = SCHEMA
        try:
            return cls(**values)
        except TypeError as e:
            raise StateError(f"{source}: not a training state ({e})") from None
