"""Score a checkpoint (evaluate.py) and write a predictions file (predict.py)."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .config import EvalConfig, PredictConfig
from .data import DataError, cifar10_splits, load_cifar10, load_custom_pickle
from .distributed import create_accelerator
from .engine import confusion_matrix, evaluate, predict
from .loader import eval_loader


def _prepare(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray | None, batch_size: int):
    """Accelerator, model on its device in channels_last, and a sharded in-order loader."""
    accelerator = create_accelerator()
    model = accelerator.prepare_model(model.to(memory_format=torch.channels_last), evaluation_mode=True)
    return accelerator, model, accelerator.prepare(eval_loader(images, labels, batch_size))


def _labeled_data(cfg: EvalConfig, meta: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """(images, labels, name) for --data, --split test or --split val."""
    if cfg.data:
        custom = load_custom_pickle(cfg.data, need_ids=False, need_labels=True)
        return custom.images, custom.labels, Path(cfg.data).stem
    if cfg.split == "test":
        test = load_cifar10(cfg.data_dir, train=False, download=cfg.download)
        return test.images, test.labels, "test"
    val_split = cfg.val_split if cfg.val_split is not None else meta.get("val_split", 0)
    if not val_split:
        raise DataError("this run was trained without a validation split; pass --val-split N or use --split test")
    # The run's own seed reproduces the exact images it held out.
    _, val = cifar10_splits(cfg.data_dir, val_split, meta.get("seed", 0), cfg.download)
    return val.images, val.labels, "val"


def run_evaluate(cfg: EvalConfig) -> dict:
    """Accuracy, loss, per-class accuracy and confusion matrix; printed, and saved as JSON + PNG."""
    model, meta, file = load_checkpoint(cfg.checkpoint)
    images, labels, name = _labeled_data(cfg, meta)
    accelerator, model, loader = _prepare(model, images, labels, cfg.batch_size)
    result = evaluate(model, loader, accelerator, meta["mean"], meta["std"], tta=cfg.tta, channels_last=True,
                      progress=True)
    classes = meta["classes"]
    matrix = confusion_matrix(result["targets"], result["preds"], len(classes))
    per_class = {c: float(matrix[i, i] / max(matrix[i].sum(), 1)) for i, c in enumerate(classes)}
    report = {"checkpoint": str(file), "data": name, "n": result["n"], "tta": cfg.tta,
              "accuracy": result["acc"], "loss": result["loss"], "per_class_accuracy": per_class,
              "confusion_matrix": matrix.tolist()}
    if accelerator.is_main_process:
        out = Path(cfg.out) if cfg.out else file.parent / f"eval_{name}{f'_tta{cfg.tta}' if cfg.tta else ''}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        plot_confusion(matrix, classes, out.with_suffix(".png"))
        accelerator.print(format_report(report))
        accelerator.print(f"wrote {out} and {out.with_suffix('.png')}")
    return report


def format_report(report: dict) -> str:
    tta = f", TTA level {report['tta']}" if report["tta"] else ""
    lines = [f"{report['data']}: accuracy {report['accuracy']:.4f}  loss {report['loss']:.4f}  "
             f"({report['n']} images{tta})", "per-class accuracy:"]
    lines += [f"  {c:<11}{a:.4f}" for c, a in report["per_class_accuracy"].items()]
    names = [c[:5] for c in report["per_class_accuracy"]]
    lines.append("confusion matrix (rows: true, columns: predicted):")
    lines.append(" " * 7 + "".join(f"{n:>6}" for n in names))
    lines += [f"{n:<7}" + "".join(f"{v:>6}" for v in row) for n, row in zip(names, report["confusion_matrix"])]
    return "\n".join(lines)


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, matrix[i, j], ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_predict(cfg: PredictConfig) -> Path:
    """Write ``ID,Labels`` rows, one per id in input order, with integer class labels."""
    model, meta, file = load_checkpoint(cfg.checkpoint)
    data = load_custom_pickle(cfg.data, need_ids=True)
    accelerator, model, loader = _prepare(model, data.images, None, cfg.batch_size)
    logits, _ = predict(model, loader, accelerator, meta["mean"], meta["std"], tta=cfg.tta, channels_last=True,
                        progress=True)
    out = Path(cfg.out)
    if accelerator.is_main_process:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ID", "Labels"])
            writer.writerows(zip(data.ids.tolist(), logits.argmax(1).tolist()))
        os.replace(tmp, out)
        accelerator.print(f"wrote {len(data.ids)} predictions from {file} to {out}")
    return out
