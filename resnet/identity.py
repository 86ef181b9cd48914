"""What a run *is*: a group id shared by runs of the same experiment, and a readable name.

Runs that differ only in their seed (or in where they were written, how they were logged, whether
they were resumed) are repeats of one experiment, so they share ``run_group``; comparisons average
over a group. Both strings are also used as W&B run name and group, so they must be stable across
processes, Python versions and YAML round trips. Deliberately light (no torch), so the comparison
tool can use it without loading the training stack.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

# Fields of TrainConfig that do not change what is trained or measured; leaving them out of the hash
# is what puts seeds of one experiment (and a resumed run with its original) in the same group.
NON_EXPERIMENT_FIELDS = frozenset({
    "seed", "run_dir", "resume", "overwrite", "progress", "debug", "time_budget",  # a budget's plan is in epochs
    "wandb", "wandb_project", "wandb_name", "wandb_tags", "wandb_group",
    "data_dir", "download",
})


def canonical(value: Any) -> Any:
    """JSON-able form in which equal settings compare equal (1 == 1.0)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        # A recipe may say `lr: 1` where the saved config says `lr: 1.0`: the same experiment.
        return float(value)
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return str(value)


def experiment_settings(config: dict) -> dict:
    """The config without the fields that do not change the experiment (see NON_EXPERIMENT_FIELDS)."""
    settings = {str(k).replace("-", "_"): canonical(v) for k, v in config.items()}  # recipe keys may be dashed
    return {k: v for k, v in settings.items() if k not in NON_EXPERIMENT_FIELDS}


def run_group(config: dict) -> str:
    """8 hex chars identifying the experiment ``config`` (a resolved TrainConfig as a dict) runs."""
    text = json.dumps(experiment_settings(config), sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def activation_of(config: dict) -> str:
    """The activation a run used: the --activation override, else the model's own setting, else 'default'."""
    kwargs = config.get("model_kwargs") or {}
    return str(config.get("activation") or kwargs.get("activation") or "default")


def run_name(config: dict) -> str:
    """Readable ``model-activation-opt-seed<N>``, e.g. ``resnet_report_4m-gelu-adam-seed0``."""
    return f"{config.get('model', 'model')}-{activation_of(config)}-{config.get('opt', 'opt')}-seed{config.get('seed', 0)}"
