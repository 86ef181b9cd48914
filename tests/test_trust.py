"""Runs you can trust: a run folder is data, not code; nothing non-finite is kept as good; the records say
what the run did (a resume applies or refuses each change, best compares like with like, the lr column is
the lr the updates used); the techniques do what they say."""
import csv
import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_RUN, run_cli
from resnet import training
from resnet.checkpoint import load_checkpoint
from resnet.config import TrainConfig, parse_config

pytestmark = pytest.mark.slow
RUN = [*TINY_RUN, "--wandb", "off"]


def rows(run_dir: Path) -> list[dict]:
    return list(csv.DictReader((run_dir / "metrics.csv").open()))


# ------------------------------------------------------------------------------------------------
# A run folder is data: a planted pickle never runs, whatever file of state/ it replaces.
class Planted:
    """A pickle that runs a command when loaded (``__reduce__``), as a doctored run folder would hold."""

    def __init__(self, mark: Path):
        self.mark = mark

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.mark}",)


@pytest.fixture(scope="module")
def ema_run(cifar_dir, tmp_path_factory) -> Path:
    """A 1-epoch run with every technique that saves state of its own (EMA, lookahead-EMA)."""
    run_dir = tmp_path_factory.mktemp("ema") / "run"
    training.train(parse_config(TrainConfig, [*RUN, "--data-dir", str(cifar_dir), "--epochs", "1", "--run-dir",
                                              str(run_dir), "--ema-decay", "0.9", "--lookahead-ema", "2",
                                              "--lookahead-ema-start", "0"]))
    return run_dir


def test_no_file_of_a_run_folder_runs_code_when_resumed(ema_run, tmp_path):
    """Each file of state/ but trainer.json (the mark of a complete save) in turn replaced by a planted
    pickle, then a real resume: the command never runs, and the resume stops in one line naming the file."""
    planted = [f.name for f in sorted((ema_run / "state").iterdir()) if f.name != "trainer.json"]
    assert planted
    for name in planted:
        run_dir, mark = tmp_path / name / "run", tmp_path / name / "ran"
        shutil.copytree(ema_run, run_dir)
        (run_dir / "state" / name).write_bytes(pickle.dumps(Planted(mark)))
        proc = run_cli("train.py", "--resume", str(run_dir), "--epochs", "2", config=None, check=False)
        assert not mark.exists(), f"resuming ran the code planted in state/{name}"
        assert proc.returncode == 2, proc.stderr[-2000:]
        error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and str(run_dir / "state" / name) in error[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_a_state_saved_as_pickles_by_an_earlier_version_is_refused_unread(ema_run, tmp_path):
    run_dir, mark = tmp_path / "run", tmp_path / "ran"
    shutil.copytree(ema_run, run_dir)
    state = run_dir / "state"
    for f in state.iterdir():
        if f.name != "trainer.json":
            f.unlink()
    for name in ("optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"):  # accelerate's save_state
        (state / name).write_bytes(pickle.dumps(Planted(mark)))
    proc = run_cli("train.py", "--resume", str(run_dir), "--epochs", "2", config=None, check=False)
    assert proc.returncode == 2 and not mark.exists()
    assert "as pickles" in proc.stderr and "last.safetensors" in proc.stderr


def test_techniques_save_under_their_own_names_not_their_order(ema_run):
    from safetensors import safe_open

    with safe_open(str(ema_run / "state" / "techniques.safetensors"), framework="pt") as f:
        prefixes = {key.split("/", 1)[0] for key in f.keys()}
    assert prefixes == {"ema", "lookahead_ema"}


# ------------------------------------------------------------------------------------------------
# Nothing non-finite is ever good.
BLOW_UP = [*RUN, "--train-subset", "64", "--batch-size", "64", "--opt", "adam", "--warmup-epochs", "0"]


def test_a_blow_up_keeps_nothing_non_finite_and_the_kept_state_resumes_with_a_sane_lr(cifar_dir, tmp_path):
    # Blown up in the first epoch: nothing is kept, not as last, not as best, not as a state.
    fresh = tmp_path / "fresh"
    proc = run_cli("train.py", *BLOW_UP, "--data-dir", str(cifar_dir), "--epochs", "2", "--lr", "1e37",
                   "--run-dir", str(fresh), config=None, check=False)
    assert proc.returncode == 3 and "nothing was saved" in proc.stderr, proc.stderr[-2000:]
    assert not any((fresh / name).exists() for name in ("last.safetensors", "best.safetensors", "state"))

    # A good epoch, then a blow-up: the good epoch is kept, and named.
    run_dir = tmp_path / "run"
    run_cli("train.py", *BLOW_UP, "--data-dir", str(cifar_dir), "--epochs", "1", "--run-dir", str(run_dir),
            config=None)
    proc = run_cli("train.py", "--resume", str(run_dir), "--epochs", "2", "--lr", "1e37", config=None, check=False)
    assert proc.returncode == 3 and "kept: the state and weights of epoch 1" in proc.stderr, proc.stderr[-2000:]
    model, meta, _ = load_checkpoint(run_dir / "last.safetensors")
    assert meta["epoch"] == 1 and all(torch.isfinite(p).all() for p in model.parameters())
    assert [r["epoch"] for r in rows(run_dir)] == ["1"] and math.isfinite(float(rows(run_dir)[0]["val_loss"]))

    # ...and it resumes with a sane lr; the records say the lr changed at epoch 2 (not to the 1e37 never kept).
    proc = run_cli("train.py", "--resume", str(run_dir), "--epochs", "3", "--lr", "1e-3", config=None)
    assert "resumed at epoch 2, step 0" in proc.stdout
    assert [r["epoch"] for r in rows(run_dir)] == ["1", "2", "3"]
    assert all(math.isfinite(float(r["val_loss"])) for r in rows(run_dir))
    header = (run_dir / "config.yaml").read_text().splitlines()
    assert "# from epoch 2 (a resume): --lr its default -> 0.001" in header, header
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["lr"] == 1e-3
    changes = json.loads((run_dir / "summary.json").read_text())["changes"]
    assert {"epoch": 2, "flag": "--lr", "from": None, "to": 1e-3} in changes


# ------------------------------------------------------------------------------------------------
# The records say what the run did.
def test_a_resume_refuses_flags_it_would_not_apply_naming_each(cifar_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_cli("train.py", *RUN, "--data-dir", str(cifar_dir), "--epochs", "1", "--weight-decay", "5e-4",
            "--momentum", "0.9", "--run-dir", str(run_dir), config=None)
    before = (run_dir / "config.yaml").read_text()
    proc = run_cli("train.py", "--resume", str(run_dir), "--epochs", "2", "--weight-decay", "0.05",
                   "--momentum", "0.5", config=None, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "--weight-decay 0.05" in error[0] and "--momentum 0.5" in error[0], proc.stderr
    assert (run_dir / "config.yaml").read_text() == before and [r["epoch"] for r in rows(run_dir)] == ["1"]


def test_best_compares_scores_without_tta_and_the_tta_score_is_reported_beside(cifar_dir, tmp_path):
    run_dir = tmp_path / "run"
    training.train(parse_config(TrainConfig, [*RUN, "--data-dir", str(cifar_dir), "--epochs", "3", "--tta", "2",
                                              "--run-dir", str(run_dir)]))
    table = rows(run_dir)
    assert [bool(r["val_acc_tta"]) for r in table] == [False, False, True]  # TTA at the last epoch only
    accs = [float(r["val_acc"]) for r in table]
    best = accs.index(max(accs)) + 1
    _, meta, _ = load_checkpoint(run_dir / "best.safetensors")
    assert meta["epoch"] == best and meta["val_acc"] == pytest.approx(max(accs))
    # The last row's val_acc is the plain score of the last weights: evaluate.py without TTA agrees.
    proc = run_cli("evaluate.py", "--checkpoint", str(run_dir / "last.safetensors"), "--split", "val", "--tta", "0",
                   "--data-dir", str(cifar_dir), "--no-download", "--wandb", "off", "--out",
                   str(tmp_path / "val.json"), config=None)
    assert json.loads((tmp_path / "val.json").read_text())["accuracy"] == pytest.approx(accs[-1]), proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_val_acc"] == pytest.approx(max(accs))
    assert summary["final_val_acc_tta"] == pytest.approx(float(table[-1]["val_acc_tta"]))


def test_the_lr_column_is_the_lr_of_each_epochs_first_update(cifar_dir, tmp_path, monkeypatch):
    used = []
    real_step = torch.optim.SGD.step

    def step(self, *a, **k):
        used.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    run_dir = tmp_path / "run"
    training.train(parse_config(TrainConfig, [*RUN, "--data-dir", str(cifar_dir), "--epochs", "3", "--lr", "0.2",
                                              "--run-dir", str(run_dir)]))
    steps = 9  # 300 training images at batch 32
    assert len(used) == 3 * steps
    assert [float(r["lr"]) for r in rows(run_dir)] == pytest.approx(used[::steps], rel=1e-5)
    assert float(rows(run_dir)[-1]["lr"]) > 0  # not the floor after the last update, which no update used


# ------------------------------------------------------------------------------------------------
# Techniques that do what they say.
def test_the_ema_averages_the_weights_after_the_lookahead_ema_jump():
    from resnet.models import create_model
    from resnet.techniques import RunInfo, create_techniques

    torch.manual_seed(0)
    model = create_model("resnet_tiny_20k")
    cfg = parse_config(TrainConfig, ["--ema-decay", "0.9", "--lookahead-ema", "1", "--lookahead-ema-start", "0"])
    techniques = create_techniques(cfg, RunInfo(None, model, None, steps_per_epoch=10, total_steps=10))
    ema, lookahead = (next(t for t in techniques.all if type(t).__name__ == name) for name in ("Ema", "LookaheadEma"))
    weights = [p for p in model.parameters()]
    for step in (1, 2, 3):
        with torch.no_grad():  # an "update"
            for p in weights:
                p.add_(torch.randn_like(p) * 0.1)
        before = [p.detach().clone() for p in ema.average.module.parameters()]
        techniques.after_update(step)
    # The EMA moved towards the weights the run continues from (after the jump), by timm's warmed-up decay.
    decay = ema.average.get_decay(3)
    for average, prev, p in zip(ema.average.module.parameters(), before, weights):
        torch.testing.assert_close(average, prev * decay + p.detach() * (1 - decay), rtol=1e-5, atol=1e-6)
    assert lookahead.average.ema is not None  # the jump happened


def test_a_resume_in_another_precision_says_so_and_records_it(cifar_dir, tmp_path):
    run_dir, bf16 = tmp_path / "run", {"RESNET_CPU_BF16": "1"}  # bf16 even on a CPU without native support
    run_cli("train.py", *RUN, "--data-dir", str(cifar_dir), "--epochs", "1", "--run-dir", str(run_dir),
            config="bf16.yaml", env=bf16)
    proc = run_cli("train.py", "--resume", str(run_dir), "--epochs", "2", config="cpu.yaml")
    assert "resuming with changes from epoch 2: --epochs 1.0 -> 2.0, precision bf16 -> fp32" in proc.stdout
    header = (run_dir / "config.yaml").read_text().splitlines()
    assert header[0].startswith("# precision used: fp32") and "# from epoch 2 (a resume): precision bf16 -> fp32" in header


def test_a_state_that_does_not_fit_the_model_is_refused_naming_the_file(ema_run, tmp_path):
    from safetensors.torch import save_file

    from resnet.models import create_model

    run_dir = tmp_path / "run"
    shutil.copytree(ema_run, run_dir)
    other = create_model("resnet_tiny_20k", widths=[16, 32, 64])  # another net than the run's
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(run_dir / "state" / "model.safetensors"))
    proc = run_cli("train.py", "--resume", str(run_dir), "--epochs", "2", config=None, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{run_dir / 'state' / 'model.safetensors'}: cannot resume from it" in proc.stderr
    assert "size mismatch" in proc.stderr
