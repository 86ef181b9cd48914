"""Experiment tracking: W&B through Accelerate's trackers, plus local metrics.csv and PNG curves.

W&B is optional and never needs a network: ``auto`` goes online only when an API key or a login
exists and otherwise writes an offline run that ``wandb sync`` can upload later. The CSV and the
curves are always written, so nothing depends on W&B.
"""
from __future__ import annotations

import csv
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .atomic import atomic_path
from .config import ConfigError

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


def wandb_init_kwargs(mode: str, run_dir: Path, name: str, tags: list[str]) -> dict[str, Any]:
    """Arguments for ``accelerator.init_trackers(..., init_kwargs={'wandb': ...})``."""
    return {"wandb": {"mode": mode, "dir": str(run_dir), "name": name, "tags": tags or None}}


class MetricsLog:
    """Append one row per epoch to metrics.csv and redraw curves.png; main process only."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path, self.png, self.enabled = run_dir / METRICS_FILE, run_dir / CURVES_FILE, enabled

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

    def append(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rows = self.rows()
        fields = list(rows[0]) if rows else []
        fields += [k for k in row if k not in fields]
        self._write(rows + [{k: _fmt(v) for k, v in row.items()}], fields)
        self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
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
