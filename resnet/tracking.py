"""Experiment tracking: W&B through Accelerate's trackers, plus local metrics.csv and PNG curves.

W&B is optional and never needs a network: ``auto`` goes online only when an API key or a login
exists and otherwise writes an offline run that ``wandb sync`` can upload later. The CSV and the
curves are always written, so nothing depends on W&B.
"""
from __future__ import annotations

import csv
import netrc
import os
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from .atomic import atomic_path, atomic_write_text
from .knobs import ConfigError

METRICS_FILE = "metrics.csv"
CURVES_FILE = "curves.png"


def wandb_logged_in() -> bool:
    """True when wandb would find credentials: WANDB_API_KEY or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(requested: str) -> str:
    """Map --wandb auto|online|offline|off to the mode wandb.init gets ('off' means no tracker).

    ``auto`` respects a WANDB_MODE already set by the user, else online iff logged in. Resolving it
    here matters: wandb with no key and no mode raises "No API key configured" instead of running,
    so online without credentials is refused up front, in one line.
    """
    mode = requested
    if requested == "auto":
        env = os.environ.get("WANDB_MODE", "").lower()
        if env in ("online", "offline", "disabled"):
            mode = "off" if env == "disabled" else env
        else:
            mode = "online" if wandb_logged_in() else "offline"
    if mode == "online" and not wandb_logged_in():
        source = "--wandb online" if requested == "online" else "WANDB_MODE=online"
        raise ConfigError(f"{source}: no W&B credentials found (WANDB_API_KEY or `wandb login`); "
                          "log in, or use --wandb offline and `wandb sync` later")
    return mode


WANDB_ID_FILE = "wandb_run_id"
# metrics.csv column -> namespaced W&B key (one wandb.log per epoch, x-axis "epoch").
# lr: the lr of the epoch's first update (the decayed weights' group).
WANDB_KEYS = {"epoch": "epoch", "train_loss": "train/loss", "train_acc": "train/acc", "val_loss": "val/loss",
              "val_acc": "val/acc", "val_loss_tta": "val/loss_tta", "val_acc_tta": "val/acc_tta", "lr": "lr",
              "images_per_sec": "perf/images_per_sec", "epoch_time": "perf/epoch_time"}


def wandb_run_id(run_dir: Path, create: bool = True) -> str | None:
    """The W&B run id kept in the run folder, so that --resume and evaluate.py continue the same W&B run."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    if not create:
        return None
    from wandb.sdk.lib.runid import generate_id

    # A sweep agent names the run it launched in WANDB_RUN_ID: that run must be the one we log to.
    run_id = os.environ.get("WANDB_RUN_ID") or generate_id()
    atomic_write_text(path, run_id)
    return run_id


def environment_info() -> dict[str, Any]:
    """What a run's numbers depend on besides its config: library versions and the code's git commit."""
    import accelerate
    import timm
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "accelerate": accelerate.__version__,
                            "timm": timm.__version__}
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                            cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout (an installed copy): no commit to record
    return info


def wandb_init_kwargs(mode: str, run_dir: Path, run_id: str, name: str, group: str, job_type: str,
                      tags: list[str]) -> dict[str, Any]:
    """Arguments for ``accelerator.init_trackers(..., init_kwargs=...)``; resume="allow" continues ``run_id``."""
    return {"wandb": {"mode": mode, "dir": str(run_dir), "id": run_id, "resume": "allow", "name": name,
                      "group": group, "job_type": job_type, "tags": tags or None}}


def define_wandb_metrics(run) -> None:
    """Every metric against the epoch; the run summary keeps the best validation accuracy."""
    run.define_metric("epoch")
    run.define_metric("*", step_metric="epoch")
    run.define_metric("val/acc", summary="max")


def wandb_row(row: dict[str, Any]) -> dict[str, Any]:
    return {WANDB_KEYS[k]: v for k, v in row.items() if k in WANDB_KEYS and v is not None}


def print_sync_hint(run, printer=print) -> None:
    """Offline runs: the exact command that uploads this run later."""
    if run is not None and run.settings.mode == "offline":
        printer(f"W&B offline; upload later with: wandb sync {Path(run.dir).parent}")


def wandb_image_grid(images: torch.Tensor, mean, std, caption: str):
    """A wandb.Image of up to 64 normalised (N, 3, H, W) images, as the model sees them."""
    import wandb
    from torchvision.utils import make_grid

    x = images[:64].detach().float().cpu()
    x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    grid = make_grid(x.clamp(0, 1), nrow=8, padding=2)
    # uint8 HWC: wandb 0.31 does not rescale a float tensor in [0, 1] (it would come out black).
    return wandb.Image(grid.mul(255).round().byte().permute(1, 2, 0).numpy(), caption=caption)


def wandb_class_report(matrix: np.ndarray, classes: list[str], title: str) -> dict[str, Any]:
    """The confusion matrix as an image and per-class accuracy as a table, ready for ``run.log``."""
    import matplotlib.pyplot as plt
    import wandb

    fig = confusion_figure(matrix, classes, title)
    image = wandb.Image(fig)
    plt.close(fig)
    table = wandb.Table(columns=["class", "accuracy", "images"],
                        data=[[c, acc, int(n)]
                              for c, acc, n in zip(classes, per_class_accuracy(matrix), matrix.sum(1))])
    return {"confusion_matrix": image, "per_class_accuracy": table}


def per_class_accuracy(matrix: np.ndarray) -> list[float | None]:
    """Recall of each true class (rows of the matrix); None for a class with no images (0 would read as all missed)."""
    return [float(matrix[i, i] / total) if total else None for i, total in enumerate(matrix.sum(1))]


def confusion_figure(matrix: np.ndarray, classes: list[str], title: str = ""):
    """A matplotlib figure of the confusion matrix, rows true classes, columns predicted, counts written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, matrix[i, j], ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    fig.tight_layout()
    return fig


# Drawing curves.png costs ~0.5 s and importing matplotlib ~1 s: a run redraws it at most this often, and at its end.
PLOT_EVERY_S = 60.0


class MetricsLog:
    """Append one row per epoch to metrics.csv and redraw curves.png now and then; main process only."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path, self.png, self.enabled = run_dir / METRICS_FILE, run_dir / CURVES_FILE, enabled
        self._plotted = time.monotonic()

    def rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))

    def truncate_after(self, epoch: int) -> None:
        """On resume, drop rows of epochs past the saved state (they will be run again)."""
        if not self.enabled or not self.path.is_file():
            return
        rows = [r for r in self.rows() if int(r["epoch"]) <= epoch]
        self._write(rows, list(rows[0]) if rows else [])

    def _write(self, rows: list[dict], fields: list[str]) -> None:
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, Any], last: bool = False) -> None:
        """Add an epoch's row; redraw the curves when ``last`` (the run ends) or PLOT_EVERY_S after the last time."""
        if not self.enabled:
            return
        rows = self.rows()
        fields = list(rows[0]) if rows else []
        fields += [k for k in row if k not in fields]
        self._write(rows + [{k: _fmt(v) for k, v in row.items()}], fields)
        if last or time.monotonic() - self._plotted > PLOT_EVERY_S:
            self.plot()

    def plot(self) -> None:
        """Redraw curves.png from metrics.csv (nothing without rows)."""
        rows = self.rows() if self.enabled else []
        if not rows:
            return
        self._plotted = time.monotonic()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [int(r["epoch"]) for r in rows]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for ax, key in zip(axes, ("loss", "acc", "lr")):
            for split in ("train", "val"):
                name = f"{split}_{key}" if key != "lr" else "lr"
                points = [(e, float(r[name])) for e, r in zip(epochs, rows) if r.get(name) not in (None, "")]
                if points:
                    ax.plot(*zip(*points), marker="o", label=split if key != "lr" else None)
                if key == "lr":
                    break
            ax.set_title(key)
            ax.set_xlabel("epoch")
            if key != "lr":
                ax.legend()
        fig.tight_layout()
        with atomic_path(self.png) as tmp:
            fig.savefig(tmp, dpi=80)
        plt.close(fig)


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v
