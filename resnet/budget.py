"""``--time-budget``: the best run that fits in the time given.

A budgeted launch builds its run, measures what it costs here (``measure_costs``: seconds per training step
after the warm-up, per validated image, per save), then fixes the number of updates so the whole launch,
start-up to the final validation with TTA, ends within the budget (``plan_steps``). Every length the recipe
gives in epochs scales with it (``scaled_config``: warm-up, whitening-bias epochs, lookahead-EMA start), so
the schedule decays to its end exactly at the budget (budgeted training: Li, Yumer and Ramanan, ICLR 2020),
and a budget equal to the recipe's own time gives the recipe itself. The run is then built again from the
scaled config with the same seed: the measuring steps leave nothing behind, and config.yaml, which records
the planned lengths, repeats the same steps (a budget is a launch field, never saved in it).

A resume finishes the plan it was given (the planned lengths come from the run's config.yaml); it never plans
again.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .knobs import ConfigError
from .progress import TTA_PASSES, duration

# Aim the launch's end at this fraction of the budget: the estimate's error then stays inside the allowed
# 90-103%. Measured (bench/budget_recipes.py, 21 launches of 5-59 min): 90-102% used; the 30-minute runs of
# report.yaml trained 4% slower, and 7% faster, than their timing said (its per-image augmentation).
TARGET = 0.96
# A long schedule (LONG_RECIPE epochs or more) cut under SQUEEZED of its length trails a recipe made for short
# runs: on a 2-core CPU the mission's command (40 epochs) scored 83.7% in 30 min (21% of its epochs) where
# fast.yaml scored 87.5% in 5 (bench/budget_recipes.py, README). The plan then says so.
LONG_RECIPE, SQUEEZED = 20, 0.25
# Lengths given in epochs besides --epochs: each keeps its fraction of the run (where the config has it).
EPOCH_LENGTHS = ("warmup_epochs", "whiten_bias_epochs", "lookahead_ema_start")
PLANNED_FIELDS = ("epochs",) + EPOCH_LENGTHS
# Seconds spent timing the steps: 2% of the budget, within these bounds, in 3 blocks whose median counts: a
# 4.5 s timing (1% of 7.5 min) once caught a slow moment and planned 90% of the budget (bench/budget_recipes.py).
MEASURE_MIN_S, MEASURE_MAX_S, MEASURE_BLOCKS = 5.0, 30.0, 3
# After the last save: the curves' last redraw, the trackers' end, the process's exit (measured on a CPU).
CLOSING_S = 2.0
# W&B's start (its service, the first augmented batch) and end, which come after the plan (measured on a CPU).
TRACKING_S = 3.0
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``15m``, ``1h``, ``1h30m``, ``1.5h`` or a plain number of seconds."""
    words = str(text).strip().lower().replace(" ", "")
    parts = _DURATION.fullmatch(words)
    if re.fullmatch(r"\d+(?:\.\d+)?", words):
        seconds = float(words)
    elif words and parts:
        seconds = sum(float(n or 0) * unit for n, unit in zip(parts.groups(), (3600, 60, 1)))
    else:
        raise ConfigError(f"--time-budget: expected a duration like 90s, 15m, 1h or 1h30m, got {text!r}")
    if seconds <= 0:
        raise ConfigError(f"--time-budget: must be positive, got {text!r}")
    return seconds


def scaled_config(cfg: Any, planned_epochs: float) -> Any:
    """``cfg`` with ``--epochs`` set to ``planned_epochs`` and every other length in epochs scaled alike."""
    ratio = planned_epochs / cfg.epochs
    known = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, epochs=planned_epochs,
                               **{name: getattr(cfg, name) * ratio for name in EPOCH_LENGTHS if name in known})


def launch_started() -> float:
    """When this launch began (``time.time()`` terms): the launcher's start under ``accelerate launch`` or
    torchrun (its start-up counts against the budget too), else this process's."""
    import psutil  # accelerate's own dependency

    from .launch import launcher_pid

    pid = launcher_pid() or os.getpid()
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return psutil.Process().create_time()


# ------------------------------------------------------------------------------------------------
# The plan
@dataclass
class Costs:
    """What a run costs on this machine, measured before the plan (``measure_costs``)."""

    step_s: float  # one training update, warm
    first_step_extra_s: float  # the first update's one-off cost on top (warm-up, compile)
    setup_s: float  # building the run (and starting W&B, when on)
    eval_image_s: float  # one image through the validated model (one pass)
    save_s: float  # an epoch's saves: weights and state


@dataclass
class Shape:
    """What the plan needs of the run besides its costs."""

    steps_per_epoch: int
    val_images: int  # 0: no validation split
    probe_images: int  # checked instead in an epoch without validation (training.PROBE_IMAGES)
    eval_every: int
    tta: int


def launch_seconds(steps: int, costs: Costs, shape: Shape) -> float:
    """Seconds a run of ``steps`` updates takes from its build to its last save."""
    spe = shape.steps_per_epoch
    n_epochs = math.ceil(steps / spe)
    seconds = costs.setup_s + costs.first_step_extra_s + steps * costs.step_s + CLOSING_S
    for epoch in range(n_epochs):
        last = epoch + 1 == n_epochs
        validated = shape.val_images > 0 and ((epoch + 1) % shape.eval_every == 0 or last)
        passes = 1 + (TTA_PASSES.get(shape.tta, 0) if last else 0)
        images = shape.val_images * passes if validated else shape.probe_images
        seconds += costs.save_s + images * costs.eval_image_s
    return seconds


def plan_steps(seconds: float, costs: Costs, shape: Shape) -> int:
    """The most updates whose launch fits in ``seconds`` (0 when not even one does)."""
    if launch_seconds(1, costs, shape) > seconds:
        return 0
    low, high = 1, 2
    while launch_seconds(high, costs, shape) <= seconds:
        low, high = high, high * 2
    while high - low > 1:  # launch_seconds rises with steps
        middle = (low + high) // 2
        low, high = (middle, high) if launch_seconds(middle, costs, shape) <= seconds else (low, middle)
    return low


@dataclass
class Budget:
    """A budgeted run's plan and its clock: what state/trainer.json and summary.json keep of the budget."""

    seconds: float
    planned_epochs: float
    recipe_epochs: float
    steps: int
    images_per_sec: float
    started: float  # this launch's start (time.time())
    used_before: float = 0.0  # seconds earlier launches of the run used

    def used(self) -> float:
        return self.used_before + time.time() - self.started

    def record(self) -> dict:
        return {"seconds": self.seconds, "used_s": round(self.used(), 2), "planned_epochs": self.planned_epochs,
                "recipe_epochs": self.recipe_epochs, "steps": self.steps, "images_per_sec": self.images_per_sec}

    @classmethod
    def resumed(cls, saved: dict) -> "Budget":
        """The plan of a run resumed: its clock goes on from what earlier launches used."""
        return cls(saved["seconds"], saved["planned_epochs"], saved["recipe_epochs"], saved["steps"],
                   saved["images_per_sec"], launch_started(), float(saved.get("used_s", 0.0)))

    def usage(self) -> str:
        """``used 14m 32s of the 15m 00s budget (97%)``."""
        return f"used {duration(self.used())} of the {duration(self.seconds)} budget ({self.used() / self.seconds:.0%})"


def plan_line(budget: Budget, steps_per_epoch: int, ends_at: float) -> str:
    ratio = budget.planned_epochs / budget.recipe_epochs
    return (f"time budget {duration(budget.seconds)}: measured {budget.images_per_sec:.0f} img/s; plan {budget.steps} "
            f"steps = {budget.planned_epochs:.3g} epochs of {steps_per_epoch} steps (the recipe's "
            f"{budget.recipe_epochs:g} x {ratio:.3g}; lengths in epochs scaled alike); ends about "
            f"{time.strftime('%H:%M:%S', time.localtime(ends_at))}")


def squeezed_hint(budget: Budget) -> str | None:
    """A line pointing to a short-run recipe when the budget cuts a long schedule to a fraction of itself."""
    ratio = budget.planned_epochs / budget.recipe_epochs
    if budget.recipe_epochs < LONG_RECIPE or ratio >= SQUEEZED:
        return None
    return (f"time budget {duration(budget.seconds)}: only {ratio:.0%} of this recipe's {budget.recipe_epochs:g} epochs "
            "fit; a recipe made for short runs likely scores far higher in it: --config configs/fast.yaml "
            "(docs/training.md#a-time-budget)")


def keep_saved_plan(cfg: Any, printer: Callable[[str], None] = print) -> Any:
    """A resume with --time-budget finishes the run's plan: the planned lengths of its config.yaml."""
    from .config import load_recipe

    saved = load_recipe(type(cfg), Path(cfg.resume) / "config.yaml")
    planned = {name: saved[name] for name in PLANNED_FIELDS if name in saved}
    printer(f"--time-budget {cfg.time_budget}: a resume finishes the run's own plan ({planned.get('epochs', cfg.epochs):.3g} "
            "epochs); it does not plan again")
    return dataclasses.replace(cfg, **planned)


# ------------------------------------------------------------------------------------------------
# Measuring (on a run built for it and then dropped)
def measure_costs(run: Any, budget_s: float, setup_s: float) -> Costs:
    """Time ``run``'s real steps (its loader, techniques and optimizer), an evaluation and a save. The run is
    rebuilt afterwards, so what this trains is thrown away."""
    from .distributed import main_process_value
    from .engine import EpochPlan, train_epoch
    from .interrupt import StopRequest

    stop = StopRequest()  # never entered: a signal while measuring ends the launch as before it started
    batches = _Passes(run.train_loader)

    def steps(n: int):
        outcome = train_epoch(run.parts, batches, run.schedule, EpochPlan(0, 0, n, 0), stop, n, False)
        return outcome.step, outcome.sums.elapsed, outcome.first_step_time

    warm_steps, warm_s, first_s = steps(2)  # warm-up (and compile): timed apart
    guess = (warm_s - first_s) / (warm_steps - 1) if warm_steps > 1 else first_s
    block_s = min(max(0.02 * budget_s, MEASURE_MIN_S), MEASURE_MAX_S) / MEASURE_BLOCKS
    per_step = []
    for _ in range(MEASURE_BLOCKS):  # consecutive chunks of the loader's batches, each of block_s
        n, s = 0, 0.0
        while True:
            wanted = max(1, math.ceil((block_s - s) / max(guess, 1e-6))) if s < block_s or n == 0 else 0
            # Rank 0's clock sizes each chunk and ends the block for every rank: ranks that stepped apart
            # would pair up unlike all-reduces and hang.
            chunk = main_process_value(run.accelerator, wanted)
            if chunk == 0:
                break
            more, seconds, _ = steps(chunk)
            n, s = n + more, s + seconds
        per_step.append(s / n)
        guess = s / n
    step_s = statistics.median(per_step)
    return Costs(step_s, max(first_s - step_s, 0.0), setup_s, _eval_image_seconds(run), _save_seconds(run))


class _Passes:
    """The loader's passes end to end, drawn in chunks (each chunk one ``train_epoch``): the timed blocks
    follow on within a pass, as an epoch's steps do, rather than each starting a pass (its workers' first
    batches), which a block of a few seconds would overweight."""

    def __init__(self, loader: Any):
        self.loader = loader
        self.batches = self._end_to_end()

    def _end_to_end(self):
        for epoch in itertools.count():
            self.loader.set_epoch(epoch)
            yield from self.loader

    def __iter__(self):
        return self.batches  # the same iterator each time: a chunk goes on where the last one stopped

    def __len__(self) -> int:
        return len(self.loader)


def _eval_image_seconds(run: Any) -> float:
    from .data import MEAN, STD
    from .engine import evaluate

    def once() -> float:
        start = time.perf_counter()
        evaluate(run.eval_model, run.probe_loader, run.accelerator, MEAN, STD, channels_last=run.cfg.channels_last)
        return time.perf_counter() - start

    once()  # its warm-up
    return once() / max(len(run.probe_loader.dataset), 1)


def _save_seconds(run: Any) -> float:
    """An epoch's saves, as training makes them (last and best weights, then the state folder), written into
    a scratch folder."""
    from .training import save_weights, write_state  # training imports this module

    accelerator, scratch = run.accelerator, run.run_dir / "budget-measure.tmp"
    if accelerator.is_main_process:
        scratch.mkdir(exist_ok=True)
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    save_weights(run, 0, {}, best=True, folder=scratch)
    write_state(run, scratch)
    seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(scratch, ignore_errors=True)
    return seconds


def plan_budget(cfg: Any, setup: Callable[..., Any], started: float | None = None) -> tuple[Any, Budget]:
    """(the config to train, its plan) for ``cfg.time_budget``: ``setup(cfg, announce)`` builds a run to
    measure (``training.setup_run``); rank 0's plan is every rank's."""
    from .distributed import main_process_value

    seconds = parse_duration(cfg.time_budget)
    started = launch_started() if started is None else started
    if time.time() - started >= seconds * TARGET:
        raise ConfigError(f"--time-budget {cfg.time_budget}: start-up alone took {duration(time.time() - started)}; "
                          f"give at least {duration(_nice(2.5 * (time.time() - started)))}")
    build_start = time.perf_counter()
    run = setup(cfg, True)
    setup_s = time.perf_counter() - build_start
    try:
        run.accelerator.print(f"time budget {duration(seconds)}: measuring the step rate, an evaluation and a save "
                              "(the run is then built again, as planned)")
        costs = measure_costs(run, seconds, setup_s + (TRACKING_S if run.wandb_mode != "off" else 0.0))
        shape = Shape(run.steps_per_epoch, len(run.val_loader.dataset) if run.val_loader is not None else 0,
                      len(run.probe_loader.dataset), cfg.eval_every, cfg.tta if run.val_loader is not None else 0)
        left = seconds * TARGET - (time.time() - started)
        steps = main_process_value(run.accelerator, plan_steps(left, costs, shape))  # rank 0's word is the plan
        if steps < 1:
            least = (time.time() - started + launch_seconds(1, costs, shape)) / TARGET
            raise ConfigError(f"--time-budget {cfg.time_budget}: too small for this run here: start-up, measuring, "
                              f"one step, one evaluation and the saves need about {duration(least)}; give at least "
                              f"{duration(_nice(least))}")
    except ConfigError:
        _drop_empty(run.run_dir)
        raise
    spe = run.steps_per_epoch
    budget = Budget(seconds, steps / spe, cfg.epochs, steps, round(run.global_batch / costs.step_s, 1), started)
    run.accelerator.print(plan_line(budget, spe, time.time() + launch_seconds(steps, costs, shape)))
    if hint := squeezed_hint(budget):
        run.accelerator.print(hint)
    run.train_loader.close()
    run_dir = str(run.run_dir)
    del run  # its model, optimizer and loader: the run is built again from the planned config
    planned = dataclasses.replace(scaled_config(cfg, steps / spe), run_dir=run_dir, overwrite=False)
    return planned, budget


def _nice(seconds: float) -> float:
    """Up to a round figure a user would type: 5 s under 2 minutes, else 30 s."""
    step = 5 if seconds < 120 else 30
    return math.ceil(seconds / step) * step


def _drop_empty(folder: Path) -> None:
    try:
        Path(folder).rmdir()  # only an empty folder: the run folder made for a plan that was refused
    except OSError:
        pass
