"""Score a checkpoint (evaluate.py), write a predictions file (predict.py), and load a run's net in Python
(``load_model``, ``predict_images``: re-exported by ``resnet``)."""
from __future__ import annotations

import csv
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from .atomic import atomic_path, atomic_write_text
from .checkpoint import load_checkpoint
from .config import ConfigError, EvalConfig, PredictConfig, TrainConfig
from .data import DataError, cifar10_splits, load_cifar10, load_custom_pickle, to_nhwc
from .distributed import create_accelerator
from .engine import _inputs, confusion_matrix, evaluate, predict, tta_logits
from .loader import eval_loader, to_chw_tensor
from .tracking import (confusion_figure, per_class_accuracy, print_sync_hint, resolve_wandb_mode, wandb_class_report,
                       wandb_run_id)

# Where a run that never named --data-dir read CIFAR-10 from.
TRAIN_DATA_DIR: str = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "data_dir")


def _prepare(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray | None, batch_size: int):
    """Accelerator, model on its device in channels_last, and a sharded in-order loader."""
    accelerator = create_accelerator()
    model = accelerator.prepare_model(model.to(memory_format=torch.channels_last), evaluation_mode=True)
    return accelerator, model, accelerator.prepare(eval_loader(images, labels, batch_size))


def run_config(run_dir: Path) -> dict:
    """The run folder's config.yaml as a dict ({} when there is none); data only, never code (safe_load)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read this run's config ({type(e).__name__}: {e})") from None
    if config is not None and not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value, found {type(config).__name__}")
    return config or {}


def eval_data_dir(cfg: EvalConfig, run_dir: Path) -> tuple[str, str]:
    """(CIFAR-10 folder, where that came from): --data-dir, else the run's own, else train.py's default."""
    if cfg.data_dir is not None:
        return cfg.data_dir, "--data-dir"
    saved = run_config(run_dir).get("data_dir")
    if saved is None:
        return TRAIN_DATA_DIR, "the default"
    if not isinstance(saved, str) or not saved:
        raise ConfigError(f"{run_dir / 'config.yaml'}: data_dir must be a folder name, got {saved!r}; "
                          "pass --data-dir")
    return saved, f"the run's own --data-dir, from {run_dir / 'config.yaml'}"


def _labeled_data(cfg: EvalConfig, meta: dict, run_dir: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(images, labels, name) for --data, --split test or --split val."""
    if cfg.data:
        custom = load_custom_pickle(cfg.data, need_ids=False, need_labels=True)
        return custom.images, custom.labels, Path(cfg.data).stem
    val_split = cfg.val_split if cfg.val_split is not None else meta.get("val_split", 0)
    if cfg.split == "val" and not val_split:
        raise DataError("this run was trained without a validation split; pass --val-split N or use --split test")
    root, source = eval_data_dir(cfg, run_dir)
    try:
        if cfg.split == "test":
            test = load_cifar10(root, train=False, download=cfg.download)
            return test.images, test.labels, "test"
        # The run's own split seed reproduces the exact images it held out.
        _, val = cifar10_splits(root, val_split, meta.get("split_seed", meta.get("seed", 0)), cfg.download)
        return val.images, val.labels, "val"
    except DataError as e:
        if source == "--data-dir":
            raise
        raise DataError(f"{e}; that folder is {source} (--data-dir to use another)") from None


def check_output_folder(out: Path, flag: str = "--out") -> None:
    """Fail before any work when the output's folder is missing, is not a folder or takes no new files."""
    folder = out.parent
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {out}: {folder} is a file, not a folder")
    if not folder.is_dir():
        raise ConfigError(f"{flag} {out}: the folder {folder} does not exist; create it first")
    if out.is_dir():
        raise ConfigError(f"{flag} {out}: is a folder; give a file name")
    # Try it: permission bits say nothing for root, on read-only mounts or in /proc, and the
    # real write (a temporary sibling, renamed) comes only after all the work.
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {out}: cannot write in {folder} ({e.strerror or e})") from None


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be at least 1, got {batch_size}")


def tta_level(requested: int | None, meta: dict, accelerator) -> int:
    """--tta as given, else the level the run validated with (older checkpoints: 0); printed either way."""
    level = requested if requested is not None else int(meta.get("tta", 0))
    source = "as asked" if requested is not None else "the run's own validation setting"
    accelerator.print(f"test-time augmentation level {level} ({source})")
    return level


def run_evaluate(cfg: EvalConfig) -> dict:
    """Accuracy, loss, per-class accuracy and confusion matrix; printed, and saved as JSON + PNG."""
    check_batch_size(cfg.batch_size)
    if cfg.out:
        check_output_folder(Path(cfg.out))
    model, meta, file = load_checkpoint(cfg.checkpoint)
    images, labels, name = _labeled_data(cfg, meta, file.parent)
    accelerator, model, loader = _prepare(model, images, labels, cfg.batch_size)
    tta = tta_level(cfg.tta, meta, accelerator)
    result = evaluate(model, loader, accelerator, meta["mean"], meta["std"], tta=tta, channels_last=True,
                      progress=True)
    classes = meta["classes"]
    matrix = confusion_matrix(result["targets"], result["preds"], len(classes))
    per_class = dict(zip(classes, per_class_accuracy(matrix)))
    report = {"checkpoint": str(file), "data": name, "n": result["n"], "tta": tta,
              "accuracy": result["acc"], "loss": result["loss"], "per_class_accuracy": per_class,
              "confusion_matrix": matrix.tolist()}
    if accelerator.is_main_process:
        out = Path(cfg.out) if cfg.out else file.parent / f"eval_{name}{f'_tta{tta}' if tta else ''}.json"
        atomic_write_text(out, json.dumps(report, indent=2))
        plot_confusion(matrix, classes, out.with_suffix(".png"))
        accelerator.print(format_report(report))
        accelerator.print(f"wrote {out} and {out.with_suffix('.png')}")
        log_to_training_run(cfg.wandb, file.parent, report, matrix, classes, accelerator.print)
    return report


def log_to_training_run(requested_mode: str, run_dir: Path, report: dict, matrix: np.ndarray, classes: list[str],
                        printer=print) -> None:
    """Add the scores to the W&B run that trained this checkpoint (same id), when it had one."""
    run_id = wandb_run_id(run_dir, create=False)
    if requested_mode == "off" or run_id is None:
        return
    mode = resolve_wandb_mode(requested_mode)
    if mode == "off":
        return
    import wandb

    project = run_config(run_dir).get("wandb_project", "cifar10-resnet")
    # Under eval/: the training run's own val/acc (its validation during training) must stay as it was.
    prefix = f"eval/{report['data']}"
    run = wandb.init(project=project, id=run_id, resume="allow", dir=str(run_dir), mode=mode)
    try:
        title = f"{report['data']}, TTA {report['tta']}"
        run.log({f"{prefix}/{k}": v for k, v in wandb_class_report(matrix, classes, title).items()})
        run.summary.update({f"{prefix}/acc": report["accuracy"], f"{prefix}/loss": report["loss"],
                            f"{prefix}/tta": report["tta"]})
        printer(f"logged {prefix}/acc into W&B run {run_id}")
        print_sync_hint(run, printer)
    finally:
        run.finish()


def format_report(report: dict) -> str:
    tta = f", TTA level {report['tta']}" if report["tta"] else ""
    lines = [f"{report['data']}: accuracy {report['accuracy']:.4f}  loss {report['loss']:.4f}  "
             f"({report['n']} images{tta})", "per-class accuracy:"]
    lines += [f"  {c:<11}{'no images' if acc is None else f'{acc:.4f}'}"
              for c, acc in report["per_class_accuracy"].items()]
    names = [c[:5] for c in report["per_class_accuracy"]]
    lines.append("confusion matrix (rows: true, columns: predicted):")
    lines.append(" " * 7 + "".join(f"{n:>6}" for n in names))
    lines += [f"{n:<7}" + "".join(f"{v:>6}" for v in row) for n, row in zip(names, report["confusion_matrix"])]
    return "\n".join(lines)


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = confusion_figure(matrix, classes)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def run_predict(cfg: PredictConfig) -> Path:
    """Write ``ID,Labels`` rows, one per id in input order, with integer class labels."""
    check_batch_size(cfg.batch_size)
    out = Path(cfg.out)
    check_output_folder(out)
    data = load_custom_pickle(cfg.data, need_ids=True)
    model, meta, file = load_checkpoint(cfg.checkpoint)
    accelerator, model, loader = _prepare(model, data.images, None, cfg.batch_size)
    tta = tta_level(cfg.tta, meta, accelerator)
    logits, _ = predict(model, loader, accelerator, meta["mean"], meta["std"], tta=tta, channels_last=True,
                        progress=True)
    if accelerator.is_main_process:
        with atomic_path(out) as tmp, tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ID", "Labels"])
            writer.writerows(zip(data.ids.tolist(), logits.argmax(1).tolist()))
        accelerator.print(f"wrote {len(data.ids)} predictions from {file} to {out}")
    return out


# ------------------------------------------------------------------------------------------------
# Python use: ``resnet.load_model`` and ``resnet.predict_images``
WHICH = {"best": "best.safetensors", "last": "last.safetensors"}


def load_model(run: str | Path, which: str = "best", device: str | torch.device = "cpu") -> torch.nn.Module:
    """The net a run trained, rebuilt from its checkpoint's metadata, on ``device``, in eval mode.

    ``run`` is a run folder (``runs/<name>``) or one of its ``.safetensors`` files. ``which="best"`` loads the
    weights of the best validation epoch (a run without validation has only ``last``, which is loaded then);
    ``which="last"`` those after the latest epoch. A run with ``--ema-decay`` saved its EMA's weights in both.
    The checkpoint's metadata (classes, mean, std, the TTA level the run validated with, ...) is on
    ``model.meta``, which ``predict_images`` reads.
    """
    if which not in WHICH:
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    path = Path(run).expanduser()
    if path.is_dir() and which == "last":
        path = path / WHICH["last"]  # load_checkpoint picks best (else last) for a folder
    model, meta, file = load_checkpoint(path)
    model.meta = {**meta, "file": str(file)}
    return model.to(device).eval()


@torch.no_grad()
def predict_images(model: torch.nn.Module, images, tta: int | None = None, batch_size: int = 500,
                   mean=None, std=None) -> torch.Tensor:
    """Logits (N, classes, float32 on the CPU) for uint8 images, normalised and test-time augmented as the
    run did: ``images`` is a numpy array or tensor of shape (N, 32, 32, 3) or (N, 3072) (CIFAR's channel-first
    rows), pixels 0-255. mean, std and tta default to the run's own (``model.meta`` from ``load_model``);
    ``logits.argmax(1)`` are the labels predict.py writes. The model is used in eval mode, on its own device.
    """
    meta = getattr(model, "meta", None) or {}
    mean = mean if mean is not None else meta.get("mean")
    std = std if std is not None else meta.get("std")
    if mean is None or std is None:
        raise ValueError("predict_images needs the run's mean and std: load the model with resnet.load_model, "
                         "or pass mean= and std=")
    tta = int(meta.get("tta", 0)) if tta is None else tta
    if tta not in (0, 1, 2):
        raise ValueError(f"tta must be 0, 1 or 2, got {tta!r}")
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy()
    images = to_nhwc(np.asarray(images), Path("images"), field="images")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    model.eval()
    x_all = to_chw_tensor(images)
    out = []
    for start in range(0, len(x_all), batch_size):
        x = _inputs(x_all[start:start + batch_size].to(device), mean, std, channels_last=False)
        out.append(tta_logits(model, x, tta).float().cpu())
    return torch.cat(out)
