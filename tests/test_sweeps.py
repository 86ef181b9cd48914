"""W&B sweep files: the command goes through accelerate launch, and every parameter reaches train.py as a flag.

The agent's arguments are built with wandb's own function, so a parameter named differently from
train.py's dashed flag (e.g. weight_decay instead of weight-decay) fails here and not on a cluster.
"""
import dataclasses
import itertools

import pytest
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from conftest import ROOT
from resnet.config import TrainConfig, build_parser, parse_config

SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def sample_values(spec: dict) -> list:
    """Values the sweep can hand out for one parameter: its values, its value, or its range ends."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


def agent_args(params: dict) -> list[str]:
    """What `${args}` expands to for one choice of parameter values (wandb: --name=value)."""
    return create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args"]


def test_sweep_files_exist():
    assert {p.name for p in SWEEPS} >= {"report_grid.yaml", "lr.yaml"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_runs_train_py_through_accelerate_and_maximizes_best_val_acc(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "train.py" and (ROOT / sweep["program"]).is_file()
    assert sweep["command"] == ["${env}", "accelerate", "launch", "${program}", "${args}"]
    assert sweep["metric"] == {"name": "best/val_acc", "goal": "maximize"}
    assert sweep["method"] in ("grid", "random", "bayes")


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_parameter_is_a_train_py_flag(path):
    sweep = yaml.safe_load(path.read_text())
    parser = build_parser(TrainConfig, "")
    for name, spec in sweep["parameters"].items():
        for value in sample_values(spec):
            (arg,) = agent_args({name: value})
            parsed = vars(parser.parse_args([arg]))  # unknown flag or bad value: SystemExit
            if parsed.get("config") is None:
                parsed.pop("config")  # --config defaults to None; field flags are absent unless given
            if parsed.get("debug") is False:
                parsed.pop("debug")  # likewise --debug (a switch of the scripts, not a config field)
            assert len(parsed) == 1, arg
            dest, got = next(iter(parsed.items()))
            assert dest in FIELDS | {"config"}, arg
            assert got == value or str(got) == str(value), arg


def test_report_grid_is_activation_x_optimizer_x_three_seeds():
    sweep = yaml.safe_load((ROOT / "sweeps" / "report_grid.yaml").read_text())
    assert sweep["method"] == "grid"
    params = sweep["parameters"]
    assert {k: v["values"] for k, v in params.items()} == {"activation": ["relu", "gelu"], "opt": ["sgd", "adam"],
                                                           "seed": [0, 1, 2]}
    runs = set()
    for combo in itertools.product(*[v["values"] for v in params.values()]):
        cfg = parse_config(TrainConfig, agent_args(dict(zip(params, combo))))
        runs.add((cfg.activation, cfg.opt, cfg.seed))
    assert len(runs) == 12


def test_lr_sweep_searches_lr_and_weight_decay_on_a_log_scale():
    sweep = yaml.safe_load((ROOT / "sweeps" / "lr.yaml").read_text())
    assert sweep["method"] == "bayes"
    params = sweep["parameters"]
    assert set(params) == {"lr", "weight-decay"}
    for spec in params.values():
        assert spec["distribution"] == "log_uniform_values" and 0 < spec["min"] < spec["max"]
    cfg = parse_config(TrainConfig, agent_args({"lr": 0.05, "weight-decay": 1e-4}))
    assert (cfg.lr, cfg.weight_decay) == (0.05, 1e-4)
