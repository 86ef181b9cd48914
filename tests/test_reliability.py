"""Nothing lost, no promise broken: schedule across process counts, signals, non-finite loss, run folders."""
import csv
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, TINY_RUN, run_cli, start_and_signal
from resnet import checkpoint, training
from resnet.config import TrainConfig, parse_config
from resnet.interrupt import Stopped

pytestmark = pytest.mark.slow


def lrs(run_dir: Path) -> list[float]:
    return [float(r["lr"]) for r in csv.DictReader((run_dir / "metrics.csv").open())]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("first, second", [("cpu_ddp.yaml", "cpu.yaml"), ("cpu.yaml", "cpu_ddp.yaml")],
                         ids=["2->1", "1->2"])
def test_resume_with_another_process_count_keeps_the_schedule(cifar_dir, tmp_path, first, second):
    flags = [*TINY_RUN, "--data-dir", str(cifar_dir), "--wandb", "off", "--min-lr-ratio", "0.05"]
    run_cli("train.py", *flags, "--epochs", "2", "--run-dir", str(tmp_path / "resumed"), config=first)
    proc = run_cli("train.py", "--resume", str(tmp_path / "resumed"), "--epochs", "4", config=second)
    assert "resumed at epoch 3, step 0" in proc.stdout
    run_cli("train.py", *flags, "--epochs", "4", "--run-dir", str(tmp_path / "straight"), config=second)
    resumed, straight = lrs(tmp_path / "resumed"), lrs(tmp_path / "straight")
    assert len(resumed) == len(straight) == 4
    # Epochs 3 and 4 ran under the 4-epoch schedule: the same lr as an uninterrupted run at the same progress.
    assert resumed[2:] == pytest.approx(straight[2:], abs=1e-6)
    assert straight[2] > straight[3] > 0  # cosine half-way down, then the floor (min-lr-ratio 0.05 x 0.1)
    assert straight[3] == pytest.approx(0.1 * 0.05, abs=1e-6)


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
    assert line in err and f"accelerate launch train.py --resume {run_dir}" in err
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
    assert re.search(r"error: the training loss became non-finite \(nan/inf\) at epoch 2, step \d+/9; "
                     r"nothing was saved after epoch 1", proc.stderr)
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
    for name, when in (("old", "2026-01-01T00:00:00Z"), ("new", "2026-02-01T00:00:00Z")):
        (tmp_path / name).mkdir()
        checkpoint.save_weights(tmp_path / name / "best.safetensors", model, {"model": "resnet_tiny_20k"})
        meta = checkpoint.read_meta(tmp_path / name / "best.safetensors")
        assert meta["trained_at"]  # stamped by save_weights
        # Re-stamp with a known training time, as if trained at ``when``.
        from safetensors.torch import save_file
        state = load_file(str(tmp_path / name / "best.safetensors"))
        save_file(state, str(tmp_path / name / "best.safetensors"),
                  metadata={"resnet": json.dumps({**meta, "trained_at": when})})
    (tmp_path / "old" / "eval_test.json").write_text("{}")  # evaluating the old run touches it last
    os.utime(tmp_path / "old", (time.time() + 100, time.time() + 100))
    assert checkpoint.newest_run(tmp_path) == tmp_path / "new"


def test_stopped_is_raised_in_process_with_the_resume_command(cifar_dir, tmp_path, monkeypatch):
    """The in-process API: a stop request after the first step of epoch 1 saves state and raises Stopped."""
    real = training.train_one_epoch

    def stop_after_first_step(*a, **k):
        k["stop"] = lambda: True
        return real(*a, **k)

    monkeypatch.setattr(training, "train_one_epoch", stop_after_first_step)
    with pytest.raises(Stopped) as info:
        _train([*TINY_RUN, "--data-dir", str(cifar_dir), "--epochs", "2", "--wandb", "off", "--run-dir",
                str(tmp_path / "r")])
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert f"--resume {tmp_path / 'r'}" in str(info.value)
    trainer = json.loads((tmp_path / "r/state/trainer.json").read_text())
    assert (trainer["epoch"], trainer["step_in_epoch"], trainer["partial"]["seen"]) == (0, 1, 32)


# ------------------------------------------------------------------------------------------------
# A save cut at any point: the next --resume continues, losing at most the epoch in flight.
CRASH_RUN = [*TINY_RUN, "--wandb", "off", "--epochs", "3"]


@pytest.fixture(scope="module")
def three_epochs(cifar_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("three") / "run"
    run_cli("train.py", *CRASH_RUN, "--data-dir", str(cifar_dir), "--run-dir", str(run_dir), config=None)
    return run_dir


@pytest.mark.parametrize("point, resumes_at", [("tmp-incomplete", 2), ("before-swap", 3), ("between-renames", 3),
                                               ("before-cleanup", 3), ("mid-cleanup", 3)])
def test_a_kill_at_any_point_of_a_save_loses_at_most_the_epoch_in_flight(cifar_dir, tmp_path, three_epochs,
                                                                        point, resumes_at):
    run_dir = tmp_path / "run"
    killed = run_cli(str(ROOT / "tests" / "crash_probe.py"), point, "2", *CRASH_RUN, "--data-dir", str(cifar_dir),
                     "--run-dir", str(run_dir), config=None, check=False)
    assert killed.returncode == 137, killed.stderr[-2000:]
    # Killed while saving epoch 2 (its line comes after the save).
    assert "epoch 1/3" in killed.stdout and "epoch 2/3" not in killed.stdout
    proc = run_cli("train.py", "--resume", str(run_dir), config=None)
    assert f"resumed at epoch {resumes_at}, step 0" in proc.stdout
    # Saving goes on past any leftover, and one state folder remains.
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("state")) == ["state"]
    assert [r["epoch"] for r in csv.DictReader((run_dir / "metrics.csv").open())] == ["1", "2", "3"]
    a, b = load_file(str(three_epochs / "last.safetensors")), load_file(str(run_dir / "last.safetensors"))
    for k in a:  # exactly where the run that was never killed ended
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_a_leftover_state_old_never_stops_a_save(cifar_dir, tmp_path):
    """The review's case: a stale complete state.old/ beside state/ (a kill between the second rename and the
    clean-up, by an earlier version) made every later save fail with 'Directory not empty'."""
    run_dir = tmp_path / "run"
    run_cli("train.py", *TINY_RUN, "--wandb", "off", "--epochs", "1", "--data-dir", str(cifar_dir),
            "--run-dir", str(run_dir), config=None)
    shutil.copytree(run_dir / "state", run_dir / "state.old")
    (run_dir / "state.tmp").mkdir()  # and a save cut before its trainer.json
    (run_dir / "state.tmp" / "model.safetensors").write_bytes(b"half")
    proc = run_cli("train.py", "--resume", str(run_dir), "--epochs", "2", config=None)
    assert "resumed at epoch 2, step 0" in proc.stdout
    assert json.loads((run_dir / "state" / "trainer.json").read_text())["epoch"] == 2
    assert not (run_dir / "state.old").exists() and not (run_dir / "state.tmp").exists()


# ------------------------------------------------------------------------------------------------
# A saved config repeats the experiment, never the launch.
def test_repeating_a_run_from_its_config_leaves_that_run_untouched(cifar_dir, tmp_path):
    original = tmp_path / "R"
    run_cli("train.py", *TINY_RUN, "--data-dir", str(cifar_dir), "--wandb", "off", "--epochs", "1",
            "--run-dir", str(original), "--overwrite", config=None)
    saved = (original / "config.yaml").read_text()
    assert not {"run_dir", "resume", "overwrite"} & set(yaml.safe_load(saved))
    assert saved.startswith("# precision used: fp32")
    # A config.yaml as the suite saved it before: the launch fields included (the review's reproduction).
    legacy = tmp_path / "legacy.yaml"
    legacy.write_text(saved + f"run_dir: {original}\nresume: null\noverwrite: true\n")
    before = {p: digest(p) for p in original.rglob("*") if p.is_file()}
    work, train = tmp_path / "work", str(ROOT / "train.py")
    work.mkdir()
    run_cli(train, "--config", str(original / "config.yaml"), cwd=work, config=None)
    proc = run_cli(train, "--config", str(legacy), "--seed", "1", cwd=work, config=None)
    assert f"note: {legacy}: ignoring run_dir, overwrite: a saved config repeats the experiment" in proc.stderr
    run_cli(train, "--config", str(legacy), "--run-dir", str(tmp_path / "R2"), cwd=work, config=None)
    refused = run_cli(train, "--config", str(legacy), "--run-dir", str(original), cwd=work, config=None,
                      check=False)
    assert refused.returncode == 2 and f"--run-dir {original}: already holds a run" in refused.stderr
    assert {p: digest(p) for p in original.rglob("*") if p.is_file()} == before
    repeats = sorted((work / "runs").iterdir())
    assert len(repeats) == 2 and (tmp_path / "R2" / "best.safetensors").is_file()
    seeds = sorted(yaml.safe_load((r / "config.yaml").read_text())["seed"] for r in repeats)
    assert seeds == [0, 1]


# ------------------------------------------------------------------------------------------------
def test_a_longer_epochs_continues_a_cut_last_epoch_step_for_step(cifar_dir, tmp_path):
    """--epochs 1.5 ends inside epoch 2; --resume --epochs 3 must train its rest, then epoch 3: 27 updates."""
    run_dir = tmp_path / "run"
    flags = [*TINY_RUN, "--data-dir", str(cifar_dir), "--wandb", "off", "--opt", "adam", "--warmup-epochs", "0"]
    run_cli("train.py", *flags, "--epochs", "1.5", "--run-dir", str(run_dir), config=None)
    trainer = json.loads((run_dir / "state/trainer.json").read_text())
    assert (trainer["epoch"], trainer["step_in_epoch"]) == (1, 5)  # 9 steps an epoch, round(13.5) = 14 in all
    assert json.loads((run_dir / "summary.json").read_text())["epochs_done"] == pytest.approx(14 / 9)
    files = {p: digest(p) for p in run_dir.rglob("*") if p.is_file()}
    proc = run_cli("train.py", "--resume", str(run_dir), config=None)  # the same --epochs: nothing to do
    assert f"{run_dir} already trained 1.55556 epochs; pass --epochs N to train longer" in proc.stdout
    assert {p: digest(p) for p in run_dir.rglob("*") if p.is_file()} == files
    proc = run_cli("train.py", "--resume", str(run_dir), "--epochs", "3", config=None)
    assert "resumed at epoch 2, step 5" in proc.stdout
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "9"), ("2", "18"), ("3", "27")]
    optimizer = torch.load(run_dir / "state" / "optimizer.bin", weights_only=False)
    assert {int(s["step"]) for s in optimizer["state"].values()} == {27}  # every update made, none skipped
    # The lr follows the 27-step schedule from the step the run stopped at: cosine at 18 of 27 after epoch 2.
    assert float(rows[1]["lr"]) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 18 / 27)), rel=1e-4)


def test_the_first_update_after_a_batch_size_change_uses_the_new_lr(cifar_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    flags = [*TINY_RUN, "--data-dir", str(cifar_dir), "--wandb", "off", "--lr-unit", "image1024", "--lr", "0.4",
             "--warmup-epochs", "0", "--schedule", "linear"]
    _train([*flags, "--epochs", "1", "--run-dir", str(run_dir)])
    first_lr = []
    real_step = torch.optim.SGD.step

    def step(self, *a, **k):
        if not first_lr:
            first_lr.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    _train(["--resume", str(run_dir), "--epochs", "2", "--batch-size", "16"])
    # 0.4 per 1024 images at a global batch of 16, half-way down the linear schedule (epoch 2 of 2 starts).
    assert first_lr == [pytest.approx(0.4 * 16 / 1024 * 0.5)]
