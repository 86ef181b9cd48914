"""A run's ``state/`` folder: everything ``--resume`` needs, in formats that load without running code.

A run folder is data, not code: users copy them between machines and download them from shared drives,
so nothing here is a pickle. Layout (all written into ``state.tmp/``, trainer.json last)::

    model.safetensors        the trained model (not its EMA: that is a technique's)
    optimizer.pt             the optimizer's state dict, read back with torch.load(weights_only=True)
    techniques.safetensors   each technique's tensors under its ``state_name`` (EMA, lookahead-EMA)
    scaler.json              fp16's GradScaler (only under fp16)
    rng_<rank>.json          each process's Python, NumPy and torch generators
    trainer.json             the TrainState (state.py): where the run is; its presence marks a complete folder

accelerate's ``save_state`` is not used: it keeps custom objects and RNGs as pickles that its
``load_state`` reads with ``weights_only=False``, so a planted file would run code on --resume.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_write_text
from .checkpoint import CheckpointError

STATE_DIR = "state"
TRAINER_FILE = "trainer.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TECHNIQUES_FILE = "techniques.safetensors"
SCALER_FILE = "scaler.json"
CANDIDATES = (STATE_DIR, STATE_DIR + ".tmp", STATE_DIR + ".old")
# What accelerate's save_state wrote (suite versions up to 0.4): pickles, never loaded.
PICKLED = ("optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl")


def rng_file(rank: int) -> str:
    return f"rng_{rank}.json"


# ------------------------------------------------------------------------------------------------
# Which folder: whatever a crash left behind
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
    for rank, name in enumerate(CANDIDATES):
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
    for name in CANDIDATES[1:]:
        _discard(run_dir / name)


def _discard(folder: Path) -> None:
    """Delete a state folder, its trainer.json first: a deletion cut short never looks complete."""
    (folder / TRAINER_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def state_dir_for_resume(run_dir: str | Path) -> Path:
    """The newest complete state folder of a run (see ``newest_complete_state``)."""
    state = newest_complete_state(run_dir)
    if state is None:
        raise CheckpointError(f"{run_dir}: nothing to resume (no {STATE_DIR}/{TRAINER_FILE}); was the run started, "
                              "and did an epoch end with finite weights?")
    return state


# ------------------------------------------------------------------------------------------------
# Saving
def save_state(accelerator, run_dir: Path, model: torch.nn.Module, optimizer, techniques: dict[str, torch.Tensor],
               trainer: dict[str, Any]) -> None:
    """Save everything a resume needs (``model`` unwrapped, ``techniques`` their flat tensors) and
    ``trainer``, replacing the old state. A kill at any moment loses at most this save."""
    final, tmp, old = (run_dir / name for name in CANDIDATES)
    if accelerator.is_main_process:
        recover_state(run_dir)
        trainer["saves"] = int((_saved_trainer(final) or {}).get("saves", 0)) + 1
        tmp.mkdir()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # the same on every rank (DDP), so written once
        save_file(_cpu(model.state_dict()), str(tmp / MODEL_FILE))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        save_file(_cpu(techniques), str(tmp / TECHNIQUES_FILE))
        if accelerator.scaler is not None:
            (tmp / SCALER_FILE).write_text(json.dumps(accelerator.scaler.state_dict()))
    (tmp / rng_file(accelerator.process_index)).write_text(json.dumps(rng_state()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / TRAINER_FILE, json.dumps(trainer, indent=2))  # the mark of a complete folder
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _discard(old)
    accelerator.wait_for_everyone()


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def rng_state() -> dict[str, Any]:
    """This process's generators as JSON: Python's, NumPy's legacy global one, torch's CPU and CUDA ones."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        cuda = state["cuda"][:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])


# ------------------------------------------------------------------------------------------------
# Loading
def load_state(accelerator, run_dir: str | Path, model: torch.nn.Module, optimizer) -> tuple[Path, dict, dict]:
    """Restore ``model`` (unwrapped), ``optimizer``, the scaler and this process's RNGs (when it had any:
    a run resumed on more processes) from a run's newest state; returns (the state folder read, trainer.json,
    the techniques' flat tensors).

    Every file is read as data (safetensors, JSON, torch.load with weights_only=True); a planted or
    damaged one stops the resume with one line naming it.
    """
    if accelerator.is_main_process:
        recover_state(Path(run_dir))
    accelerator.wait_for_everyone()
    state = state_dir_for_resume(run_dir)
    if not (state / OPTIMIZER_FILE).is_file() and any((state / name).exists() for name in PICKLED):
        raise CheckpointError(f"{state}: saved by suite version 0.4 or earlier as pickles, which can run code when "
                              "loaded; this version does not load them. Its weights (last.safetensors, "
                              "best.safetensors) still evaluate and predict; train a new run to continue")
    # Read onto the CPU ("cpu:0", a DDP rank's device on a CPU, is no device to safetensors); loading copies
    # each tensor to its parameter's device.
    model_state = _read(state / MODEL_FILE, lambda f: load_file(str(f)))
    _apply(state / MODEL_FILE, lambda: model.load_state_dict(model_state))
    optimizer_state = _read(state / OPTIMIZER_FILE, lambda f: torch.load(f, map_location="cpu", weights_only=True))
    _apply(state / OPTIMIZER_FILE, lambda: optimizer.load_state_dict(optimizer_state))
    techniques = _read(state / TECHNIQUES_FILE, lambda f: load_file(str(f)))
    if accelerator.scaler is not None and (state / SCALER_FILE).is_file():
        scaler = _read(state / SCALER_FILE, lambda f: json.loads(f.read_text()))
        _apply(state / SCALER_FILE, lambda: accelerator.scaler.load_state_dict(scaler))
    rng = state / rng_file(accelerator.process_index)
    if rng.is_file():
        _apply(rng, lambda: set_rng_state(_read(rng, lambda f: json.loads(f.read_text()))))
    trainer = _read(state / TRAINER_FILE, lambda f: json.loads(f.read_text()))
    return state, trainer, techniques


def _read(file: Path, reader) -> Any:
    """``reader(file)``, or one CheckpointError line naming the file."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing from the saved state; it cannot be resumed")
    try:
        return reader(file)
    except Exception as e:  # noqa: BLE001 - any failure to parse is the file's
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{file}: not a state file this suite wrote, refused (it may be damaged, or hold code "
                              f"to run: {type(e).__name__}: {first})") from None


def _apply(file: Path, load) -> None:
    """``load()``, or one CheckpointError line naming the file and the first mismatch."""
    try:
        load()
    except Exception as e:  # noqa: BLE001
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # torch says "Error(s) in loading state_dict for ResNet:", then the mismatches: keep the first of them
        first = " ".join(lines[:2] if lines and lines[0].endswith(":") else lines[:1])
        raise CheckpointError(f"{file}: cannot resume from it ({type(e).__name__}: {first[:300]}); was the run "
                              "trained with another --model, --model-kwargs or optimizer?") from None
