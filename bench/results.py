"""Measured figures as data: every bench appends its figures as rows of results/cpu.csv or results/gpu.csv.

One row per figure: when (date), on what (hardware: the GPU, or the CPU with its bf16 support; torch),
with which code (commit), by which bench and command, about what (subject, seed), and the figure itself
(metric, value). bench/tables.py builds the README's and docs' tables from these rows, so a table cannot
drift from its data.
"""
from __future__ import annotations

import csv
import datetime
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "results"
COLUMNS = ("date", "hardware", "torch", "commit", "bench", "subject", "seed", "metric", "value", "command")


def hardware() -> str:
    """The GPU's name when one is used, else the CPU with its bf16 support (resnet.hardware)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    from resnet.hardware import describe_cpu

    return describe_cpu()


def commit() -> str:
    """The code's commit, '+' when the working tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(bench: str, subject: str, metric: str, value: float, command: str, seed: int | str = "",
           file: str | Path | None = None) -> None:
    """Append one figure; the file is results/gpu.csv on a GPU, else results/cpu.csv (or ``file``, or the
    environment's RESNET_RESULTS_FILE: a scratch file for rehearsals, bench/gpu_session.py --rehearse)."""
    import torch

    file = file or os.environ.get("RESNET_RESULTS_FILE")
    path = Path(file) if file else RESULTS / ("gpu.csv" if torch.cuda.is_available() else "cpu.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(COLUMNS)
        writer.writerow([datetime.date.today().isoformat(), hardware(), torch.__version__.split("+")[0], commit(),
                         bench, subject, seed, metric, f"{value:.6g}" if isinstance(value, float) else value,
                         command])


def rows(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))
