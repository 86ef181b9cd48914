"""What a resume may change: this launch's config against the run's own config.yaml.

A resume continues the run's weights, optimizer and data order, so a flag that would change them is
refused, naming it, rather than recorded and silently not applied (the optimizer's param groups, for one,
come back from the checkpoint). Two kinds of change are allowed:

- ``APPLIED``: the lr schedule and the batches are rebuilt from this launch's config at every start (the
  position maps to the new global batch: ``TrainState.position``), so a new value applies from the resumed
  step on (a lower --lr after a blow-up, a longer --epochs); recorded with the epoch it changed at
  (``TrainState.changes``, and config.yaml's header).
- ``HOW_IT_RUNS``: where the data lives, logging, validation cadence, compilation: nothing the weights
  depend on. config.yaml takes the new values.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .config import LAUNCH_FIELDS, TrainConfig, load_recipe
from .knobs import ConfigError

APPLIED = ("epochs", "batch_size", "lr", "lr_unit", "lr_scale", "muon_lr", "schedule", "warmup_epochs",
           "warmup_lr_ratio", "min_lr_ratio")
HOW_IT_RUNS = ("data_dir", "download", "workers", "progress", "check_every", "eval_every", "tta", "compile",
               "compile_mode", "channels_last", "wandb", "wandb_project", "wandb_name", "wandb_group", "wandb_tags")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    return "its default" if value is None else str(value)


def resume_changes(cfg: TrainConfig) -> list[dict[str, Any]]:
    """The ``APPLIED`` fields ``cfg`` changes against the run's config.yaml, as ``{"flag", "from", "to"}``;
    a ConfigError naming every other field that differs."""
    saved_file = Path(cfg.resume) / "config.yaml"
    saved = load_recipe(TrainConfig, saved_file)  # fields added since that run are absent: nothing to compare
    now = dataclasses.asdict(cfg)
    differ = [name for name, value in saved.items()
              if name not in LAUNCH_FIELDS and now.get(name) != value and name not in HOW_IT_RUNS]
    refused = [name for name in differ if name not in APPLIED]
    if refused:
        listed = ", ".join(f"{_flag(n)} {_shown(now[n])} (the run's: {_shown(saved[n])})" for n in refused)
        raise ConfigError(f"--resume {cfg.resume}: {listed}: a resume continues the run's weights, optimizer and "
                          f"data as they were; drop {'it' if len(refused) == 1 else 'them'}, or start a new run "
                          f"with --config {saved_file} and the new values")
    return [{"flag": _flag(n), "from": saved[n], "to": now[n]} for n in differ]


def describe(changes: list[dict[str, Any]]) -> str:
    """``--lr 1e+37 -> 0.001, precision fp32 -> bf16``."""
    return ", ".join(f"{c['flag']} {_shown(c['from'])} -> {_shown(c['to'])}" for c in changes)
