"""Nothing lost in a save, a repeat or a resume: a kill at any point of a save, leftovers of earlier ones, a
run repeated from its config, a cut last epoch continued, the lr after a batch-size change."""
import csv
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, TINY_RUN, run_cli
from resnet import training
from resnet.config import TrainConfig, parse_config

pytestmark = pytest.mark.slow


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train(args: list[str]) -> dict:
    return training.train(parse_config(TrainConfig, args))


# ------------------------------------------------------------------------------------------------
# A save cut at any point: the next --resume continues, losing at most the epoch in flight.
CRASH_RUN = [*TINY_RUN, "--wandb", "off", "--epochs", "3"]


@pytest.fixture(scope="module")
def three_epochs(cifar_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("three") / "run"
    _train([*CRASH_RUN, "--data-dir", str(cifar_dir), "--run-dir", str(run_dir)])
    return run_dir


@pytest.mark.parametrize("point, resumes_at", [("tmp-incomplete", 2), ("before-swap", 3), ("between-renames", 3),
                                               ("before-cleanup", 3), ("mid-cleanup", 3)])
def test_a_kill_at_any_point_of_a_save_loses_at_most_the_epoch_in_flight(cifar_dir, tmp_path, three_epochs,
                                                                        point, resumes_at, capsys):
    run_dir = tmp_path / "run"
    killed = run_cli(str(ROOT / "tests" / "crash_probe.py"), point, "2", *CRASH_RUN, "--data-dir", str(cifar_dir),
                     "--run-dir", str(run_dir), config=None, check=False)
    assert killed.returncode == 137, killed.stderr[-2000:]
    # Killed while saving epoch 2 (its line comes after the save).
    assert "epoch 1/3" in killed.stdout and "epoch 2/3" not in killed.stdout
    _train(["--resume", str(run_dir)])
    assert f"resumed at epoch {resumes_at}, step 0" in capsys.readouterr().out
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
    _train([*TINY_RUN, "--wandb", "off", "--epochs", "1", "--data-dir", str(cifar_dir), "--run-dir", str(run_dir)])
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
    _train([*TINY_RUN, "--data-dir", str(cifar_dir), "--wandb", "off", "--epochs", "1", "--run-dir", str(original),
            "--overwrite"])
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
def test_a_longer_epochs_continues_a_cut_last_epoch_step_for_step(cifar_dir, tmp_path, capsys):
    """--epochs 1.5 ends inside epoch 2; --resume --epochs 3 must train its rest, then epoch 3: 27 updates."""
    run_dir = tmp_path / "run"
    flags = [*TINY_RUN, "--data-dir", str(cifar_dir), "--wandb", "off", "--opt", "adam", "--warmup-epochs", "0"]
    _train([*flags, "--epochs", "1.5", "--run-dir", str(run_dir)])
    trainer = json.loads((run_dir / "state/trainer.json").read_text())
    assert (trainer["epoch"], trainer["step_in_epoch"]) == (1, 5)  # 9 steps an epoch, round(13.5) = 14 in all
    assert json.loads((run_dir / "summary.json").read_text())["epochs_done"] == pytest.approx(14 / 9)
    files = {p: digest(p) for p in run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    _train(["--resume", str(run_dir)])  # the same --epochs: nothing to do
    assert f"{run_dir} already trained 1.55556 epochs; pass --epochs N to train longer" in capsys.readouterr().out
    assert {p: digest(p) for p in run_dir.rglob("*") if p.is_file()} == files
    proc = run_cli("train.py", "--resume", str(run_dir), "--epochs", "3", config=None)
    assert "resumed at epoch 2, step 5" in proc.stdout
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "9"), ("2", "18"), ("3", "27")]
    optimizer = torch.load(run_dir / "state" / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in optimizer["state"].values()} == {27}  # every update made, none skipped
    # The lr follows the 27-step schedule from the step the run stopped at: cosine at 18 of 27 as epoch 3 starts.
    assert float(rows[2]["lr"]) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 18 / 27)), rel=1e-4)


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
