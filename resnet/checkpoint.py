"""Run folders: weights as safetensors with enough metadata to rebuild the net, and resumable state.

Layout of ``runs/<name>/``::

    config.yaml          resolved TrainConfig
    metrics.csv          one row per epoch (tracking.py)
    best.safetensors     weights with the best validation accuracy
    last.safetensors     weights after the latest epoch
    summary.json         what compare/grid read: finished, best val acc and epoch, params, times
    state/               accelerator.save_state + trainer.json (epoch, step in epoch, best), for --resume

Every file is written to a temporary name and renamed, so a crash never leaves a half-written
checkpoint behind.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_path, atomic_write_text
from .models import create_model

META_KEY = "resnet"
STATE_DIR = "state"
TRAINER_FILE = "trainer.json"
SUMMARY_FILE = "summary.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing or unreadable; the message names the path."""


def save_weights(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write ``model``'s state dict and ``meta`` (JSON-able) to a .safetensors file, atomically.

    ``trained_at`` (UTC, ISO 8601) is added: "the newest run" means the one trained last, which file
    times cannot tell once evaluate.py has written into an older run.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {**meta, "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})


def read_meta(file: Path) -> dict:
    """The suite's metadata of a .safetensors file (header only, no tensors read)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return json.loads((f.metadata() or {})[META_KEY])
    except KeyError:
        raise CheckpointError(f"{file}: no '{META_KEY}' metadata; not a checkpoint written by this suite") from None
    except Exception as e:
        raise CheckpointError(f"{file}: not a readable .safetensors checkpoint ({type(e).__name__}: {e})") from None


def newest_run(runs_root: str | Path = "runs") -> Path:
    """The run folder under ``runs_root`` whose weights were trained last (by their metadata)."""
    trained = []
    for run in Path(runs_root).glob("*/"):
        file = next((run / n for n in ("last.safetensors", "best.safetensors") if (run / n).is_file()), None)
        if file is not None:
            try:
                trained.append((read_meta(file).get("trained_at", ""), run))
            except CheckpointError:
                continue  # not ours, or damaged: never "the newest run"
    if not trained:
        raise CheckpointError(f"no trained run found in {runs_root}/; pass --checkpoint RUN_DIR or FILE.safetensors")
    return max(trained)[1]


def resolve_checkpoint(path: str | Path | None, runs_root: str | Path = "runs") -> Path:
    """A .safetensors file as given; a run folder -> its best (else last) weights; None -> newest run."""
    path = Path(path) if path is not None else newest_run(runs_root)
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
    meta = read_meta(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
        model = create_model(meta["model"], **meta["model_kwargs"])
    except Exception as e:
        raise CheckpointError(f"{file}: cannot rebuild the model it holds ({type(e).__name__}: {e})") from None
    load_weights(model, state, file)
    return model.eval(), meta, file


def load_weights(model: nn.Module, state: dict, source: Path) -> None:
    """``load_state_dict`` with a one-line error naming the file and the first mismatches."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        missing = [k for k in model.state_dict() if k not in state]
        unexpected = [k for k in state if k not in model.state_dict()]
        if missing or unexpected:
            detail = f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, " \
                     f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        else:
            detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(f"{source}: weights do not fit the model ({detail}); "
                              f"was it trained with another --model or --model-kwargs?") from None


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """``summary.json``: the run at a glance (finished, best val acc, params, times) for compare and grid."""
    atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))


STATE_CANDIDATES = (STATE_DIR, STATE_DIR + ".tmp", STATE_DIR + ".old")


def _saved_trainer(folder: Path) -> dict | None:
    """trainer.json of a complete state folder (it is written last, after every rank's files), else None."""
    try:
        return json.loads((folder / TRAINER_FILE).read_text())
    except (OSError, ValueError):
        return None


def newest_complete_state(run_dir: str | Path) -> Path | None:
    """The newest complete one of state/, state.tmp/ and state.old/, whatever a crash left behind.

    A save writes state.tmp/ (trainer.json last), renames state/ to state.old/, state.tmp/ to state/, then
    deletes state.old/; a kill at any point leaves at least one complete folder. trainer.json's ``saves``
    counter orders them (older runs have none: then state/ wins over state.tmp/ over state.old/).
    """
    best, best_key = None, None
    for rank, name in enumerate(STATE_CANDIDATES):
        trainer = _saved_trainer(Path(run_dir) / name)
        if trainer is None:
            continue
        key = (int(trainer.get("saves", 0)), -rank)
        if best_key is None or key > best_key:
            best, best_key = Path(run_dir) / name, key
    return best


def recover_state(run_dir: Path) -> None:
    """Leave exactly one state folder, state/, holding the newest complete state (main process only).

    Runs before every save and resume, so that no leftover of a cut save (state.old/, a half-written
    state.tmp/) can make a later save fail or make a resume pick an older state.
    """
    best = newest_complete_state(run_dir)
    final = run_dir / STATE_DIR
    if best is not None and best != final:
        # Delete state/ (older or incomplete) first: until the rename, ``best`` is still complete.
        _discard(final)
        os.replace(best, final)
    for name in STATE_CANDIDATES[1:]:
        _discard(run_dir / name)


def _discard(folder: Path) -> None:
    """Delete a state folder, its trainer.json first: a deletion cut short never looks complete."""
    (folder / TRAINER_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def save_state(accelerator, run_dir: Path, trainer: dict[str, Any]) -> None:
    """Save everything needed to resume (model, optimizer, EMA, RNG + trainer.json), replacing the old state.

    A kill at any moment loses at most this save: see ``newest_complete_state``.
    """
    final, tmp, old = (run_dir / name for name in STATE_CANDIDATES)
    if accelerator.is_main_process:
        recover_state(run_dir)
        trainer["saves"] = int((_saved_trainer(final) or {}).get("saves", 0)) + 1
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / TRAINER_FILE, json.dumps(trainer, indent=2))  # the mark of a complete folder
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _discard(old)
    accelerator.wait_for_everyone()


def state_dir_for_resume(run_dir: str | Path) -> Path:
    """The newest complete state folder of a run (see ``newest_complete_state``)."""
    state = newest_complete_state(run_dir)
    if state is None:
        raise CheckpointError(f"{run_dir}: nothing to resume (no {STATE_DIR}/{TRAINER_FILE}); was the run started?")
    return state


def load_state(accelerator, run_dir: str | Path) -> dict[str, Any]:
    """Restore the accelerator state of a run; returns its trainer.json."""
    if accelerator.is_main_process:
        recover_state(Path(run_dir))
    accelerator.wait_for_everyone()
    state = state_dir_for_resume(run_dir)
    try:
        accelerator.load_state(str(state))
        return json.loads((state / TRAINER_FILE).read_text())
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # torch says "Error(s) in loading state_dict for ResNet:", then the mismatches: keep the first of them
        first = " ".join(lines[:2] if lines and lines[0].endswith(":") else lines[:1])
        raise CheckpointError(f"{state}: cannot resume from this state ({type(e).__name__}: {first[:300]}); "
                              f"was the run trained with another --model, --model-kwargs or optimizer?") from None
