"""Progress (issue 26): the whole run's time left, plain lines in a log file, the closing line, fractional
epochs said in steps and epochs that agree, and a grid dry run's time estimate."""
import io
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_RUN
from resnet import grid, progress
from resnet.progress import EpochProgress, RunClock, closing_line, duration, epoch_position


class FakeTime:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock_time(monkeypatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(progress.time, "perf_counter", fake)
    return fake


def test_durations_and_positions_in_steps_and_epochs_that_agree():
    assert [duration(s) for s in (0.4, 45, 750, 3 * 3600 + 5 * 60)] == ["0s", "45s", "12m 30s", "3h 05m"]
    assert epoch_position(2, 30, 10, 400) == "epoch 3/40"  # whole epochs: as before, no fraction
    assert epoch_position(0, 2, 9, 2) == "epoch 1/1 (2/9 steps: 0.222 of an epoch)"  # --epochs 0.2 at 9 steps
    assert epoch_position(0, 9, 9, 11) == "epoch 1/2"
    assert epoch_position(1, 11, 9, 11) == "epoch 2/2 (2/9 steps: 1.22 epochs in all, 11 steps)"


def test_time_left_from_measured_steps_without_the_first_and_measured_epoch_ends(clock_time):
    clock = RunClock(total_steps=20, steps_per_epoch=10)
    shown = EpochProgress(clock, 0, 10, 0, 0, enabled=False)
    clock_time.now += 30  # the first step: compiling
    shown.step(1, 1)
    assert clock.left_text(1, 0) is None  # nothing measured yet: nothing "left"
    for step in range(2, 5):
        clock_time.now += 1.0
        shown.step(step, step)
    shown.read(4, 2.0, 0.1)  # 3 timed steps in 3 s
    assert clock.left(4, 0) == (16.0, False)
    assert clock.left_text(4, 0) == "16s left (training; validation not timed yet)"
    for step in range(5, 11):
        clock_time.now += 1.0
        shown.step(step, step)
    shown.read(10, 1.5, 0.1)
    shown.close(10)
    clock_time.now += 4.0  # validation and saves
    clock.plan([True, True], tta=1)
    clock.ended(validated=True)
    # 10 steps at 1 s, then the last epoch's end: its validation x3 (plain + a 2-view TTA)
    assert clock.left(10, 1) == (10.0 + 12.0, True)
    assert clock.left_text(10, 1) == "22s left"
    assert clock.epoch_seconds() == 14.0


def test_a_log_file_gets_a_plain_line_every_10_percent_and_no_carriage_returns(clock_time):
    log = io.StringIO()  # not a terminal
    clock = RunClock(total_steps=60, steps_per_epoch=30)
    clock.warm = True  # a later epoch: every step timed
    shown = EpochProgress(clock, 0, 30, 0, 0, enabled=True, stream=log)
    for step in range(1, 31):
        clock_time.now += 0.5
        shown.step(step, step)
        if step % 5 == 0:
            shown.read(step, 3.0 - step / 30, 0.1)
    shown.close(30)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 10
    assert lines[0] == "epoch 1: 10% (3/30 steps)"  # no read yet: no loss, nothing measured
    assert lines[4] == "epoch 1: 50% (15/30 steps), loss 2.500, 22s left (training; validation not timed yet)"
    assert lines[-1].startswith("epoch 1: 100% (30/30 steps), loss 2.000, 15s left")
    quiet = io.StringIO()
    EpochProgress(clock, 1, 30, 0, 30, enabled=False, stream=quiet).step(30, 60)  # --no-progress
    assert quiet.getvalue() == ""


def test_a_terminal_gets_the_bar_with_the_time_left(clock_time):
    screen = Terminal()
    clock = RunClock(total_steps=40, steps_per_epoch=20)
    clock.warm = True
    shown = EpochProgress(clock, 0, 20, 0, 0, enabled=True, stream=screen)
    for step in range(1, 21):
        clock_time.now += 1.0
        shown.step(step, step)
        if step % 5 == 0:
            shown.read(step, 1.0, 0.1)
    shown.close(20)
    frames = screen.getvalue()
    assert "\r" in frames and "epoch 1/2" in frames and "loss=1.000, lr=0.1, left=25s+val" in frames
    assert "% (" not in frames  # no plain lines on a terminal


def test_closing_line_names_the_best_or_the_last_weights(tmp_path):
    line = closing_line(tmp_path / "r", 0.9123, 38, True, 40.0, 750)
    assert line == (f"done: best val acc 0.9123 at epoch 38 ({tmp_path}/r/best.safetensors) in 12m 30s; hand in "
                    f"with: python predict.py --checkpoint {tmp_path}/r --data custom_test.pkl --out submission.csv")
    line = closing_line(tmp_path / "r", -1.0, None, False, 2.22, 30)
    assert line.startswith("done: trained 2.22 epochs without validation in 30s; last weights "
                           f"{tmp_path}/r/last.safetensors")
    assert line.endswith(f"--checkpoint {tmp_path}/r/last.safetensors --data custom_test.pkl --out submission.csv")


def test_a_grid_dry_run_estimates_from_measured_runs_or_says_there_are_none(tmp_path, capsys):
    exp = tmp_path / "exp"
    args = [str(exp), "--set", "opt=sgd,adam", "--dry-run", "--", "--epochs", "4"]
    assert grid.main(args) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2 and "no time estimate: no run in" in err  # stdout: only the commands
    done = exp / "opt-sgd_seed-0"
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps({"finished": True, "epochs_done": 4, "train_time_s": 100.0,
                                                   "seconds_per_epoch": 30.0}))
    assert grid.main(args) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1  # the finished run is skipped
    assert "dry run: 1 launch, 4 epochs, about 2m 00s plus start-ups (measured: 30s an epoch, mean of 1 run" in err


@pytest.mark.slow
def test_a_run_logged_to_a_file_has_plain_progress_the_time_left_and_a_closing_line(cifar_dir, tmp_path):
    """A real run, stderr to a file: no tqdm frames; --epochs 1.2 at 9 steps an epoch trains 11 steps."""
    run_dir = tmp_path / "r"
    flags = [f for f in TINY_RUN if f != "--no-progress"]
    with open(tmp_path / "err.log", "w") as err:
        proc = subprocess.run([sys.executable, "train.py", *flags, "--data-dir", str(cifar_dir), "--wandb", "off",
                               "--epochs", "1.2", "--check-every", "3", "--run-dir", str(run_dir)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, timeout=240, check=False,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = (tmp_path / "err.log").read_text()
    assert proc.returncode == 0, proc.stdout[-2000:] + log[-3000:]
    assert "\r" not in log
    plain = [line for line in log.splitlines() if line.startswith("epoch ")]
    assert plain[0] == "epoch 1: 11% (1/9 steps)" and plain[-1].startswith("epoch 2: 100% (2/2 steps), loss ")
    assert any(line.startswith("epoch 1: 33% (3/9 steps), loss ") and "s left (training; validation not timed "
               "yet)" in line for line in plain), plain
    lines = proc.stdout.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert epochs[0].startswith("epoch 1/2 | ") and epochs[0].endswith("s left"), epochs
    assert epochs[1].startswith("epoch 2/2 (2/9 steps: 1.22 epochs in all, 11 steps) | ") and "left" not in epochs[1]
    assert lines[-1].startswith("done: best val acc ") and lines[-1].endswith(
        f"hand in with: python predict.py --checkpoint {run_dir} --data custom_test.pkl --out submission.csv")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps_done"], summary["steps"], summary["steps_per_epoch"]) == (11, 11, 9)
    assert summary["epochs_done"] == pytest.approx(11 / 9) and summary["epochs"] == 1.2
    assert summary["seconds_per_epoch"] > 0
