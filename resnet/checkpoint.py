"""Run folders: weights as safetensors with enough metadata to rebuild the net, and resumable state.

Layout of ``runs/<name>/``::

    config.yaml          resolved TrainConfig
    metrics.csv          one row per epoch (tracking.py)
    best.safetensors     weights with the best validation accuracy
    last.safetensors     weights after the latest epoch
    state/               accelerator.save_state + trainer.json (epoch, step, best), for --resume

Every file is written to a temporary name and renamed, so a crash never leaves a half-written
checkpoint behind.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .models import create_model

META_KEY = "resnet"
STATE_DIR = "state"
TRAINER_FILE = "trainer.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing or unreadable; the message names the path."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_weights(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write ``model``'s state dict and ``meta`` (JSON-able) to a .safetensors file, atomically."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    os.replace(tmp, path)


def resolve_checkpoint(path: str | Path | None, runs_root: str | Path = "runs") -> Path:
    """A .safetensors file as given; a run folder -> its best (else last) weights; None -> newest run."""
    if path is None:
        runs = sorted((p for p in Path(runs_root).glob("*/") if any(p.glob("*.safetensors"))),
                      key=lambda p: p.stat().st_mtime)
        if not runs:
            raise CheckpointError(f"no trained run found in {runs_root}/; pass --checkpoint RUN_DIR or FILE.safetensors")
        path = runs[-1]
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: run folder holds no best.safetensors or last.safetensors")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    return path


def load_checkpoint(path: str | Path | None, runs_root: str | Path = "runs") -> tuple[nn.Module, dict, Path]:
    """Rebuild the model stored at ``path`` (see resolve_checkpoint); returns (model in eval mode, meta, file)."""
    file = resolve_checkpoint(path, runs_root)
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            state = {k: f.get_tensor(k) for k in f.keys()}
    except KeyError:
        raise CheckpointError(f"{file}: no '{META_KEY}' metadata; not written by this suite") from None
    except Exception as e:
        raise CheckpointError(f"{file}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    model = create_model(meta["model"], **meta["model_kwargs"])
    model.load_state_dict(state)
    return model.eval(), meta, file


def save_state(accelerator, run_dir: Path, trainer: dict[str, Any]) -> None:
    """Save everything needed to resume (model, optimizer, EMA, RNG + trainer.json), replacing the old state."""
    final, tmp, old = run_dir / STATE_DIR, run_dir / (STATE_DIR + ".tmp"), run_dir / (STATE_DIR + ".old")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_FILE).write_text(json.dumps(trainer, indent=2))
        # Swap in two renames: at every moment either state/ or state.old/ is complete.
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def state_dir_for_resume(run_dir: str | Path) -> Path:
    """The complete state folder of a run (state/, or state.old/ if a crash hit mid-swap)."""
    run_dir = Path(run_dir)
    for name in (STATE_DIR, STATE_DIR + ".old"):
        if (run_dir / name / TRAINER_FILE).is_file():
            return run_dir / name
    raise CheckpointError(f"{run_dir}: nothing to resume (no {STATE_DIR}/{TRAINER_FILE}); was the run started?")


def load_state(accelerator, run_dir: str | Path) -> dict[str, Any]:
    """Restore the accelerator state of a run; returns its trainer.json."""
    state = state_dir_for_resume(run_dir)
    accelerator.load_state(str(state))
    return json.loads((state / TRAINER_FILE).read_text())
