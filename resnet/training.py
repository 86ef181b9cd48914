"""``train(cfg)``: set a run up once (``setup_run``), loop its epochs (``train_epoch``), end each epoch
(``end_epoch``: validate, save, log). Everything a run holds lives in one ``Run``; its position and
findings in a ``TrainState`` (state.py) saved with every checkpoint."""
from __future__ import annotations

import difflib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from . import checkpoint as ckpt
from . import state_folder
from .augment import AugmentConfig, BatchAugment
from .budget import Budget, keep_saved_plan, parse_duration, plan_budget
from .config import COMPILE_MODES, ConfigError, TrainConfig, config_to_dict, save_config
from .data import CLASSES, MEAN, STD, cifar10_splits
from .distributed import create_accelerator, main_process_value, precision_of, scaled_lr
from .engine import EpochOutcome, EpochPlan, StepParts, confusion_matrix, evaluate, train_epoch
from .hardware import print_precision_hint
from .identity import activation_of, run_group, run_name
from .interrupt import StopRequest, Stopped
from .launch import launch_command, watch_launcher
from .loader import DeviceLoader, eval_loader, per_image_transform, worker_loader
from .models import count_parameters, create_model, list_models
from .optim import DEFAULT_LR, DEFAULT_WEIGHT_DECAY, create_optimizer, create_scheduler, per_1024_images
from .progress import RunClock, closing_line, duration, epoch_position
from .resume import describe, resume_changes
from .state import StateError, TrainState
from .techniques import RunInfo, check_techniques, create_techniques, technique_model_kwargs
from .tracking import (MetricsLog, define_wandb_metrics, environment_info, print_sync_hint, resolve_wandb_mode,
                       wandb_class_report, wandb_image_grid, wandb_init_kwargs, wandb_row, wandb_run_id)


# In an epoch without validation, the loss on this many (unaugmented) training images tells that the weights
# about to be saved score a finite loss: ~1% of an epoch's compute on CIFAR-10.
PROBE_IMAGES = 500


# ------------------------------------------------------------------------------------------------
# The config
def check_config(cfg: TrainConfig) -> None:
    """Fail early, naming the flag, on values that would otherwise fail deep inside the loop."""
    def need(ok: bool, flag: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"--{flag.replace('_', '-')}: {what}, got {getattr(cfg, flag)!r}")

    need(cfg.epochs > 0, "epochs", "must be positive")
    if cfg.time_budget is not None:
        parse_duration(cfg.time_budget)  # a ConfigError naming the flag
    need(cfg.batch_size >= 1, "batch_size", "must be at least 1")
    need(cfg.eval_every >= 1, "eval_every", "must be at least 1")
    need(cfg.check_every >= 1, "check_every", "must be at least 1")
    need(cfg.lr is None or cfg.lr > 0, "lr", "must be positive")
    need(0 <= cfg.crop_scale < 1, "crop_scale", "must be in [0, 1) (0 = off)")
    need(0 < cfg.crop_ratio <= 1, "crop_ratio", "must be in (0, 1]")
    need(0 <= cfg.hue <= 0.5, "hue", "must be in [0, 0.5]")
    need(0 <= cfg.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
    for name in ("hflip", "vflip", "jitter_p", "blur_p", "cutout_p", "random_erasing"):
        need(0 <= getattr(cfg, name) <= 1, name, "is a probability in [0, 1]")
    for name in ("translate", "rotation", "color_jitter", "blur_sigma", "cutout", "warmup_epochs", "val_split",
                 "train_subset", "workers", "momentum", "norm_bias_lr_scale"):
        need(getattr(cfg, name) >= 0, name, "must not be negative")
    need(cfg.weight_decay is None or cfg.weight_decay >= 0, "weight_decay", "must not be negative")
    need(0 <= cfg.warmup_lr_ratio <= 1, "warmup_lr_ratio", "must be in [0, 1]")
    need(0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
    need(not (cfg.resume and cfg.overwrite), "overwrite", "cannot be combined with --resume")
    need(not (cfg.resume and cfg.run_dir and Path(cfg.run_dir) != Path(cfg.resume)), "run_dir",
         f"differs from --resume {cfg.resume}; a resumed run stays in its own folder")
    for name in ("auto_augment", "random_erasing"):
        need(cfg.loader == "workers" or not getattr(cfg, name), name, "is per-image: add --loader workers")
    need(cfg.lr_unit == "batch" or cfg.lr is not None, "lr_unit",
         "image1024 needs an explicit --lr (the defaults are per batch)")
    need(cfg.lr_unit == "batch" or cfg.lr_scale == "none", "lr_scale",
         "must be none with --lr-unit image1024, which already scales with the global batch")
    check_techniques(cfg, need)


def augment_config(cfg: TrainConfig) -> AugmentConfig:
    return AugmentConfig(
        crop_scale=cfg.crop_scale or 1.0, crop_ratio=cfg.crop_ratio, translate=cfg.translate,
        hflip=cfg.hflip if cfg.flip == "random" else 0.0,  # --flip alternate: the loader flips
        vflip=cfg.vflip, rotation=cfg.rotation, color_jitter=cfg.color_jitter,
        hue=cfg.hue, jitter_p=cfg.jitter_p, blur_sigma=cfg.blur_sigma, blur_p=cfg.blur_p,
        cutout=cfg.cutout, cutout_p=cfg.cutout_p,
    )


def model_kwargs(cfg: TrainConfig) -> dict:
    """The model-builder arguments of a run: --model-kwargs, --activation, the techniques' (saved with the weights)."""
    kw = dict(cfg.model_kwargs)
    if cfg.activation:
        kw["activation"] = cfg.activation
    kw.update(technique_model_kwargs(cfg))
    return kw


def build_model(cfg: TrainConfig) -> nn.Module:
    """The configured net; an unknown name or a bad --model-kwargs entry is a one-line ConfigError."""
    if cfg.model not in list_models():
        near = difflib.get_close_matches(cfg.model, list_models(), n=1)
        hint = f"did you mean {near[0]}?" if near else f"known models: {', '.join(list_models())}"
        raise ConfigError(f"--model: unknown model {cfg.model!r}; {hint}")
    try:
        return create_model(cfg.model, **model_kwargs(cfg))
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"--model-kwargs: {cfg.model} cannot be built with {model_kwargs(cfg)} ({e})") from None


# ------------------------------------------------------------------------------------------------
# The run folder
def prepare_run_dir(cfg: TrainConfig, accelerator: Accelerator) -> Path:
    """The run folder, created (or emptied with --overwrite) on the main process and shared with every rank.

    A new run never lands in a folder that holds another: it would append to its metrics.csv and could
    replace a better best.safetensors. Generated names get a suffix until unique, even within one second.
    """
    if cfg.resume:
        state_folder.state_dir_for_resume(cfg.resume)  # fails early, naming the folder, when there is nothing to resume
        return Path(cfg.resume)
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"--run-dir {run_dir}: is a file, not a folder")
        held = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
        if held and not cfg.overwrite:
            raise ConfigError(f"--run-dir {run_dir}: already holds a run ({', '.join(held[:4])}); pass "
                              f"--resume {run_dir} to continue it, --overwrite to start it afresh, or another --run-dir")
    name = cfg.run_dir or ""
    if accelerator.is_main_process:
        if cfg.run_dir:
            if cfg.overwrite and run_dir.is_dir():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
        else:
            name = str(_unique_run_dir(cfg))
    return Path(main_process_value(accelerator, name))


def _unique_run_dir(cfg: TrainConfig) -> Path:
    base = f"runs/{cfg.model}-{activation_of(config_to_dict(cfg))}-{cfg.opt}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        path = Path(base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir(parents=True)  # atomic: two runs started in the same second cannot both get it
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"could not find a free run folder name under {base}; pass --run-dir")


# ------------------------------------------------------------------------------------------------
# Setting a run up
@dataclass
class Run:
    """Everything a run holds, built once by ``setup_run``."""

    cfg: TrainConfig
    accelerator: Accelerator
    parts: StepParts
    schedule: Any
    train_loader: Any
    val_loader: Any
    run_dir: Path
    state: TrainState
    metrics: MetricsLog
    steps_per_epoch: int
    total_steps: int
    global_batch: int
    meta: dict  # saved with the weights: what evaluate.py and predict.py need to rebuild and score the net
    precision: str
    probe_loader: Any = None  # training images whose loss tells finite weights in an epoch not validated
    wandb_mode: str = "off"
    wandb: Any = None
    started: float = 0.0  # time.perf_counter() at start-up
    first_epoch: int = 0  # the first epoch this launch trains (0-based)
    clock: RunClock | None = None  # this launch's step and epoch times, for the time left (run_clock)
    budget: Budget | None = None  # a --time-budget run's plan and clock

    @property
    def n_epochs(self) -> int:
        """Epochs to loop over: a fractional --epochs cuts the last one short."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, step in it) the saved state continues from, at this launch's global batch."""
        return self.state.position(self.steps_per_epoch, self.global_batch)

    @property
    def steps_done(self) -> int:
        """Updates the saved state has made, at this launch's global batch."""
        return self.epoch_plan(*self.position).global_step

    def validates(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) ends with a validation: every --eval-every epochs, and the last."""
        due = (epoch + 1) % self.cfg.eval_every == 0 or epoch + 1 == self.n_epochs
        return self.val_loader is not None and due

    def epoch_plan(self, epoch: int, skip: int = 0, carry=None) -> EpochPlan:
        """The updates of ``epoch`` to run, after ``skip`` done before (a resumed epoch, its sums ``carry``)."""
        first = epoch * self.steps_per_epoch
        return EpochPlan(epoch, skip, min(self.steps_per_epoch, self.total_steps - first), first + skip, carry)

    @property
    def eval_model(self) -> nn.Module:
        """The model validated and saved: the EMA's when a technique keeps one, else the trained one."""
        average = self.parts.techniques.eval_model()
        return self.parts.model if average is None else average


def make_train_loader(cfg: TrainConfig, accelerator: Accelerator, train_set):
    """DeviceLoader (batched augmentation on the device) or the per-image DataLoader path."""
    if cfg.loader == "device":
        return DeviceLoader(train_set.images, train_set.labels, cfg.batch_size, accelerator.device,
                            BatchAugment(augment_config(cfg), MEAN, STD), seed=cfg.seed,
                            rank=accelerator.process_index, world_size=accelerator.num_processes,
                            channels_last=cfg.channels_last, alternate_flip=cfg.flip == "alternate")
    transform = per_image_transform(augment_config(cfg), MEAN, STD, cfg.auto_augment, cfg.random_erasing)
    return worker_loader(accelerator, train_set.images, train_set.labels, cfg.batch_size, transform,
                         workers=cfg.workers, seed=cfg.seed, channels_last=cfg.channels_last,
                         alternate_flip=cfg.flip == "alternate")


def compile_model(model: nn.Module, mode: str, device: torch.device, printer=print,
                  gpu_modes: bool | None = None) -> nn.Module:
    """torch.compile with ``mode``; the GPU-only modes (CUDA graphs, kernel autotuning) compile with
    ``default`` on a CPU, saying so. ``gpu_modes`` True passes any mode through whatever the device (tests;
    None: on CUDA only). On a CPU, max-autotune(-no-cudagraphs) then autotunes inductor's CPU kernels: it runs,
    but it is not the GPU's Triton autotuning. The CUDA-graph part of reduce-overhead and max-autotune cannot
    run on a CPU at all: CUDA graphs capture CUDA kernels, and inductor skips them for CPU tensors, so a CPU
    never takes that branch."""
    if gpu_modes is None:
        gpu_modes = device.type == "cuda"
    if mode != "default" and not gpu_modes:
        printer(f"--compile-mode {mode}: GPU-only ({', '.join(COMPILE_MODES[1:])}); compiling with default on "
                f"{device.type}")
        mode = "default"
    return torch.compile(model, mode=mode)


def base_lr(cfg: TrainConfig) -> float:
    """--lr, else the optimizer's default, in --lr-unit terms (before any scaling)."""
    return cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.opt]


def build_optimizer(cfg: TrainConfig, model: nn.Module, techniques, global_batch: int, num_processes: int):
    """(optimizer, its lr): the lr per --lr-unit and --lr-scale, the techniques' options and wrappers."""
    lr = per_1024_images(base_lr(cfg), global_batch) if cfg.lr_unit == "image1024" else \
        scaled_lr(base_lr(cfg), cfg.lr_scale, num_processes)
    weight_decay = cfg.weight_decay if cfg.weight_decay is not None else DEFAULT_WEIGHT_DECAY[cfg.opt]
    optimizer = create_optimizer(model, cfg.opt, lr, weight_decay, cfg.momentum,
                                 norm_bias_lr_scale=cfg.norm_bias_lr_scale, **techniques.optimizer_options())
    return techniques.wrap_optimizer(optimizer), lr


def setup_run(cfg: TrainConfig, announce: bool = True) -> Run:
    """Build every part of a run. Whatever can fail on the user's input fails before a file is written.
    ``announce`` False: no start-up lines (a budgeted run's second build, after the plan)."""
    started = time.perf_counter()
    check_config(cfg)
    wandb_mode = resolve_wandb_mode(cfg.wandb)
    accelerator = create_accelerator(log_with="wandb" if wandb_mode != "off" else None)
    if cfg.resume and cfg.time_budget:
        cfg = keep_saved_plan(cfg, accelerator.print)
    changes = resume_changes(cfg) if cfg.resume else []
    if announce:
        print_precision_hint(accelerator)  # fp32 where bf16 is native: one line saying how to use it
    if cfg.sync_bn and accelerator.device.type == "cpu":
        raise ConfigError("--sync-bn: PyTorch's SyncBatchNorm runs on GPUs only; drop it for CPU runs")
    set_seed(cfg.seed)  # same init on every rank; DDP also broadcasts rank 0's weights
    model = build_model(cfg)
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    train_set, val_set = cifar10_splits(cfg.data_dir, cfg.val_split, split_seed, cfg.download, cfg.train_subset)
    train_loader = make_train_loader(cfg, accelerator, train_set)  # too few images for a batch: ConfigError
    run_dir = prepare_run_dir(cfg, accelerator)

    n_params = count_parameters(model)
    layout = torch.channels_last if cfg.channels_last else torch.preserve_format
    model = model.to(accelerator.device, memory_format=layout)
    steps_per_epoch, global_batch = len(train_loader), cfg.batch_size * accelerator.num_processes
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))  # a fractional --epochs cuts the last epoch
    techniques = create_techniques(cfg, RunInfo(accelerator, model, train_set.images, steps_per_epoch, total_steps))
    optimizer, lr = build_optimizer(cfg, model, techniques, global_batch, accelerator.num_processes)
    if cfg.sync_bn and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.compile:
        model = compile_model(model, cfg.compile_mode, accelerator.device, accelerator.print)
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = create_scheduler(optimizer, total_steps, round(cfg.warmup_epochs * steps_per_epoch),
                                cfg.warmup_lr_ratio, cfg.min_lr_ratio, cfg.schedule)
    loss_fn = techniques.loss_fn() or nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    val_loader = accelerator.prepare(eval_loader(val_set.images, val_set.labels, 500)) if len(val_set.labels) else None
    probe = accelerator.prepare(eval_loader(train_set.images[:PROBE_IMAGES], train_set.labels[:PROBE_IMAGES], 500))
    meta = {"model": cfg.model, "model_kwargs": model_kwargs(cfg), "classes": list(CLASSES), "mean": list(MEAN),
            "std": list(STD), "num_params": n_params, "val_split": cfg.val_split, "seed": cfg.seed,
            "split_seed": split_seed, "tta": cfg.tta}
    run = Run(cfg, accelerator, StepParts(model, optimizer, loss_fn, accelerator, techniques), schedule, train_loader,
              val_loader, run_dir, TrainState(), MetricsLog(run_dir, enabled=accelerator.is_main_process),
              steps_per_epoch, total_steps, global_batch, meta, precision_of(accelerator), probe, wandb_mode,
              started=started)
    if cfg.resume:
        resume_run(run, changes)
    if announce:
        accelerator.print(_header(run, lr, len(train_set.labels), len(val_set.labels)))
    return run


def resume_run(run: Run, changes: list[dict]) -> None:
    """Restore the run's saved state in place (weights, optimizer, techniques, RNGs, TrainState), and say in
    one line what this launch changes: the schedule flags ``changes``, the precision, the process count."""
    accelerator, model = run.accelerator, run.accelerator.unwrap_model(run.parts.model, keep_torch_compile=False)
    source, trainer, tensors = state_folder.load_state(accelerator, run.run_dir, model, run.parts.optimizer)
    try:
        run.parts.techniques.load_state_tensors(tensors, str(source / state_folder.TECHNIQUES_FILE))
        run.state = TrainState.from_dict(trainer, str(source / state_folder.TRAINER_FILE))
    except (StateError, ValueError, RuntimeError) as e:
        raise ckpt.CheckpointError(str(e).splitlines()[0]) from None
    state, processes = run.state, accelerator.num_processes
    for what, saved, now in (("precision", state.precision, run.precision), ("processes", state.processes, processes)):
        if saved and saved != now:
            changes.append({"flag": what, "from": saved, "to": now})
    if changes:
        epoch = run.position[0] + 1
        state.changes += [{"epoch": epoch, **c} for c in changes]
        accelerator.print(f"resuming with changes from epoch {epoch}: {describe(changes)}")
    if processes > state.processes > 0:
        extra = f"process {state.processes} has" if processes - state.processes == 1 else \
            f"processes {state.processes} to {processes - 1} have"
        accelerator.print(f"note: {extra} no saved random generators (the run was saved by {state.processes}): "
                          "seeded from --seed instead")
    if state.budget:
        run.budget = Budget.resumed(state.budget)
    elif run.cfg.time_budget:
        raise ConfigError(f"--time-budget: {run.run_dir} was not planned by a budget, and a resume finishes a run as "
                          "it was planned; drop --time-budget (--epochs N changes its length)")


def _header(run: Run, lr: float, n_train: int, n_val: int) -> str:
    cfg, n_proc = run.cfg, run.accelerator.num_processes
    given = base_lr(cfg)
    scaled = f" ({cfg.lr_scale}-scaled from {given:g})" if cfg.lr_scale != "none" and lr != given else ""
    per_1024 = f" ({given:g} per 1024 images)" if cfg.lr_unit == "image1024" else ""
    epoch, step = run.position
    return (f"global batch {run.global_batch} ({n_proc} process{'es' if n_proc > 1 else ''} x {cfg.batch_size}), "
            f"lr {lr:g}{scaled}{per_1024} | {cfg.model} ({run.meta['num_params']:,} parameters) on "
            f"{run.accelerator.device.type}, precision {run.precision} | {n_train:,} train / {n_val:,} val images, "
            f"{run.steps_per_epoch} steps/epoch | run {run.run_dir}"
            + (f" | resumed at epoch {epoch + 1}, step {step}" if cfg.resume else ""))


# ------------------------------------------------------------------------------------------------
# Training
def train(cfg: TrainConfig) -> dict:
    """Train per ``cfg``; returns the final epoch's metrics, ``best_val_acc``, ``run_dir``, the trained ``model``
    and its ``ema`` (the averaged model, or None).

    Raises ``Stopped`` after saving a resumable state when SIGTERM/SIGINT arrives, and without saving
    anything when the loss or the weights stop being finite.
    """
    budget = None
    if cfg.time_budget and not cfg.resume:
        cfg, budget = plan_budget(cfg, setup_run)  # measures on a run built for it, then plans
    run = setup_run(cfg, announce=budget is None)
    if budget is not None:
        run.budget, run.state.budget = budget, budget.record()
    accelerator, state = run.accelerator, run.state
    start_epoch, skip = run.position
    row: dict = {}
    try:
        if run.steps_done >= run.total_steps:
            accelerator.print(f"{run.run_dir} already trained {run.steps_done / run.steps_per_epoch:g} epochs; "
                              "pass --epochs N to train longer")
            return result(run, row)
        start_tracking(run)
        run.first_epoch, carry = start_epoch, state.partial if skip else None
        with StopRequest() as stop:
            watch_launcher(stop)
            for epoch in range(start_epoch, run.n_epochs):
                plan = run.epoch_plan(epoch, skip, carry)
                run.train_loader.set_epoch(epoch, skip)
                outcome = train_epoch(run.parts, run.train_loader, run.schedule, plan, stop, cfg.check_every,
                                      cfg.progress, run_clock(run))
                check_outcome(run, outcome, plan, stop)
                row = end_epoch(run, epoch, outcome, plan)
                skip, carry = 0, None
                last = epoch + 1 == run.n_epochs
                if not last and agreed(accelerator, stop.requested):
                    run.metrics.plot()
                    raise _stopped(stop, run.run_dir, f"the end of epoch {epoch + 1}")
    finally:
        run.train_loader.close()
        accelerator.end_training()
    if run.budget is not None and accelerator.is_main_process:
        write_summary(run, finished=True)  # the budget used, to the end
    accelerator.print(closing_line(run.run_dir, state.best_val_acc, state.best_epoch, run.val_loader is not None,
                                   run.steps_done / run.steps_per_epoch, time.perf_counter() - run.started)
                      + (f"; {run.budget.usage()}" if run.budget is not None else ""))
    return result(run, row)


def result(run: Run, row: dict) -> dict:
    unwrap = run.accelerator.unwrap_model
    return {**row, "best_val_acc": run.state.best_val_acc, "run_dir": str(run.run_dir),
            "model": unwrap(run.parts.model, keep_torch_compile=False), "ema": run.parts.techniques.eval_model()}


def check_outcome(run: Run, outcome: EpochOutcome, plan: EpochPlan, stop: StopRequest) -> None:
    """Raise ``Stopped`` for an epoch ended by a non-finite loss (nothing saved) or a stop (state saved first)."""
    if outcome.nonfinite:
        first, last = outcome.nonfinite
        where = f"step {last}" if first == last else f"between steps {first} and {last}"
        raise blow_up(run, f"the training loss became non-finite (nan/inf) at epoch {plan.epoch + 1}, {where} of "
                           f"{run.steps_per_epoch}")
    if outcome.stopped:
        run.metrics.plot()
        save_state(run, plan, outcome)
        raise _stopped(stop, run.run_dir, f"epoch {plan.epoch + 1}, step {outcome.step}/{run.steps_per_epoch}")


def blow_up(run: Run, what: str) -> Stopped:
    """The stop after a non-finite loss or weights: nothing of this epoch is saved; say which epoch is kept."""
    state = run.state
    if state.saves:
        at = f"epoch {state.epoch}" + (f", step {state.step_in_epoch}" if state.step_in_epoch else "")
        kept = (f"kept: the state and weights of {at} in {run.run_dir}; continue from there with a lower lr: "
                f"{launch_command(['--resume', str(run.run_dir)])} --lr <lower>")
    else:
        kept = "nothing was saved: no epoch ended with finite weights; start again with a lower --lr"
    return Stopped(f"error: {what}; {kept} (or try --clip-grad 1.0)", 3)


def save_state(run: Run, plan: EpochPlan, outcome: EpochOutcome) -> None:
    """Save where ``outcome`` left ``plan``'s epoch: whole (the next epoch's start), or part of it with its
    sums (a stop, a cut last epoch: a longer --epochs on resume continues it). ``train_time_s`` gains this
    launch's part of the epoch (a carried part was counted when it was saved)."""
    state, whole = run.state, outcome.step >= run.steps_per_epoch
    state.epoch, state.step_in_epoch = (plan.epoch + 1, 0) if whole else (plan.epoch, outcome.step)
    state.partial = None if whole else outcome.sums
    state.global_batch, state.processes, state.precision = run.global_batch, run.accelerator.num_processes, run.precision
    if run.budget is not None:
        state.budget = run.budget.record()
    state.train_time_s += outcome.sums.elapsed - (plan.carry.elapsed if plan.carry else 0.0)
    write_state(run, run.run_dir)
    save_run_config(run)  # the config of the saved state, which a resume compares its flags with


def write_state(run: Run, folder: Path) -> None:
    """The state folder of ``run`` as it stands into ``folder`` (the run's, or the budget's scratch one)."""
    model = run.accelerator.unwrap_model(run.parts.model, keep_torch_compile=False)
    state_folder.save_state(run.accelerator, folder, model, run.parts.optimizer,
                            run.parts.techniques.state_tensors(), run.state.to_dict())


def end_epoch(run: Run, epoch: int, outcome: EpochOutcome, plan: EpochPlan) -> dict:
    """Validate, save weights and state, log: the epoch's row (as in metrics.csv)."""
    accelerator, state = run.accelerator, run.state
    last = epoch + 1 == run.n_epochs
    sync_buffers(accelerator, accelerator.unwrap_model(run.parts.model), run.parts.techniques.eval_model())
    sums = outcome.sums
    row = {"epoch": epoch + 1, "step": outcome.global_step, "train_loss": sums.loss_sum / max(sums.seen, 1),
           "train_acc": sums.correct / max(sums.seen, 1),
           "lr": run.schedule.lr_at(plan.epoch * run.steps_per_epoch),  # the lr of the epoch's first update
           "images_per_sec": sums.seen / max(sums.elapsed, 1e-9), "epoch_time": sums.elapsed,
           "first_step_time": outcome.first_step_time}
    val = validate(run, row, last) if run.validates(epoch) else None
    check_finite(run, plan, val)
    improved = val is not None and val["acc"] > state.best_val_acc
    if improved:
        state.best_val_acc, state.best_epoch = val["acc"], epoch + 1
    row["best_val_acc"] = state.best_val_acc if state.best_val_acc >= 0 else None
    row["elapsed"] = time.perf_counter() - run.started  # seconds since start-up, evaluations included
    # The row before the state: a complete saved state always has its row (a resume drops later ones).
    run.accelerator.log(wandb_row(row))
    if accelerator.is_main_process:
        run.metrics.append(row, last=last)
    save_weights(run, epoch, row, improved or run.val_loader is None)
    save_state(run, plan, outcome)
    report_epoch(run, row, val, last)
    return row


def validate(run: Run, row: dict, last: bool) -> dict:
    """Score the validated model into ``row``: ``val_acc`` without TTA at every epoch (what "best" compares),
    and at the last epoch also with the recipe's TTA (``val_acc_tta``; TTA multiplies eval cost). Returns
    the last evaluation (with its predictions, for the confusion matrix)."""
    cfg, accelerator = run.cfg, run.accelerator
    val = evaluate(run.eval_model, run.val_loader, accelerator, MEAN, STD, channels_last=cfg.channels_last)
    row.update(val_loss=val["loss"], val_acc=val["acc"])
    if last and cfg.tta:
        tta = evaluate(run.eval_model, run.val_loader, accelerator, MEAN, STD, tta=cfg.tta,
                       channels_last=cfg.channels_last)
        row.update(val_loss_tta=tta["loss"], val_acc_tta=tta["acc"])
        return {**tta, "acc": val["acc"], "loss": val["loss"]}
    return val


def check_finite(run: Run, plan: EpochPlan, val: dict | None) -> None:
    """Raise ``blow_up`` before anything of the epoch is saved unless the weights are finite and the saved
    model scores a finite loss (on the validation split, else on training images). The training loss is
    measured before each update, so it misses a blow-up in an epoch's last update."""
    params = [p.detach() for p in run.parts.model.parameters()]
    weights_finite = bool(torch.stack(torch._foreach_norm(params)).isfinite().all())  # one read
    if val is None:
        val = evaluate(run.eval_model, run.probe_loader, run.accelerator, MEAN, STD,
                       channels_last=run.cfg.channels_last)
    if not (weights_finite and math.isfinite(val["loss"])):
        what = "the weights" if not weights_finite else "the loss of the weights to save"
        raise blow_up(run, f"{what} became non-finite (nan/inf) by the end of epoch {plan.epoch + 1}")


def save_weights(run: Run, epoch: int, row: dict, best: bool, folder: Path | None = None) -> None:
    """last.safetensors, and best.safetensors when the validation improved (or there is none), into the run
    folder (or ``folder``)."""
    if run.accelerator.is_main_process:
        folder = run.run_dir if folder is None else folder
        weights = run.accelerator.unwrap_model(run.eval_model, keep_torch_compile=False)
        epoch_meta = {**run.meta, "epoch": epoch + 1, "val_acc": row.get("val_acc")}
        ckpt.save_weights(folder / "last.safetensors", weights, epoch_meta)
        if best:
            ckpt.save_weights(folder / "best.safetensors", weights, epoch_meta)


def sync_buffers(accelerator: Accelerator, *modules: nn.Module | None) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics) of ``modules``, as DDP does at each forward.

    Parameters agree on every rank already (the same averaged gradients, the same updates), but each
    rank's BatchNorm statistics follow its own batches since its last forward through DDP. An EMA
    model never goes through DDP: without this the ranks would validate different EMA models, and rank
    0 would save one that the others never evaluated.
    """
    if accelerator.num_processes > 1:
        for module in modules:
            for buffer in module.buffers() if module is not None else ():
                torch.distributed.broadcast(buffer, src=0)


def agreed(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when it is true on any (signals reach ranks at slightly different moments)."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item() > 0


# ------------------------------------------------------------------------------------------------
# Tracking
def start_tracking(run: Run) -> None:
    """Drop metrics rows a resume will run again, save config.yaml, start W&B (with a first augmented batch)."""
    cfg, accelerator = run.cfg, run.accelerator
    if cfg.resume:
        run.metrics.truncate_after(run.state.epoch)  # the rows of epochs to be run (again), a cut last one included
    if not cfg.resume:
        save_run_config(run)  # a resume's waits for its first save: until then the saved state is the old config's
    run.wandb = start_wandb(cfg, accelerator, run.wandb_mode, run.run_dir, run.meta["num_params"])
    if run.wandb is not None and not cfg.resume:
        run.train_loader.set_epoch(0)
        run.wandb.log({"train/augmented_batch": wandb_image_grid(
            next(iter(run.train_loader))[0], MEAN, STD, "augmented training batch, epoch 1 (as the model sees it)")})


def save_run_config(run: Run) -> None:
    """config.yaml: this launch's config, headed by the precision and what each resume changed."""
    if run.accelerator.is_main_process:
        header = [f"precision used: {run.precision} (from the accelerate config; not a train.py flag)"]
        if run.budget is not None:
            b = run.budget
            header.append(f"planned by --time-budget {duration(b.seconds)} at {b.images_per_sec:g} img/s: "
                          f"{b.planned_epochs:.4g} epochs ({b.steps} steps) in place of the recipe's {b.recipe_epochs:g}, "
                          "every length in epochs scaled alike; this file repeats those steps")
        header += [f"from epoch {c['epoch']} (a resume): {describe([c])}" for c in run.state.changes]
        save_config(run.cfg, run.run_dir / "config.yaml", "\n".join(header))


def report_epoch(run: Run, row: dict, val: dict | None, last: bool) -> None:
    """After the epoch's save: summary.json, the W&B summary (and the confusion matrix), the console line."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    clock = run_clock(run)
    clock.ended(validated=val is not None, last=last)
    if accelerator.is_main_process:
        write_summary(run, finished=last)
    if run.wandb is not None:
        run.wandb.summary.update({"best/val_acc": state.best_val_acc, "best/epoch": state.best_epoch,
                                  "params": run.meta["num_params"], "train_time_s": state.train_time_s})
        if last and val is not None:
            matrix = confusion_matrix(val["targets"], val["preds"], len(CLASSES))
            report = wandb_class_report(matrix, list(CLASSES), f"validation, epoch {row['epoch']}")
            run.wandb.log({"epoch": row["epoch"], **{f"val/{k}": v for k, v in report.items()}})
    position = epoch_position(row["epoch"] - 1, row["step"], run.steps_per_epoch, run.total_steps)
    accelerator.print(_summary(row, position, None if last else clock.left_text(row["step"], row["epoch"])))
    if cfg.compile and row["epoch"] == run.first_epoch + 1:
        accelerator.print(f"torch.compile: the first step took {row['first_step_time']:.1f}s (one-off compile cost)")


def write_summary(run: Run, finished: bool) -> None:
    rows = run.metrics.rows()
    speeds = [float(r["images_per_sec"]) for r in rows if r.get("images_per_sec")]
    state, config = run.state, config_to_dict(run.cfg)
    steps_done = run.steps_done
    epoch_s = run_clock(run).epoch_seconds()
    ckpt.write_summary(run.run_dir, {
        "finished": finished, "epochs_done": steps_done / run.steps_per_epoch, "epochs": run.cfg.epochs,
        "steps_done": steps_done, "steps": run.total_steps, "steps_per_epoch": run.steps_per_epoch,
        "seconds_per_epoch": round(epoch_s, 3) if epoch_s else None,
        "params": run.meta["num_params"], "best_val_acc": state.best_val_acc if state.best_val_acc >= 0 else None,
        "best_epoch": state.best_epoch, "final_val_acc": _number(rows[-1].get("val_acc")) if rows else None,
        "final_val_acc_tta": _number(rows[-1].get("val_acc_tta")) if rows else None,
        "train_time_s": state.train_time_s, "precision": run.precision, "changes": state.changes,
        "budget": run.budget.record() if run.budget is not None else None,
        "images_per_sec": sum(speeds) / len(speeds) if speeds else None, "started_at": state.started_at,
        "group": run_group(config), "name": run_name(config)})


def start_wandb(cfg: TrainConfig, accelerator: Accelerator, mode: str, run_dir: Path, n_params: int):
    """Start (or, on --resume, continue) the run's W&B run through Accelerate; the wandb run on the main
    process, None elsewhere or with --wandb off."""
    if mode == "off":
        return None
    config = config_to_dict(cfg)
    run_id = main_process_value(accelerator, wandb_run_id(run_dir) if accelerator.is_main_process else None)
    tags = [cfg.model, activation_of(config), cfg.opt, *cfg.wandb_tags]
    accelerator.init_trackers(
        cfg.wandb_project, config={**config, "params": n_params, **environment_info()},
        init_kwargs=wandb_init_kwargs(mode, run_dir, run_id, cfg.wandb_name or run_name(config),
                                      cfg.wandb_group or run_group(config), "train", tags))
    if not accelerator.is_main_process:
        return None
    run = accelerator.get_tracker("wandb", unwrap=True)
    define_wandb_metrics(run)
    print_sync_hint(run, accelerator.print)
    return run


def _stopped(stop: StopRequest, run_dir: Path, where: str) -> Stopped:
    name = stop.name or "a signal"
    return Stopped(f"stopped by {name} at {where}; state saved. Continue with: "
                   f"{launch_command(['--resume', str(run_dir)])}", 128 + (stop.signum or 15))


def _number(text: str | None) -> float | None:
    return float(text) if text not in (None, "") else None


def _summary(row: dict, position: str, left: str | None = None) -> str:
    """The epoch's console line: ``position`` (progress.epoch_position), its figures, the run's time left."""
    text = (f"{position} | train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} "
            f"| lr {row['lr']:.4g} | {row['images_per_sec']:.0f} img/s | {row['epoch_time']:.1f}s")
    if "val_acc" in row:
        text += f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} (best {row['best_val_acc']:.4f})"
    if "val_acc_tta" in row:
        text += f", with TTA {row['val_acc_tta']:.4f}"
    return text + (f" | {left}" if left else "")


def run_clock(run: Run) -> RunClock:
    """The run's clock (progress.py), made once and told which epochs validate: the time left counts their cost."""
    if run.clock is None:
        run.clock = RunClock(run.total_steps, run.steps_per_epoch)
        tta = run.cfg.tta if run.val_loader is not None else 0
        run.clock.plan([run.validates(e) for e in range(run.n_epochs)], tta)
    return run.clock
