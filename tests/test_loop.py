"""The loop's shape: no host wait per step, one collective per read across processes, the typed run state,
techniques declared in one place, short functions."""
import ast
import dataclasses
import json
import math
import signal
import sys
from collections import Counter
from unittest import mock

import pytest
import torch

from conftest import ROOT, TINY_RUN, run_cli
from resnet import training
from resnet.config import TrainConfig, parse_config
from resnet.engine import EpochPlan, StepParts, train_epoch
from resnet.interrupt import StopRequest
from resnet.state import SCHEMA, EpochSums, StateError, TrainState
from resnet.techniques import REGISTRY

sys.path.insert(0, str(ROOT / "bench"))
from host_ops import counting_read_backs  # noqa: E402  (the bench's counter: the test and the figure agree)

# 300 training images at batch 4: 75 steps an epoch.
SMALL_STEPS = [*TINY_RUN, "--batch-size", "4", "--wandb", "off", "--no-download"]
MUON = ["--model", "resnet_airbench_whiten_2m", "--model-kwargs", '{"widths": [8, 16, 16]}', "--opt", "muon",
        "--flip", "alternate", "--lr-unit", "image1024", "--lr", "1.5", "--norm-bias-lr-scale", "64"]


def _run(cifar_dir, tmp_path, *flags) -> training.Run:
    return training.setup_run(parse_config(TrainConfig, [*SMALL_STEPS, *flags, "--data-dir", str(cifar_dir),
                                                         "--run-dir", str(tmp_path / "run")]))


@pytest.mark.parametrize("flags", [[], MUON], ids=["default", "muon"])
def test_an_epoch_reads_back_at_most_once_every_20_steps(cifar_dir, tmp_path, flags):
    run = _run(cifar_dir, tmp_path, *flags)
    steps = run.steps_per_epoch
    assert steps == 75
    counts = Counter()
    with StopRequest() as stop, counting_read_backs(counts):
        run.train_loader.set_epoch(0)
        outcome = train_epoch(run.parts, run.train_loader, run.schedule, EpochPlan(0, 0, steps, 0), stop,
                              run.cfg.check_every, progress=True)
    assert outcome.step == steps and outcome.sums.seen == 4 * steps and math.isfinite(outcome.sums.loss_sum)
    assert sum(counts.values()) / steps <= 0.05, counts  # reads at steps 25, 50 and 75: 0.04
    assert counts == Counter(tolist=3)


class TwoRanks:
    """The run's accelerator as rank 0 of two processes: its collectives counted (and the other rank's sums
    taken to be the same)."""

    def __init__(self, accelerator):
        self.real, self.num_processes, self.is_main_process = accelerator, 2, True
        self.device, self.reduced = accelerator.device, []

    def backward(self, loss):
        self.real.backward(loss)

    def reduce(self, tensor, reduction):
        self.reduced.append(tensor.clone())
        return tensor * 2


def test_across_processes_one_all_reduce_per_read_agrees_on_the_stop(cifar_dir, tmp_path):
    run = _run(cifar_dir, tmp_path)
    ranks = TwoRanks(run.accelerator)
    parts = dataclasses.replace(run.parts, accelerator=ranks)
    with StopRequest() as stop:
        run.train_loader.set_epoch(0)
        outcome = train_epoch(parts, run.train_loader, run.schedule, EpochPlan(0, 0, 60, 0), stop, 25,
                              progress=False)
        assert len(ranks.reduced) == 3 and outcome.step == 60  # steps 25, 50 and 60, the end: one each
        assert outcome.sums.seen == 2 * 4 * 60
        # A stop asked for on this rank at step 30 ends the epoch at the next read, step 50, on every rank.
        ranks.reduced.clear()
        run.train_loader.set_epoch(1)
        with mock.patch("resnet.engine.Meters.add", side_effect=_stop_at(stop, 30)):
            outcome = train_epoch(parts, run.train_loader, run.schedule, EpochPlan(1, 0, 75, 75), stop, 25,
                                  progress=False)
    assert outcome.stopped and outcome.step == 50 and len(ranks.reduced) == 2
    assert ranks.reduced[-1][-1] == 1  # the stop flag travelled in the same all-reduce as the sums


def _stop_at(stop: StopRequest, step: int):
    calls = [0]

    def add(*a, **k):
        calls[0] += 1
        if calls[0] == step:
            stop.signum = signal.SIGTERM
    return add


def test_a_single_process_stops_at_the_next_step_and_a_nan_names_the_steps_between_reads(cifar_dir, tmp_path):
    run = _run(cifar_dir, tmp_path)
    with StopRequest() as stop:
        run.train_loader.set_epoch(0)
        with mock.patch("resnet.engine.Meters.add", side_effect=_stop_at(stop, 7)):
            outcome = train_epoch(run.parts, run.train_loader, run.schedule, EpochPlan(0, 0, 75, 0), stop, 25,
                                  progress=False)
        assert outcome.stopped and outcome.step == 7  # the host's flag, read at no cost, every step
        stop.signum = None
        real = run.parts.loss_fn
        calls = [0]

        def loss_nan_at_step_30(logits, target):
            calls[0] += 1
            loss = real(logits, target)
            return loss * float("nan") if calls[0] == 30 else loss
        run.train_loader.set_epoch(1)
        parts = dataclasses.replace(run.parts, loss_fn=loss_nan_at_step_30)
        outcome = train_epoch(parts, run.train_loader, run.schedule, EpochPlan(1, 0, 75, 75), stop, 25,
                              progress=False)
    assert outcome.nonfinite == (26, 50) and outcome.step == 50 and not outcome.stopped


def test_the_state_is_typed_and_old_state_files_still_load():
    state = TrainState(epoch=3, step_in_epoch=5, global_batch=64, partial=EpochSums(1.5, 10, 20, 2.0),
                       best_val_acc=0.5, best_epoch=2)
    again = TrainState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert again == state and again.schema == SCHEMA
    # A trainer.json as the free-form dict of earlier versions wrote it.
    old = {"epoch": 1, "step_in_epoch": 2, "best_val_acc": 0.25, "best_epoch": 1, "train_time_s": 3.0,
           "started_at": "2026-01-01T00:00:00Z", "partial": {"loss_sum": 1.0, "correct": 2, "seen": 4, "elapsed": 0.5},
           "global_batch": 32, "global_step": 11}
    loaded = TrainState.from_dict(old)
    assert (loaded.epoch, loaded.step_in_epoch, loaded.partial.seen, loaded.global_batch) == (1, 2, 4, 32)
    assert loaded.position(steps_per_epoch=9, global_batch=16) == (1, 4)  # 2 steps of 32 = 4 of 16
    with pytest.raises(StateError, match="written by a newer version of the suite"):
        TrainState.from_dict({**old, "schema": SCHEMA + 1})


@pytest.mark.slow
def test_a_run_folder_saved_by_the_previous_version_resumes(cifar_dir, tmp_path):
    run_dir = tmp_path / "run"
    training.train(parse_config(TrainConfig, [*TINY_RUN, "--data-dir", str(cifar_dir), "--wandb", "off",
                                              "--epochs", "1", "--run-dir", str(run_dir)]))
    trainer = run_dir / "state" / "trainer.json"
    saved = json.loads(trainer.read_text())
    trainer.write_text(json.dumps({k: v for k, v in saved.items() if k not in ("schema", "saves")}))  # as before
    proc = run_cli("train.py", "--resume", str(run_dir), "--epochs", "2", config=None)
    assert "resumed at epoch 2, step 0" in proc.stdout and "epoch 2/2" in proc.stdout
    trainer.write_text(json.dumps({**json.loads(trainer.read_text()), "schema": SCHEMA + 1}))
    proc = run_cli("train.py", "--resume", str(run_dir), "--epochs", "3", config=None, check=False)
    assert proc.returncode == 2 and "written by a newer version of the suite" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_technique_declares_its_fields_checks_and_help_section():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    help_text = run_help()
    for technique in REGISTRY:
        assert technique.title in help_text, technique.title
        own = [f.name for f in dataclasses.fields(technique.fields)]
        assert set(own) <= fields, technique
        for name in own:
            assert f"--{name.replace('_', '-')}" in help_text.split(technique.title, 1)[1]
    assert [t.order for t in REGISTRY] == sorted(t.order for t in REGISTRY)
    assert len({t.order for t in REGISTRY}) == len(REGISTRY)  # the checkpoint order is fixed


def run_help() -> str:
    from resnet.config import build_parser

    return build_parser(TrainConfig, "").format_help()


def test_no_function_in_the_package_is_longer_than_80_lines():
    long = []
    for path in sorted((ROOT / "resnet").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_gpu_only_compile_modes_fall_back_to_default_on_a_cpu():
    said = []
    with mock.patch("torch.compile", side_effect=lambda model, mode: (model, mode)):
        assert training.compile_model("net", "reduce-overhead", torch.device("cpu"), said.append) == ("net", "default")
        assert training.compile_model("net", "max-autotune", torch.device("cuda"), said.append) == \
            ("net", "max-autotune")
    assert len(said) == 1 and "reduce-overhead: GPU-only" in said[0]


def test_the_step_takes_a_few_objects():
    from inspect import signature

    from resnet.engine import train_step

    assert list(signature(train_step).parameters) == ["parts", "x", "y", "meters"]
    assert len(dataclasses.fields(StepParts)) <= 5
