"""``train(cfg)``: data, model, optimizer, loop, checkpoints and tracking wired through one Accelerator."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

from . import checkpoint as ckpt
from .augment import AugmentConfig, BatchAugment
from .config import ConfigError, TrainConfig, config_to_dict, save_config
from .distributed import create_accelerator, scaled_lr
from .data import CLASSES, MEAN, STD, cifar10_splits
from .engine import evaluate, train_one_epoch
from .loader import DeviceLoader, eval_loader, per_image_transform, worker_loader
from .models import count_parameters, create_model
from .optim import DEFAULT_LR, DEFAULT_WEIGHT_DECAY, create_optimizer, create_scheduler
from .tracking import MetricsLog, resolve_wandb_mode, wandb_init_kwargs


def check_config(cfg: TrainConfig) -> None:
    """Fail early, naming the flag, on values that would otherwise fail deep inside the loop."""
    def need(ok: bool, flag: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"--{flag.replace('_', '-')}: {what}, got {getattr(cfg, flag)!r}")

    need(cfg.epochs >= 1, "epochs", "must be at least 1")
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
    for name in ("auto_augment", "random_erasing"):
        need(cfg.loader == "workers" or not getattr(cfg, name), name, "is per-image: add --loader workers")


def augment_config(cfg: TrainConfig) -> AugmentConfig:
    return AugmentConfig(
        crop_scale=cfg.crop_scale or 1.0, crop_ratio=cfg.crop_ratio, translate=cfg.translate,
        hflip=cfg.hflip, vflip=cfg.vflip, rotation=cfg.rotation, color_jitter=cfg.color_jitter,
        hue=cfg.hue, jitter_p=cfg.jitter_p, blur_sigma=cfg.blur_sigma, blur_p=cfg.blur_p,
        cutout=cfg.cutout, cutout_p=cfg.cutout_p,
    )


def model_kwargs(cfg: TrainConfig) -> dict:
    kw = dict(cfg.model_kwargs)
    if cfg.activation:
        kw["activation"] = cfg.activation
    return kw


def make_run_dir(cfg: TrainConfig, accelerator: Accelerator) -> Path:
    """The run folder; the generated name is made on the main process and shared, so ranks agree."""
    if cfg.resume:
        return Path(cfg.resume)
    name = [cfg.run_dir or ""]
    if not cfg.run_dir and accelerator.is_main_process:
        act = cfg.activation or cfg.model_kwargs.get("activation", "default")
        name[0] = f"runs/{cfg.model}-{act}-{cfg.opt}-{time.strftime('%Y%m%d-%H%M%S')}"
    if accelerator.num_processes > 1:
        broadcast_object_list(name)
    return Path(name[0])


def make_train_loader(cfg: TrainConfig, accelerator: Accelerator, train_set):
    """DeviceLoader (batched augmentation on the device) or the per-image DataLoader path."""
    if cfg.loader == "device":
        return DeviceLoader(train_set.images, train_set.labels, cfg.batch_size, accelerator.device,
                            BatchAugment(augment_config(cfg), MEAN, STD), seed=cfg.seed,
                            rank=accelerator.process_index, world_size=accelerator.num_processes,
                            channels_last=cfg.channels_last)
    transform = per_image_transform(augment_config(cfg), MEAN, STD, cfg.auto_augment, cfg.random_erasing)
    return worker_loader(accelerator, train_set.images, train_set.labels, cfg.batch_size, transform, cfg.workers,
                         cfg.seed, cfg.channels_last)


def train(cfg: TrainConfig) -> dict:
    """Train per ``cfg``; returns the final epoch's metrics, ``best_val_acc``, ``run_dir`` and the trained ``model``."""
    started = time.perf_counter()
    check_config(cfg)
    wandb_mode = resolve_wandb_mode(cfg.wandb)
    accelerator = create_accelerator(log_with="wandb" if wandb_mode != "off" else None)
    if cfg.sync_bn and accelerator.device.type == "cpu":
        raise ConfigError("--sync-bn: PyTorch's SyncBatchNorm runs on GPUs only; drop it for CPU runs")
    set_seed(cfg.seed)  # same init on every rank; DDP also broadcasts rank 0's weights
    run_dir = make_run_dir(cfg, accelerator)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    train_set, val_set = cifar10_splits(cfg.data_dir, cfg.val_split, cfg.seed, cfg.download, cfg.train_subset)
    kwargs = model_kwargs(cfg)
    model = create_model(cfg.model, **kwargs)
    n_params = count_parameters(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)

    base_lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.opt]
    lr = scaled_lr(base_lr, cfg.lr_scale, accelerator.num_processes)
    weight_decay = cfg.weight_decay if cfg.weight_decay is not None else DEFAULT_WEIGHT_DECAY[cfg.opt]
    model = model.to(accelerator.device)  # before the EMA copy, so both live on the device
    optimizer = create_optimizer(model, cfg.opt, lr, weight_decay, cfg.momentum, cfg.lookahead)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if cfg.sync_bn and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)

    train_loader = make_train_loader(cfg, accelerator, train_set)
    val_loader = accelerator.prepare(eval_loader(val_set.images, val_set.labels, 500)) if len(val_set.labels) else None
    steps_per_epoch = len(train_loader)
    scheduler = create_scheduler(optimizer, cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch),
                                 cfg.warmup_lr_ratio, cfg.min_lr_ratio)
    mixup = None
    if cfg.mixup or cfg.cutmix:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob,
                      label_smoothing=cfg.label_smoothing, num_classes=len(CLASSES))
    loss_fn = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    meta = {"model": cfg.model, "model_kwargs": kwargs, "classes": list(CLASSES), "mean": list(MEAN),
            "std": list(STD), "num_params": n_params, "val_split": cfg.val_split, "seed": cfg.seed}
    metrics = MetricsLog(run_dir, enabled=accelerator.is_main_process)
    start_epoch, global_step, best_acc = 0, 0, -1.0
    if cfg.resume:
        trainer = ckpt.load_state(accelerator, run_dir)
        start_epoch, global_step, best_acc = trainer["epoch"], trainer["global_step"], trainer["best_val_acc"]
        scheduler.step_update(global_step)  # timm schedulers do not save their position
        metrics.truncate_after(start_epoch)
        if start_epoch >= cfg.epochs:
            accelerator.print(f"{run_dir} already finished {start_epoch} epochs; pass --epochs N to train longer")

    if wandb_mode != "off":
        accelerator.init_trackers(cfg.wandb_project, config=config_to_dict(cfg),
                                  init_kwargs=wandb_init_kwargs(wandb_mode, run_dir, cfg.wandb_name or run_dir.name,
                                                                cfg.wandb_tags))
        if wandb_mode == "offline":
            accelerator.print(f"W&B offline; upload later with: wandb sync {run_dir}/wandb/offline-run-*")
    n_proc = accelerator.num_processes
    accelerator.print(
        f"global batch {cfg.batch_size * n_proc} ({n_proc} process{'es' if n_proc > 1 else ''} x {cfg.batch_size}), "
        f"lr {lr:g}{f' ({cfg.lr_scale}-scaled from {base_lr:g})' if lr != base_lr else ''} | {cfg.model} "
        f"({n_params:,} parameters) on {accelerator.device.type}, precision {accelerator.mixed_precision} | "
        f"{len(train_set.labels):,} train / {len(val_set.labels):,} val images, {steps_per_epoch} steps/epoch | "
        f"run {run_dir}"
    )

    row: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.set_epoch(epoch)
        stats = train_one_epoch(model, train_loader, optimizer, scheduler, accelerator, loss_fn, global_step,
                                epoch + 1, mixup=mixup, ema=ema, clip_grad=cfg.clip_grad, progress=cfg.progress)
        global_step = stats.pop("global_step")
        row = {"epoch": epoch + 1, "step": global_step, **stats}
        eval_model = ema.module if ema is not None else model
        last = epoch + 1 == cfg.epochs
        if val_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or last):
            # TTA multiplies eval cost, so only the final validation pays for it.
            val = evaluate(eval_model, val_loader, accelerator, MEAN, STD, tta=cfg.tta if last else 0,
                           channels_last=cfg.channels_last)
            row.update(val_loss=val["loss"], val_acc=val["acc"])
        improved = "val_acc" in row and row["val_acc"] > best_acc
        best_acc = max(best_acc, row.get("val_acc", -1.0))
        row["best_val_acc"] = best_acc if best_acc >= 0 else None
        row["elapsed"] = time.perf_counter() - started  # seconds since start-up, evaluations included
        accelerator.log({k: v for k, v in row.items() if v is not None}, step=global_step)
        if accelerator.is_main_process:
            metrics.append(row)
            weights = accelerator.unwrap_model(eval_model, keep_torch_compile=False)
            epoch_meta = {**meta, "epoch": epoch + 1, "val_acc": row.get("val_acc")}
            ckpt.save_weights(run_dir / "last.safetensors", weights, epoch_meta)
            if improved or val_loader is None:
                ckpt.save_weights(run_dir / "best.safetensors", weights, epoch_meta)
        ckpt.save_state(accelerator, run_dir, {"epoch": epoch + 1, "global_step": global_step, "best_val_acc": best_acc})
        accelerator.print(_summary(row, cfg.epochs))
        if cfg.compile and epoch == start_epoch:
            accelerator.print(f"torch.compile: the first step took {row['first_step_time']:.1f}s (one-off compile cost)")
    accelerator.end_training()
    return {**row, "best_val_acc": best_acc, "run_dir": str(run_dir),
            "model": accelerator.unwrap_model(model, keep_torch_compile=False)}


def _summary(row: dict, epochs: int) -> str:
    text = (f"epoch {row['epoch']}/{epochs} | train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} "
            f"| lr {row['lr']:.4g} | {row['images_per_sec']:.0f} img/s | {row['epoch_time']:.1f}s")
    if "val_acc" in row:
        text += f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} (best {row['best_val_acc']:.4f})"
    return text
