"""``train(cfg)``: data, model, optimizer, loop, checkpoints and tracking wired through one Accelerator."""
from __future__ import annotations

import difflib
import math
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch import nn

from . import checkpoint as ckpt
from .augment import AugmentConfig, BatchAugment, normalize
from .config import ConfigError, TrainConfig, config_to_dict, save_config
from .distributed import create_accelerator, precision_of, scaled_lr
from .data import CLASSES, MEAN, STD, cifar10_splits
from .engine import confusion_matrix, evaluate, train_one_epoch
from .interrupt import StopRequest, Stopped
from .loader import DeviceLoader, eval_loader, per_image_transform, to_chw_tensor, worker_loader
from .models import count_parameters, create_model, has_whitening, list_models, parse_head_scale
from .optim import DEFAULT_LR, DEFAULT_WEIGHT_DECAY, LookaheadEMA, create_optimizer, create_scheduler, per_1024_images
from .identity import activation_of, run_group, run_name
from .tracking import (MetricsLog, define_wandb_metrics, environment_info, print_sync_hint, resolve_wandb_mode,
                       wandb_class_report, wandb_image_grid, wandb_init_kwargs, wandb_row, wandb_run_id)


def check_config(cfg: TrainConfig) -> None:
    """Fail early, naming the flag, on values that would otherwise fail deep inside the loop."""
    def need(ok: bool, flag: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"--{flag.replace('_', '-')}: {what}, got {getattr(cfg, flag)!r}")

    need(cfg.epochs > 0, "epochs", "must be positive")
    need(cfg.batch_size >= 1, "batch_size", "must be at least 1")
    need(cfg.eval_every >= 1, "eval_every", "must be at least 1")
    need(cfg.lr is None or cfg.lr > 0, "lr", "must be positive")
    need(0 <= cfg.crop_scale < 1, "crop_scale", "must be in [0, 1) (0 = off)")
    need(0 < cfg.crop_ratio <= 1, "crop_ratio", "must be in (0, 1]")
    need(0 <= cfg.hue <= 0.5, "hue", "must be in [0, 0.5]")
    need(0 <= cfg.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
    need(0 <= cfg.ema_decay < 1, "ema_decay", "must be in [0, 1)")
    for name in ("hflip", "vflip", "jitter_p", "blur_p", "cutout_p", "mix_prob"):
        need(0 <= getattr(cfg, name) <= 1, name, "is a probability in [0, 1]")
    for name in ("translate", "rotation", "color_jitter", "blur_sigma", "cutout", "mixup", "cutmix",
                 "warmup_epochs", "clip_grad", "val_split", "train_subset"):
        need(getattr(cfg, name) >= 0, name, "must not be negative")
    need(not (cfg.mixup or cfg.cutmix) or cfg.batch_size % 2 == 0, "batch_size", "must be even with Mixup/CutMix")
    need(0 <= cfg.random_erasing <= 1, "random_erasing", "is a probability in [0, 1]")
    need(cfg.workers >= 0, "workers", "must not be negative")
    need(cfg.momentum >= 0, "momentum", "must not be negative")
    need(cfg.weight_decay is None or cfg.weight_decay >= 0, "weight_decay", "must not be negative")
    need(0 <= cfg.warmup_lr_ratio <= 1, "warmup_lr_ratio", "must be in [0, 1]")
    need(0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
    need(not (cfg.resume and cfg.overwrite), "overwrite", "cannot be combined with --resume")
    need(not (cfg.resume and cfg.run_dir and Path(cfg.run_dir) != Path(cfg.resume)), "run_dir",
         f"differs from --resume {cfg.resume}; a resumed run stays in its own folder")
    for name in ("auto_augment", "random_erasing"):
        need(cfg.loader == "workers" or not getattr(cfg, name), name, "is per-image: add --loader workers")
    check_techniques(cfg, need)


def check_techniques(cfg: TrainConfig, need) -> None:
    """The airbench / Muon options (issue 9)."""
    need(cfg.bn_momentum is None or 0 <= cfg.bn_momentum <= 1, "bn_momentum", "must be in [0, 1]")
    need(cfg.bn_eps is None or cfg.bn_eps > 0, "bn_eps", "must be positive")
    try:
        ok = cfg.head_scale is None or parse_head_scale(cfg.head_scale) > 0
    except ValueError:
        ok = False
    need(ok, "head_scale", "expected a positive number, a fraction like 1/9, or 1/width")
    need(cfg.norm_bias_lr_scale >= 0, "norm_bias_lr_scale", "must not be negative")
    need(cfg.lr_unit == "batch" or cfg.lr is not None, "lr_unit",
         "image1024 needs an explicit --lr (the defaults are per batch)")
    need(cfg.lr_unit == "batch" or cfg.lr_scale == "none", "lr_scale",
         "must be none with --lr-unit image1024, which already scales with the global batch")
    need(cfg.muon_lr > 0, "muon_lr", "must be positive")
    need(0 <= cfg.muon_momentum < 1, "muon_momentum", "must be in [0, 1)")
    need(cfg.whiten_bias_epochs >= 0, "whiten_bias_epochs", "must not be negative")
    need(cfg.lookahead_ema >= 0, "lookahead_ema", "is a step count (0 = off)")
    need(0 < cfg.lookahead_ema_decay <= 1, "lookahead_ema_decay", "must be in (0, 1]")
    need(cfg.lookahead_ema_power >= 0, "lookahead_ema_power", "must not be negative")
    need(cfg.lookahead_ema_start >= 0, "lookahead_ema_start", "must not be negative")


def augment_config(cfg: TrainConfig) -> AugmentConfig:
    return AugmentConfig(
        crop_scale=cfg.crop_scale or 1.0, crop_ratio=cfg.crop_ratio, translate=cfg.translate,
        hflip=cfg.hflip if cfg.flip == "random" else 0.0,  # --flip alternate: the loader flips
        vflip=cfg.vflip, rotation=cfg.rotation, color_jitter=cfg.color_jitter,
        hue=cfg.hue, jitter_p=cfg.jitter_p, blur_sigma=cfg.blur_sigma, blur_p=cfg.blur_p,
        cutout=cfg.cutout, cutout_p=cfg.cutout_p,
    )


# TrainConfig fields that are model-builder arguments when set (so they are saved with the weights).
MODEL_FLAGS = ("stem", "bn_momentum", "bn_eps", "bn_frozen_weight", "dirac", "head_scale")


def model_kwargs(cfg: TrainConfig) -> dict:
    kw = dict(cfg.model_kwargs)
    if cfg.activation:
        kw["activation"] = cfg.activation
    kw.update({name: getattr(cfg, name) for name in MODEL_FLAGS if getattr(cfg, name) is not None})
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


def prepare_run_dir(cfg: TrainConfig, accelerator: Accelerator) -> Path:
    """The run folder, created (or emptied with --overwrite) on the main process and shared with every rank.

    A new run never lands in a folder that holds another: it would append to its metrics.csv and could
    replace a better best.safetensors. Generated names get a suffix until unique, even within one second.
    """
    if cfg.resume:
        ckpt.state_dir_for_resume(cfg.resume)  # fails early, naming the folder, when there is nothing to resume
        return Path(cfg.resume)
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"--run-dir {run_dir}: is a file, not a folder")
        held = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
        if held and not cfg.overwrite:
            raise ConfigError(f"--run-dir {run_dir}: already holds a run ({', '.join(held[:4])}); pass "
                              f"--resume {run_dir} to continue it, --overwrite to start it afresh, or another --run-dir")
    name = [cfg.run_dir or ""]
    if accelerator.is_main_process:
        if cfg.run_dir:
            if cfg.overwrite and run_dir.is_dir():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
        else:
            name[0] = str(_unique_run_dir(cfg))
    if accelerator.num_processes > 1:
        broadcast_object_list(name)
    return Path(name[0])


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


def make_train_loader(cfg: TrainConfig, accelerator: Accelerator, train_set):
    """DeviceLoader (batched augmentation on the device) or the per-image DataLoader path."""
    if cfg.loader == "device":
        return DeviceLoader(train_set.images, train_set.labels, cfg.batch_size, accelerator.device,
                            BatchAugment(augment_config(cfg), MEAN, STD), seed=cfg.seed,
                            rank=accelerator.process_index, world_size=accelerator.num_processes,
                            channels_last=cfg.channels_last, alternate_flip=cfg.flip == "alternate")
    transform = per_image_transform(augment_config(cfg), MEAN, STD, cfg.auto_augment, cfg.random_erasing)
    return worker_loader(accelerator, train_set.images, train_set.labels, cfg.batch_size, transform, cfg.workers,
                         cfg.seed, cfg.channels_last, cfg.flip == "alternate")


# airbench fits its whitening stem on the first 5,000 training images: plenty for a 12 x 12 covariance.
WHITEN_IMAGES = 5000


def fit_whitening(model: nn.Module, images, device: torch.device) -> None:
    """Fit the model's whitening stem (if any) on the first training images (uint8 NHWC), unaugmented.

    Every rank loads the same split and fits the same way; the fit happens before ``accelerator.prepare``,
    whose DDP wrapper then broadcasts rank 0's weights, so the ranks agree even to the last bit.
    """
    if has_whitening(model):
        model.init_whitening(normalize(to_chw_tensor(images[:WHITEN_IMAGES]).to(device).float() / 255, MEAN, STD))


def sync_buffers(accelerator: Accelerator, *modules: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics) of ``modules``, as DDP does at each forward.

    Parameters agree on every rank already (the same averaged gradients, the same updates), but each
    rank's BatchNorm statistics follow its own batches since its last forward through DDP. An EMA
    model never goes through DDP: without this the ranks would validate different EMA models, and rank
    0 would save one that the others never evaluated.
    """
    if accelerator.num_processes > 1:
        for module in modules:
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer, src=0)


def agreed(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when it is true on any (signals reach ranks at slightly different moments)."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item() > 0


def resume_position(trainer: dict, steps_per_epoch: int, global_batch: int) -> tuple[int, int]:
    """(epoch, step in that epoch) to continue from, at the current global batch size.

    The schedule is a function of training progress (epochs and the fraction of one done), so a run
    resumed with another process count gets the lr the uninterrupted run would have had there. Part of
    an epoch done at another global batch maps to the last whole batch at the new size (at most one
    global batch of images is seen twice).
    """
    epoch, step = trainer["epoch"], trainer.get("step_in_epoch", 0)
    if step and trainer.get("global_batch", global_batch) != global_batch:
        step = step * trainer["global_batch"] // global_batch
    return epoch, min(step, steps_per_epoch)


def train(cfg: TrainConfig) -> dict:
    """Train per ``cfg``; returns the final epoch's metrics, ``best_val_acc``, ``run_dir``, the trained ``model``
    and its ``ema`` (the averaged model, or None).

    Raises ``Stopped`` after saving a resumable state when SIGTERM/SIGINT arrives, and without saving
    anything when the loss stops being finite.
    """
    started = time.perf_counter()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    check_config(cfg)
    wandb_mode = resolve_wandb_mode(cfg.wandb)
    accelerator = create_accelerator(log_with="wandb" if wandb_mode != "off" else None)
    if cfg.sync_bn and accelerator.device.type == "cpu":
        raise ConfigError("--sync-bn: PyTorch's SyncBatchNorm runs on GPUs only; drop it for CPU runs")
    set_seed(cfg.seed)  # same init on every rank; DDP also broadcasts rank 0's weights

    # Everything that can fail on the user's input (data, model, batch size) fails before any file is written.
    model = build_model(cfg)
    train_set, val_set = cifar10_splits(cfg.data_dir, cfg.val_split, cfg.seed, cfg.download, cfg.train_subset)
    n_params = count_parameters(model)
    train_loader = make_train_loader(cfg, accelerator, train_set)  # too few images for a batch: ConfigError
    run_dir = prepare_run_dir(cfg, accelerator)

    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    base_lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.opt]
    global_batch = cfg.batch_size * accelerator.num_processes
    lr = scaled_lr(base_lr, cfg.lr_scale, accelerator.num_processes)
    if cfg.lr_unit == "image1024":
        lr = per_1024_images(base_lr, global_batch)
    weight_decay = cfg.weight_decay if cfg.weight_decay is not None else DEFAULT_WEIGHT_DECAY[cfg.opt]
    model = model.to(accelerator.device)  # before the EMA copy, so both live on the device
    fit_whitening(model, train_set.images, accelerator.device)  # before the optimizer, EMA and DDP copy the weights
    steps_per_epoch = len(train_loader)
    optimizer = create_optimizer(model, cfg.opt, lr, weight_decay, cfg.momentum, cfg.lookahead,
                                 norm_bias_lr_scale=cfg.norm_bias_lr_scale,
                                 whiten_bias_steps=round(cfg.whiten_bias_epochs * steps_per_epoch),
                                 muon_lr=cfg.muon_lr, muon_momentum=cfg.muon_momentum)
    # timm's warm-up (decay min(d, 1 - (1 + step)^-2/3)): without it a long-run decay such as 0.9998 leaves
    # the average of a short run close to the random initial weights.
    ema = None
    if cfg.ema_decay:
        from .ema import ModelEma  # imports timm (~4 s): only for runs with an EMA

        ema = ModelEma(model, decay=cfg.ema_decay, use_warmup=True)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if cfg.sync_bn and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)

    val_loader = accelerator.prepare(eval_loader(val_set.images, val_set.labels, 500)) if len(val_set.labels) else None
    # A fractional --epochs cuts the last epoch: ceil(total / steps_per_epoch) epochs, the last one shorter.
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = create_scheduler(optimizer, total_steps, round(cfg.warmup_epochs * steps_per_epoch),
                                 cfg.warmup_lr_ratio, cfg.min_lr_ratio, cfg.schedule)
    lookahead = None
    if cfg.lookahead_ema:
        lookahead = LookaheadEMA(accelerator.unwrap_model(model, keep_torch_compile=False), cfg.lookahead_ema,
                                 cfg.lookahead_ema_decay, cfg.lookahead_ema_power,
                                 round(cfg.lookahead_ema_start * steps_per_epoch), total_steps)
        accelerator.register_for_checkpointing(lookahead)
    mixup, loss_fn = None, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    if cfg.mixup or cfg.cutmix:
        from timm.data import Mixup  # timm takes ~4 s to import: only when asked for
        from timm.loss import SoftTargetCrossEntropy

        loss_fn = SoftTargetCrossEntropy()
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob,
                      label_smoothing=cfg.label_smoothing, num_classes=len(CLASSES))

    meta = {"model": cfg.model, "model_kwargs": model_kwargs(cfg), "classes": list(CLASSES), "mean": list(MEAN),
            "std": list(STD), "num_params": n_params, "val_split": cfg.val_split, "seed": cfg.seed, "tta": cfg.tta}
    metrics = MetricsLog(run_dir, enabled=accelerator.is_main_process)
    trainer = {"epoch": 0, "step_in_epoch": 0, "best_val_acc": -1.0, "best_epoch": None, "train_time_s": 0.0,
               "started_at": started_at}
    if cfg.resume:
        trainer.update(ckpt.load_state(accelerator, run_dir))
    start_epoch, skip = resume_position(trainer, steps_per_epoch, global_batch)
    if start_epoch * steps_per_epoch + skip >= total_steps:
        done = trainer["epoch"] + trainer.get("step_in_epoch", 0) / steps_per_epoch
        accelerator.print(f"{run_dir} already trained {done:g} epochs; pass --epochs N to train longer")
        accelerator.end_training()
        return {"best_val_acc": trainer["best_val_acc"], "run_dir": str(run_dir),
                "model": accelerator.unwrap_model(model, keep_torch_compile=False)}
    if cfg.resume:
        metrics.truncate_after(trainer["epoch"])  # the rows of epochs to be run (again), a cut last one included
    precision = precision_of(accelerator)
    if accelerator.is_main_process:
        # After a resume has loaded its state: one that cannot (another --model-kwargs) leaves config.yaml as it was.
        save_config(cfg, run_dir / "config.yaml", f"precision used: {precision} (from the accelerate config; "
                                                 "not a train.py flag)")
    carry = trainer.get("partial") if skip else None

    wandb_run = start_wandb(cfg, accelerator, wandb_mode, run_dir, n_params)
    if wandb_run is not None and not cfg.resume:
        train_loader.set_epoch(0)
        wandb_run.log({"train/augmented_batch": wandb_image_grid(
            next(iter(train_loader))[0], MEAN, STD, "augmented training batch, epoch 1 (as the model sees it)")})
    n_proc = accelerator.num_processes
    accelerator.print(
        f"global batch {global_batch} ({n_proc} process{'es' if n_proc > 1 else ''} x {cfg.batch_size}), "
        f"lr {lr:g}{f' ({cfg.lr_scale}-scaled from {base_lr:g})' if cfg.lr_scale != 'none' and lr != base_lr else ''}"
        f"{f' ({base_lr:g} per 1024 images)' if cfg.lr_unit == 'image1024' else ''} | {cfg.model} "
        f"({n_params:,} parameters) on {accelerator.device.type}, precision {precision} | "
        f"{len(train_set.labels):,} train / {len(val_set.labels):,} val images, {steps_per_epoch} steps/epoch | "
        f"run {run_dir}"
        + (f" | resumed at epoch {start_epoch + 1}, step {skip}" if cfg.resume else "")
    )

    def save_trainer(**update) -> None:
        trainer.update(update, global_batch=global_batch)
        ckpt.save_state(accelerator, run_dir, trainer)

    identity = {"group": run_group(config_to_dict(cfg)), "name": run_name(config_to_dict(cfg))}

    def write_summary(finished: bool) -> None:
        if accelerator.is_main_process:
            rows = metrics.rows()
            speeds = [float(r["images_per_sec"]) for r in rows if r.get("images_per_sec")]
            best = trainer["best_val_acc"]
            ckpt.write_summary(run_dir, {
                "finished": finished,
                "epochs_done": trainer["epoch"] + trainer["step_in_epoch"] / steps_per_epoch, "epochs": cfg.epochs, "params": n_params,
                "best_val_acc": best if best >= 0 else None, "best_epoch": trainer["best_epoch"],
                "train_time_s": trainer["train_time_s"], "precision": precision,
                "images_per_sec": sum(speeds) / len(speeds) if speeds else None,
                "started_at": trainer["started_at"], **identity})

    row: dict = {}
    with StopRequest() as stop:
        try:
            for epoch in range(start_epoch, n_epochs):
                train_loader.set_epoch(epoch, skip)
                carried_time = (carry or {}).get("elapsed", 0.0)  # already counted in train_time_s
                partial = carry if accelerator.is_main_process else {"elapsed": carried_time}
                steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)  # < a full epoch: cut
                stats = train_one_epoch(model, train_loader, optimizer, scheduler, accelerator, loss_fn,
                                        epoch * steps_per_epoch + skip, epoch + 1, mixup=mixup, ema=ema,
                                        clip_grad=cfg.clip_grad, progress=cfg.progress, start_step=skip,
                                        carry=partial, stop=lambda: stop.signum is not None,
                                        steps=steps, lookahead=lookahead)
                skip, carry = 0, None
                train_time = trainer["train_time_s"] + stats["epoch_time"] - carried_time
                if stats["nonfinite"]:
                    raise Stopped(
                        f"error: the training loss became non-finite (nan/inf) at epoch {epoch + 1}, step "
                        f"{stats['step_in_epoch']}/{steps_per_epoch}; nothing was saved after epoch {trainer['epoch']} "
                        f"(the last good state and weights are kept in {run_dir}). Try a lower --lr or --clip-grad 1.0", 3)
                if stats["stopped"]:
                    metrics.plot()
                    save_trainer(epoch=epoch, step_in_epoch=stats["step_in_epoch"], partial=stats["train_sums"],
                                 train_time_s=train_time)
                    raise _stopped(stop, run_dir, f"epoch {epoch + 1}, step {stats['step_in_epoch']}/{steps_per_epoch}")
                global_step = stats["global_step"]
                row = {"epoch": epoch + 1, "step": global_step,
                       **{k: v for k, v in stats.items() if k not in ("global_step", "step_in_epoch", "stopped",
                                                                      "nonfinite", "train_sums")}}
                sync_buffers(accelerator, accelerator.unwrap_model(model), *([ema.module] if ema is not None else []))
                eval_model = ema.module if ema is not None else model
                last = epoch + 1 == n_epochs
                if val_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or last):
                    # TTA multiplies eval cost, so only the final validation pays for it.
                    val = evaluate(eval_model, val_loader, accelerator, MEAN, STD, tta=cfg.tta if last else 0,
                                   channels_last=cfg.channels_last)
                    row.update(val_loss=val["loss"], val_acc=val["acc"])
                improved = "val_acc" in row and row["val_acc"] > trainer["best_val_acc"]
                if improved:
                    trainer.update(best_val_acc=row["val_acc"], best_epoch=epoch + 1)
                best_acc = trainer["best_val_acc"]
                row["best_val_acc"] = best_acc if best_acc >= 0 else None
                row["elapsed"] = time.perf_counter() - started  # seconds since start-up, evaluations included
                accelerator.log(wandb_row(row))
                if accelerator.is_main_process:
                    metrics.append(row, last=last)
                    weights = accelerator.unwrap_model(eval_model, keep_torch_compile=False)
                    epoch_meta = {**meta, "epoch": epoch + 1, "val_acc": row.get("val_acc")}
                    ckpt.save_weights(run_dir / "last.safetensors", weights, epoch_meta)
                    if improved or val_loader is None:
                        ckpt.save_weights(run_dir / "best.safetensors", weights, epoch_meta)
                if steps < steps_per_epoch:
                    # A cut last epoch is saved as a position inside it, with its sums: a longer --epochs on
                    # resume continues it (and replaces its row) instead of skipping its rest.
                    save_trainer(epoch=epoch, step_in_epoch=steps, partial=stats["train_sums"], train_time_s=train_time)
                else:
                    save_trainer(epoch=epoch + 1, step_in_epoch=0, partial=None, train_time_s=train_time)
                write_summary(finished=last)
                if wandb_run is not None:
                    wandb_run.summary.update({"best/val_acc": trainer["best_val_acc"], "best/epoch": trainer["best_epoch"],
                                              "params": n_params, "train_time_s": trainer["train_time_s"]})
                    if last and "val_acc" in row:
                        matrix = confusion_matrix(val["targets"], val["preds"], len(CLASSES))
                        report = wandb_class_report(matrix, list(CLASSES), f"validation, epoch {epoch + 1}")
                        wandb_run.log({"epoch": epoch + 1, **{f"val/{k}": v for k, v in report.items()}})
                accelerator.print(_summary(row, cfg.epochs))
                if cfg.compile and epoch == start_epoch:
                    accelerator.print(f"torch.compile: the first step took {row['first_step_time']:.1f}s "
                                      "(one-off compile cost)")
                if not last and agreed(accelerator, stop.signum is not None):
                    metrics.plot()
                    raise _stopped(stop, run_dir, f"the end of epoch {epoch + 1}")
        finally:
            accelerator.end_training()
    return {**row, "best_val_acc": trainer["best_val_acc"], "run_dir": str(run_dir),
            "model": accelerator.unwrap_model(model, keep_torch_compile=False),
            "ema": ema.module if ema is not None else None}


def start_wandb(cfg: TrainConfig, accelerator: Accelerator, mode: str, run_dir: Path, n_params: int):
    """Start (or, on --resume, continue) the run's W&B run through Accelerate; the wandb run on the main
    process, None elsewhere or with --wandb off."""
    if mode == "off":
        return None
    config = config_to_dict(cfg)
    run_id = [wandb_run_id(run_dir) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(run_id)
    tags = [cfg.model, activation_of(config), cfg.opt, *cfg.wandb_tags]
    accelerator.init_trackers(
        cfg.wandb_project, config={**config, "params": n_params, **environment_info()},
        init_kwargs=wandb_init_kwargs(mode, run_dir, run_id[0], cfg.wandb_name or run_name(config),
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
                   f"accelerate launch train.py --resume {run_dir}", 128 + (stop.signum or 15))


def _summary(row: dict, epochs: float) -> str:
    text = (f"epoch {row['epoch']}/{epochs:g} | train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} "
            f"| lr {row['lr']:.4g} | {row['images_per_sec']:.0f} img/s | {row['epoch_time']:.1f}s")
    if "val_acc" in row:
        text += f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} (best {row['best_val_acc']:.4f})"
    return text
