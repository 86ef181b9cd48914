"""Nothing lost, no promise broken: schedule across process counts, signals, non-finite loss, run folders
(saves, repeats and cut epochs: test_saves.py)."""
import csv
import hashlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY_RUN, run_cli, start_and_signal
from resnet import checkpoint, engine, training
from resnet.config import TrainConfig, parse_config
from resnet.interrupt import Stopped

pytestmark = pytest.mark.slow


def lrs(run_dir: Path) -> list[float]:
    return [float(r["lr"]) for r in csv.DictReader((run_dir / "metrics.csv").open())]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


SCHEDULE_RUN = [*TINY_RUN, "--wandb", "off", "--min-lr-ratio", "0.05"]


@pytest.fixture(scope="module")
def four_epochs(cifar_dir, tmp_path_factory) -> Path:
    """An uninterrupted 4-epoch run (one process, in this one: the lr at an epoch's end is a function of
    training progress, the same for any process count)."""
    run_dir = tmp_path_factory.mktemp("four") / "run"
    _train([*SCHEDULE_RUN, "--data-dir", str(cifar_dir), "--epochs", "4", "--run-dir", str(run_dir)])
    return run_dir


@pytest.mark.parametrize("first, second", [("cpu_ddp.yaml", "cpu.yaml"), ("cpu.yaml", "cpu_ddp.yaml")],
                         ids=["2->1", "1->2"])
def test_resume_with_another_process_count_keeps_the_schedule(cifar_dir, tmp_path, four_epochs, first, second):
    run_dir = tmp_path / "resumed"
    run_cli("train.py", *SCHEDULE_RUN, "--data-dir", str(cifar_dir), "--epochs", "2", "--run-dir", str(run_dir),
            config=first)
    proc = run_cli("train.py", "--resume", str(run_dir), "--epochs", "4", config=second)
    assert "resumed at epoch 3, step 0" in proc.stdout and "epoch 1/4" not in proc.stdout  # continued
    processes = 2 if second == "cpu_ddp.yaml" else 1
    assert f"global batch {32 * processes} ({processes} process{'es' if processes > 1 else ''} x 32)" in proc.stdout
    changes = next(line for line in proc.stdout.splitlines() if line.startswith("resuming with changes from epoch 3"))
    assert f"processes {3 - processes} -> {processes}" in changes and "--epochs 2.0 -> 4.0" in changes
    # More processes than saved: the extra one has no saved generators, and says so.
    assert ("note: process 1 has no saved random generators" in proc.stdout) == (processes == 2)
    resumed, straight = lrs(run_dir), lrs(four_epochs)
    assert len(resumed) == len(straight) == 4
    # Epochs 3 and 4 ran under the 4-epoch schedule: the same lr as an uninterrupted run at the same progress.
    assert resumed[2:] == pytest.approx(straight[2:], abs=1e-6)
    assert straight[2] > straight[3] > 0.1 * 0.05  # cosine at the start of epochs 3 and 4, above its floor
    # The position follows progress: epochs end at whole epochs of the steps of their own process count.
    steps = [int(r["step"]) for r in csv.DictReader((run_dir / "metrics.csv").open())]
    per_epoch = [300 // (32 * (2 if config == "cpu_ddp.yaml" else 1)) for config in (first, second)]
    assert steps == [per_epoch[0], 2 * per_epoch[0], 3 * per_epoch[1], 4 * per_epoch[1]]


# A net and batch that make an epoch last seconds, so a signal lands mid-epoch.
SLOW_EPOCH = ["--model", "resnet18_narrow_3m", "--batch-size", "2", "--val-split", "100", "--train-subset", "120",
              "--no-download", "--wandb", "off", "--epochs", "2", "--ema-decay", "0.9"]


@pytest.fixture(scope="module")
def uninterrupted(cifar_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run_cli("train.py", *SLOW_EPOCH, "--no-progress", "--data-dir", str(cifar_dir), "--run-dir", str(run_dir))
    return run_dir


def stop_mid_epoch(cifar_dir: Path, run_dir: Path, signum: int, *flags: str) -> dict:
    """Launch a run, send ``signum`` part-way through epoch 2; check the stop line; return trainer.json."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml"), "train.py",
           *SLOW_EPOCH, "--progress", "--data-dir", str(cifar_dir), "--run-dir", str(run_dir), *flags]
    # The progress bar of epoch 2 past its first steps: the signal lands mid-epoch.
    code, out, err = start_and_signal(cmd, signum, re.compile(r"epoch 2: +[1-4]\d%"))
    assert code != 0
    line = f"stopped by {signal.Signals(signum).name} at epoch 2, step "
    # The launch as it was (its config file), so the resume comes back the same way: tests/test_launch.py.
    assert line in err and f"launch --config_file {ROOT / 'accelerate_configs' / 'cpu.yaml'} train.py --resume " \
                           f"{run_dir}" in err
    # No traceback of ours (accelerate launch, interrupted itself, may print its own KeyboardInterrupt).
    assert "resnet/" not in err and 'train.py", line' not in err
    trainer = json.loads((run_dir / "state/trainer.json").read_text())
    assert trainer["epoch"] == 1 and 0 < trainer["step_in_epoch"] < 60
    assert trainer["step_in_epoch"] == int(re.search(r"at epoch 2, step (\d+)/60", err).group(1))
    return trainer


def test_ctrl_c_mid_epoch_saves_a_resumable_state(cifar_dir, tmp_path):
    trainer = stop_mid_epoch(cifar_dir, tmp_path / "run", signal.SIGINT)
    assert trainer["partial"]["seen"] == 2 * trainer["step_in_epoch"]  # the epoch's sums so far, for its row


def test_sigterm_to_the_process_group_with_loader_workers_saves_too(cifar_dir, tmp_path):
    """The group's SIGTERM reaches the DataLoader workers as well: they must leave the stop to the main process."""
    trainer = stop_mid_epoch(cifar_dir, tmp_path / "run", signal.SIGTERM, "--loader", "workers", "--workers", "2")
    assert trainer["partial"]["seen"] == 2 * trainer["step_in_epoch"]


def test_sigterm_mid_epoch_then_resume_matches_the_uninterrupted_run(cifar_dir, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    trainer = stop_mid_epoch(cifar_dir, run_dir, signal.SIGTERM)
    proc = run_cli("train.py", "--resume", str(run_dir), "--no-progress")
    assert f"resumed at epoch 2, step {trainer['step_in_epoch']}" in proc.stdout
    a, b = load_file(str(uninterrupted / "last.safetensors")), load_file(str(run_dir / "last.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    straight = list(csv.DictReader((uninterrupted / "metrics.csv").open()))
    resumed = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [r["epoch"] for r in resumed] == ["1", "2"]
    # The stopped epoch's train loss covers all of its steps, before and after the stop.
    assert float(resumed[1]["train_loss"]) == pytest.approx(float(straight[1]["train_loss"]), rel=1e-5)
    assert float(resumed[1]["val_acc"]) == float(straight[1]["val_acc"])


def test_a_non_finite_loss_stops_at_once_and_keeps_the_last_good_state(cifar_dir, tmp_path):
    run_dir = tmp_path / "run"
    flags = [*TINY_RUN, "--data-dir", str(cifar_dir), "--wandb", "off"]
    run_cli("train.py", *flags, "--epochs", "1", "--run-dir", str(run_dir), config=None)
    before = {p.name: digest(p) for p in [run_dir / "last.safetensors", run_dir / "state/trainer.json",
                                          run_dir / "metrics.csv"]}
    proc = run_cli("train.py", "--resume", str(run_dir), "--epochs", "3", "--lr", "1e30", "--warmup-epochs", "0",
                   config=None, check=False)
    assert proc.returncode == 3
    # Read back every --check-every steps: the message names the steps between two reads.
    assert re.search(r"error: the training loss became non-finite \(nan/inf\) at epoch 2, between steps 1 "
                     r"and 9 of 9; kept: the state and weights of epoch 1 in ", proc.stderr)
    assert "Traceback" not in proc.stderr
    after = {p.name: digest(p) for p in [run_dir / "last.safetensors", run_dir / "state/trainer.json",
                                         run_dir / "metrics.csv"]}
    assert after == before


def _train(args: list[str]) -> dict:
    return training.train(parse_config(TrainConfig, args))


def test_a_run_folder_holding_a_run_is_refused_unless_resume_or_overwrite(cifar_dir, tmp_path):
    args = [*TINY_RUN, "--data-dir", str(cifar_dir), "--epochs", "1", "--wandb", "off", "--run-dir", str(tmp_path)]
    (tmp_path / "notes.txt").write_text("mine")
    proc = run_cli("train.py", *args, config=None, check=False)
    assert proc.returncode == 2
    assert f"error: --run-dir {tmp_path}: already holds a run (notes.txt); pass --resume" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written
    _train([*args, "--overwrite"])
    assert not (tmp_path / "notes.txt").exists() and (tmp_path / "best.safetensors").is_file()
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["finished"] and summary["epochs_done"] == 1 and summary["params"] == 19_954


def test_generated_run_names_are_unique_within_one_second(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000" if "%H%M%S" in fmt else "t")
    args = [*TINY_RUN, "--data-dir", str(cifar_dir), "--epochs", "1", "--wandb", "off"]
    dirs = [_train(args)["run_dir"] for _ in range(2)]
    assert dirs == ["runs/resnet_tiny_20k-default-sgd-20260101-000000",
                    "runs/resnet_tiny_20k-default-sgd-20260101-000000-2"]
    for d in dirs:
        assert [r["epoch"] for r in csv.DictReader((tmp_path / d / "metrics.csv").open())] == ["1"]


def test_the_newest_run_is_the_one_trained_last_not_the_last_touched(tmp_path):
    from resnet.models import create_model

    model = create_model("resnet_tiny_20k")
    for name, age in (("old", 200), ("new", 100)):
        (tmp_path / name).mkdir()
        checkpoint.save_weights(tmp_path / name / "best.safetensors", model, {"model": "resnet_tiny_20k"})
        # Written ``age`` seconds ago (two writes can share a file-time tick: the test sets the times).
        os.utime(tmp_path / name / "best.safetensors", (time.time() - age, time.time() - age))
    (tmp_path / "old" / "eval_test.json").write_text("{}")  # evaluating the old run touches it last
    os.utime(tmp_path / "old", (time.time() + 100, time.time() + 100))
    assert checkpoint.newest_run(tmp_path) == tmp_path / "new"


def test_stopped_is_raised_in_process_with_the_resume_command(cifar_dir, tmp_path, monkeypatch):
    """The in-process API: a SIGTERM during the first step of epoch 1 saves state and raises Stopped."""
    real = engine.train_step
    monkeypatch.setattr(engine, "train_step", lambda *a: (real(*a), os.kill(os.getpid(), signal.SIGTERM)))
    with pytest.raises(Stopped) as info:
        _train([*TINY_RUN, "--data-dir", str(cifar_dir), "--epochs", "2", "--wandb", "off", "--run-dir",
                str(tmp_path / "r")])
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert f"--resume {tmp_path / 'r'}" in str(info.value)
    trainer = json.loads((tmp_path / "r/state/trainer.json").read_text())
    assert (trainer["epoch"], trainer["step_in_epoch"], trainer["partial"]["seen"]) == (0, 1, 32)
