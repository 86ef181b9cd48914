"""Run folders: weights as safetensors with enough metadata to rebuild the net, and resumable state.

Layout of ``runs/<name>/``::

    config.yaml          resolved TrainConfig
    metrics.csv          one row per epoch (tracking.py)
    best.safetensors     weights with the best validation accuracy
    last.safetensors     weights after the latest epoch
    summary.json         what compare/grid read: finished, best val acc and epoch, params, times
    state/               what --resume needs (state_folder.py)

Every file is written to a temporary name and renamed, so a crash never leaves a half-written
checkpoint behind.
"""
from __future__ import annotations

import json
import reprlib
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.modules.module import (register_module_buffer_registration_hook,
                                     register_module_parameter_registration_hook)

from .atomic import atomic_path, atomic_write_text
from .models import create_model

META_KEY = "resnet"
SUMMARY_FILE = "summary.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing or unreadable; the message names the path."""


def save_weights(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write ``model``'s state dict and ``meta`` (JSON-able) to a .safetensors file, atomically.

    ``trained_at`` (UTC, ISO 8601) is added, for people to read; ``newest_run`` never trusts it.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {**meta, "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})


def read_meta(file: Path) -> dict:
    """The suite's metadata of a .safetensors file (header only, no tensors read)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
    except KeyError:
        raise CheckpointError(f"{file}: no '{META_KEY}' metadata; not a checkpoint written by this suite") from None
    except Exception as e:
        raise CheckpointError(f"{file}: not a readable .safetensors checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file}: '{META_KEY}' metadata is {type(meta).__name__}, not a JSON object; "
                              "not a checkpoint written by this suite")
    return meta


WEIGHT_FILES = ("best.safetensors", "last.safetensors")  # a run folder's, in the order --checkpoint RUN picks


def newest_run(runs_root: str | Path = "runs") -> Path:
    """The run folder under ``runs_root`` whose weights were written last, by the files' times.

    Never by the ``trained_at`` a file declares: a downloaded run could claim any date. evaluate.py writes
    other files into a run, never its weights, so their time is when they were trained or placed here.
    """
    written = []
    for run in Path(runs_root).glob("*/"):
        files = [run / n for n in WEIGHT_FILES if (run / n).is_file()]
        if not files:
            continue
        try:
            read_meta(resolve_checkpoint(run))  # the file a default --checkpoint would load
        except CheckpointError:
            continue  # not ours, or damaged: never "the newest run"
        written.append((max(_written_at(f) for f in files), run))
    if not written:
        raise CheckpointError(f"no trained run found in {runs_root}/; pass --checkpoint RUN_DIR or FILE.safetensors")
    return max(written)[1]


def _written_at(file: Path) -> int:
    """mtime, but never later than the inode's last change: unpacking an archive may set any mtime (a far
    future one would win for ever), while the kernel sets ctime to the time of unpacking."""
    st = file.stat()
    return min(st.st_mtime_ns, st.st_ctime_ns)


def resolve_checkpoint(path: str | Path | None, runs_root: str | Path = "runs") -> Path:
    """A .safetensors file as given; a run folder -> its best (else last) weights; None -> newest run."""
    path = Path(path) if path is not None else newest_run(runs_root)
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: run folder holds no best.safetensors or last.safetensors")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    return path


def load_checkpoint(path: str | Path | None, runs_root: str | Path = "runs") -> tuple[nn.Module, dict, Path]:
    """Rebuild the model stored at ``path`` (see resolve_checkpoint); returns (model in eval mode, meta, file).

    The metadata is a claim of the file's: the net it declares is built on the meta device first (shapes, no
    memory) and checked against the tensors the file holds, so no file makes us allocate more than it holds.
    """
    file = resolve_checkpoint(path, runs_root)
    meta = read_meta(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # header only
    except Exception as e:
        raise CheckpointError(f"{file}: not a readable .safetensors checkpoint ({type(e).__name__}: {e})") from None
    check_meta(file, meta, shapes)
    try:
        model = create_model(meta["model"], **meta["model_kwargs"])
        with safe_open(str(file), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{file}: cannot rebuild the model it holds ({type(e).__name__}: {e})") from None
    load_weights(model, state, file)
    return model.eval(), meta, file


class _TooManyTensors(Exception):
    """Raised from a registration hook to stop building a declared net far larger than its file."""


def _meta_model(file: Path, name: str, kwargs: dict, n_tensors: int) -> nn.Module:
    """The declared net on the meta device; stopped once it registers far more tensors than the file holds
    (a million declared blocks cost no tensor memory there, but Python objects and minutes)."""
    # Slack, so that a net merely other than the file's gets the exact mismatch from check_meta.
    limit, count = 4 * n_tensors + 1024, 0

    def counted(module: nn.Module, key: str, tensor: torch.Tensor | None) -> None:
        nonlocal count
        count += tensor is not None
        if count > limit:
            raise _TooManyTensors

    hooks = [register_module_parameter_registration_hook(counted), register_module_buffer_registration_hook(counted)]
    try:
        with torch.device("meta"):
            return create_model(name, **kwargs)
    except _TooManyTensors:
        raise CheckpointError(f"{file}: its metadata declares a {name} of more than {limit} tensors, but the file "
                              f"holds {n_tensors}; the metadata does not describe these weights") from None
    except Exception as e:
        raise CheckpointError(f"{file}: cannot rebuild the model it holds ({type(e).__name__}: {e})") from None
    finally:
        for hook in hooks:
            hook.remove()


def check_meta(file: Path, meta: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse (one line naming ``file`` and the first mismatch) metadata that does not describe the tensors
    ``shapes`` (name -> shape, from the file's header) or lacks what evaluate.py and predict.py use."""
    name, kwargs = meta.get("model"), meta.get("model_kwargs")
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        raise CheckpointError(f"{file}: metadata needs 'model' (a name) and 'model_kwargs' (a mapping), got "
                              f"{type(name).__name__} and {type(kwargs).__name__}")
    skeleton = _meta_model(file, name, kwargs, len(shapes))
    wanted = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    mismatches = [f"missing {k}" if k not in shapes else
                  f"size mismatch for {k}: {list(shapes[k])} in the file, {list(shape)} in the model"
                  for k, shape in wanted.items() if shapes.get(k) != shape]
    mismatches += [f"unexpected {k}" for k in shapes if k not in wanted]
    if mismatches:
        more = f", and {len(mismatches) - 1} more" if len(mismatches) > 1 else ""
        raise CheckpointError(f"{file}: weights do not fit the model its metadata declares ({name}: "
                              f"{mismatches[0]}{more}); was it trained with another --model or --model-kwargs?")
    try:
        outputs = skeleton.eval()(torch.empty(1, 3, 32, 32, device="meta")).shape[-1]
    except Exception as e:
        raise CheckpointError(f"{file}: cannot rebuild the model it holds ({type(e).__name__}: {e})") from None
    classes = meta.get("classes")
    if not (isinstance(classes, list) and len(classes) == outputs and all(isinstance(c, str) for c in classes)):
        raise CheckpointError(f"{file}: metadata 'classes' must be a list of {outputs} names (the net's outputs), "
                              f"got {reprlib.repr(classes)}")
    for key in ("mean", "std"):
        value = meta.get(key)
        if not (isinstance(value, list) and len(value) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise CheckpointError(f"{file}: metadata '{key}' must be 3 numbers (per RGB channel), "
                                  f"got {reprlib.repr(value)}")
    for key, top in (("tta", 2), ("val_split", None), ("split_seed", None), ("seed", None)):
        value = meta.get(key, 0)
        whole = isinstance(value, int) and not isinstance(value, bool)
        if not (whole and value >= 0 and (top is None or value <= top)):
            raise CheckpointError(f"{file}: metadata '{key}' must be a whole number from 0"
                                  f"{f' to {top}' if top else ''}, got {reprlib.repr(value)}")


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
