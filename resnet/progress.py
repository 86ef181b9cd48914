"""How far a run is and how long it still needs: the whole-run time left (``RunClock``), an epoch's
progress (``EpochProgress``: a tqdm bar on a terminal, a plain line every 10% of the epoch in a log
file), the epoch's position in steps and epochs that agree (``epoch_position``), the closing line
(``closing_line``) and a grid's estimate from its runs' measured rates (``grid_estimate``).

Every figure is measured in this launch: the seconds of its training steps (its first step left out:
it carries torch.compile's and the warm-up's one-off costs) and of what each epoch does after its
training (validation, or the probe of an epoch not validated, and the saves). Nothing is said to be
"left" before something has been measured.
"""
from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

PLAIN_EVERY = 10  # percent of an epoch between two plain progress lines
TTA_PASSES = {0: 0, 1: 2, 2: 6}  # forward passes of a TTA evaluation (engine.tta_logits), on top of the plain one


def duration(seconds: float) -> str:
    """``45s``, ``12m 30s``, ``3h 05m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


class RunClock:
    """This launch's measured costs and the run's time left from them.

    ``begin``/``read``/``end`` bracket the timed training steps of an epoch (``read`` at the epoch's
    read-backs, where the device has caught up with the host); ``ended`` times what the epoch did after
    its training. ``plan`` (per epoch: validated or not) comes from the first epoch's report; until then
    the time left covers the training steps only, and says so.
    """

    def __init__(self, total_steps: int, steps_per_epoch: int):
        self.total_steps, self.steps_per_epoch = max(total_steps, 1), max(steps_per_epoch, 1)
        self.steps, self.seconds = 0, 0.0  # timed training steps of the epochs ended, and their seconds
        self.live = (0, 0.0)  # the same of the epoch in progress, up to its last read
        self.window: tuple[int, float] | None = None  # (global step, time) the epoch's timing started at
        self.warm = False  # the launch's first step is done (it is never timed)
        self.trained_at: float | None = None  # when the last epoch's training ended
        self.after: dict[bool, list[float]] = {True: [], False: []}  # seconds after an epoch's training
        self.validated: list[bool] | None = None  # per epoch (0-based): does it validate?
        self.last_factor = 1.0  # the cost of the last epoch's end relative to another validated one (TTA)

    @property
    def n_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    # -- measuring
    def begin(self, global_step: int) -> None:
        self.window, self.live = (global_step, time.perf_counter()), (0, 0.0)

    def read(self, global_step: int) -> None:
        if self.window is not None:
            self.live = (global_step - self.window[0], time.perf_counter() - self.window[1])

    def end(self, global_step: int) -> None:
        self.read(global_step)
        self.steps, self.seconds = self.steps + self.live[0], self.seconds + self.live[1]
        self.window, self.live, self.trained_at = None, (0, 0.0), time.perf_counter()

    def ended(self, validated: bool, last: bool = False) -> None:
        """An epoch's report: time what it did since its training ended (not the run's last epoch, whose
        end also runs TTA and plots: no other epoch's end costs that)."""
        if self.trained_at is not None and not last:
            self.after[validated].append(time.perf_counter() - self.trained_at)
        self.trained_at = None

    def plan(self, validated: list[bool], tta: int = 0) -> None:
        self.validated = validated
        self.last_factor = 1.0 + TTA_PASSES.get(tta, 0)

    # -- estimating
    @property
    def step_seconds(self) -> float | None:
        """Seconds per training step, measured (None before a timed step has been read back)."""
        steps, seconds = self.steps + self.live[0], self.seconds + self.live[1]
        return seconds / steps if steps > 0 else None

    def end_cost(self, validated: bool) -> float | None:
        """Seconds an epoch spends after its training: the mean of those measured, leaving out the first
        of several (it carries the evaluation's own warm-up, a compile included)."""
        costs = self.after[validated]
        costs = costs[1:] if len(costs) > 1 else costs
        return sum(costs) / len(costs) if costs else None

    def left(self, global_step: int, first_epoch: int) -> tuple[float, bool] | None:
        """(seconds, complete) the run needs after ``global_step``, the ends of epochs ``first_epoch``.. included;
        complete is False while some epoch end to come has not been timed yet. None before any measurement."""
        per_step = self.step_seconds
        if per_step is None:
            return None
        seconds, complete = max(self.total_steps - global_step, 0) * per_step, self.validated is not None
        for epoch in range(first_epoch, self.n_epochs):
            validated = bool(self.validated[epoch]) if self.validated and epoch < len(self.validated) else None
            cost = self.end_cost(validated) if validated is not None else None
            if cost is None:
                complete = False
                continue
            seconds += cost * (self.last_factor if validated and epoch == self.n_epochs - 1 else 1.0)
        return seconds, complete

    def left_text(self, global_step: int, first_epoch: int, short: bool = False) -> str | None:
        """``12m 30s left``; ``4m 10s left (training; validation not timed yet)`` while incomplete."""
        left = self.left(global_step, first_epoch)
        if left is None:
            return None
        seconds, complete = left
        if short:
            return duration(seconds) + ("" if complete else "+val")
        return f"{duration(seconds)} left" + ("" if complete else " (training; validation not timed yet)")

    def epoch_seconds(self) -> float | None:
        """Measured seconds of a whole epoch: its steps and its end (validated, when epochs are)."""
        per_step = self.step_seconds
        if per_step is None:
            return None
        ends = [c for c in (self.end_cost(True), self.end_cost(False)) if c is not None]
        return self.steps_per_epoch * per_step + (ends[0] if ends else 0.0)


def epoch_label(epoch: int, clock: RunClock) -> str:
    """``epoch 3/40``, the count in whole (a cut last one included) epochs."""
    return f"epoch {epoch + 1}/{clock.n_epochs}"


def epoch_position(epoch: int, steps_done: int, steps_per_epoch: int, total_steps: int) -> str:
    """``epoch 3/40``; a run whose --epochs is not whole says, in the epoch that ends it, what it trained
    in steps and epochs that agree: ``epoch 1/1 (2/9 steps: 0.222 of an epoch)``,
    ``epoch 2/2 (5/9 steps: 1.56 epochs in all, 14 steps)``."""
    n_epochs = math.ceil(total_steps / max(steps_per_epoch, 1))
    text = f"epoch {epoch + 1}/{n_epochs}"
    in_epoch = steps_done - epoch * steps_per_epoch
    if 0 < in_epoch < steps_per_epoch:
        done = steps_done / steps_per_epoch
        whole = "of an epoch" if epoch == 0 else f"epochs in all, {steps_done} steps"
        text += f" ({in_epoch}/{steps_per_epoch} steps: {done:.3g} {whole})"
    return text


class EpochProgress:
    """An epoch's progress on the main process: a tqdm bar on a terminal (``epoch 3/40``, its loss, lr and
    the run's time left); in a log file (stderr not a terminal), where tqdm's ``\\r`` frames would pile up,
    a plain line every ``PLAIN_EVERY`` percent: ``epoch 3: 50% (30/60 steps), loss 1.234, 4m 10s left``.
    The loss is the last read-back's: this reads nothing from the device itself."""

    def __init__(self, clock: RunClock, epoch: int, steps: int, start_step: int, global_step: int,
                 enabled: bool, stream=None):
        self.clock, self.epoch, self.steps = clock, epoch, steps
        self.stream = stream or sys.stderr
        self.label = epoch_label(epoch, clock)
        self.loss: float | None = None
        self.pending: tuple[int, int] | None = None  # (step, global step) of a plain line not printed yet
        terminal = enabled and _isatty(self.stream)
        self.plain = enabled and not terminal
        self.shown = start_step * 100 // PLAIN_EVERY // max(steps, 1)  # the last tenth shown
        self.bar = tqdm(total=steps, initial=start_step, desc=self.label, leave=False, dynamic_ncols=True,
                        disable=not terminal, file=self.stream)
        if clock.warm:
            clock.begin(global_step)
        self._postfix(global_step, {})  # the time left measured in the epochs before

    def step(self, step: int, global_step: int) -> None:
        """After each update (host numbers only). A plain line due at this step waits for the step's
        read-back, if it has one (``read``), to show its loss; else it is printed at the next call."""
        self._flush()
        if not self.clock.warm:  # the launch's first step: timing starts after it
            self.clock.warm = True
            self.clock.begin(global_step)
        self.bar.update()
        tenth = step * 100 // PLAIN_EVERY // max(self.steps, 1)
        if self.plain and tenth > self.shown:
            self.shown, self.pending = tenth, (step, global_step)

    def read(self, global_step: int, loss: float | None, lr: float) -> None:
        """At a read-back: the device has caught up, so the steps timed so far are measured."""
        self.clock.read(global_step)
        self.loss = loss
        self._flush()
        self._postfix(global_step, {} if loss is None else {"loss": f"{loss:.3f}"} | {"lr": f"{lr:.3g}"})

    def close(self, global_step: int) -> None:
        self._flush()
        self.bar.close()
        self.clock.end(global_step)

    def _postfix(self, global_step: int, figures: dict) -> None:
        """The bar's postfix: ``figures``, then the run's time left once measured."""
        left = self.clock.left_text(global_step, self.epoch, short=True) if not self.bar.disable else None
        if not self.bar.disable and (figures or left):
            self.bar.set_postfix(figures | ({"left": left} if left else {}))  # a dict keeps this order

    def _flush(self) -> None:
        if self.pending is not None:
            self._line(*self.pending)
            self.pending = None

    def _line(self, step: int, global_step: int) -> None:
        # "epoch 3: 50%": what the tqdm bar's frames read, which scripts (and tests) watching a log wait for
        parts = [f"epoch {self.epoch + 1}: {100 * step // max(self.steps, 1)}% ({step}/{self.steps} steps)"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        left = self.clock.left_text(global_step, self.epoch)
        if left:
            parts.append(left)
        print(", ".join(parts), file=self.stream, flush=True)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------
def closing_line(run_dir: Path, best_acc: float, best_epoch: int | None, validated: bool, epochs_done: float,
                 seconds: float | None = None) -> str:
    """The run's last line: its best accuracy and epoch (or, without validation, its last weights), where
    the weights are, and the predict.py command that hands them in."""
    took = f" in {duration(seconds)}" if seconds is not None else ""
    if validated and best_acc >= 0:
        weights = Path(run_dir) / "best.safetensors"
        what = f"best val acc {best_acc:.4f} at epoch {best_epoch} ({weights})"
        checkpoint = str(run_dir)
    else:
        weights = Path(run_dir) / "last.safetensors"
        what = f"trained {epochs_done:.3g} epochs without validation{took}; last weights {weights}"
        checkpoint, took = str(weights), ""
    return (f"done: {what}{took}; hand in with: python predict.py --checkpoint {shlex.quote(checkpoint)} "
            "--data custom_test.pkl --out submission.csv")


# ------------------------------------------------------------------------------------------------
# A grid's dry run: how long its launches will take, from the rates its runs measured
def measured_epoch_seconds(folder: Path) -> tuple[float, int, bool] | None:
    """(seconds per epoch, runs measured, whole epochs): the mean over the run folders in ``folder``
    whose summary.json measured one, of ``seconds_per_epoch`` (training, validation and saves) where
    every such run has it, else of ``train_time_s / epochs_done`` (training only: ``whole`` False)."""
    whole, training = [], []
    for path in sorted(Path(folder).glob("*/summary.json")):
        try:
            summary = json.loads(path.read_text())
            done, train_s = float(summary.get("epochs_done") or 0), float(summary.get("train_time_s") or 0)
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        if done > 0 and train_s > 0:
            training.append(train_s / done)
            if summary.get("seconds_per_epoch"):
                whole.append(float(summary["seconds_per_epoch"]))
    if not training:
        return None
    if len(whole) == len(training):
        return sum(whole) / len(whole), len(whole), True
    return sum(training) / len(training), len(training), False


def grid_estimate(folder: Path, epochs_left: list[float]) -> str:
    """One line for a dry run: the launches' time from the grid's measured rate, or that none is measured."""
    n = len(epochs_left)
    launches = f"{n} launch{'es' if n != 1 else ''}"
    measured = measured_epoch_seconds(folder)
    if measured is None:
        return (f"dry run: {launches}; no time estimate: no run in {folder} has measured a rate yet "
                "(its summary.json's train_time_s)")
    per_epoch, runs, whole = measured
    what = "an epoch" if whole else "an epoch of training; validation and saves not included"
    return (f"dry run: {launches}, {sum(epochs_left):.3g} epochs, about {duration(per_epoch * sum(epochs_left))} "
            f"plus start-ups (measured: {duration(per_epoch) if per_epoch >= 1 else f'{per_epoch:.2f}s'} "
            f"{what}, mean of {runs} run{'s' if runs != 1 else ''} in {folder})")
