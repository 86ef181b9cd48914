"""End to end through the real command line: train -> run folder -> evaluate -> predict, and resume."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY_RUN, run_cli, write_custom_pickle
from resnet import training
from resnet.config import TrainConfig, parse_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def trained_run(cifar_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    proc = run_cli("train.py", *TINY_RUN, "--data-dir", str(cifar_dir), "--epochs", "3", "--opt", "adam",
                   "--lr", "0.01", "--run-dir", str(run_dir), "--wandb", "offline")
    assert "global batch 32 (1 process x 32), lr 0.01 | resnet_tiny_20k" in proc.stdout
    assert "epoch 3/3" in proc.stdout
    return run_dir


def test_training_writes_a_complete_run_folder_and_learns(trained_run):
    for name in ("config.yaml", "metrics.csv", "curves.png", "best.safetensors", "last.safetensors",
                 "state/trainer.json"):
        assert (trained_run / name).is_file(), name
    rows = list(csv.DictReader((trained_run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_sec", "epoch_time"):
        assert float(rows[-1][key]) >= 0, key
    assert float(rows[-1]["val_acc"]) > 0.3  # chance is 0.1 on the synthetic classes
    assert json.loads((trained_run / "state/trainer.json").read_text())["epoch"] == 3


def test_wandb_offline_writes_its_run_files(trained_run):
    runs = list((trained_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")) and (runs[0] / "files").is_dir()


def test_checkpoint_metadata_rebuilds_the_model(trained_run):
    from resnet.checkpoint import load_checkpoint

    model, meta, file = load_checkpoint(trained_run)
    assert file.name == "best.safetensors" and meta["model"] == "resnet_tiny_20k"
    assert meta["classes"][0] == "airplane" and len(meta["mean"]) == 3
    state = load_file(str(file))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_evaluate_val_matches_the_best_training_score(trained_run, cifar_dir, tmp_path):
    out = tmp_path / "val.json"
    proc = run_cli("evaluate.py", "--checkpoint", str(trained_run), "--split", "val", "--data-dir", str(cifar_dir),
                   "--out", str(out), config=None)
    report = json.loads(out.read_text())
    rows = list(csv.DictReader((trained_run / "metrics.csv").open()))
    assert report["n"] == 100
    assert report["accuracy"] == pytest.approx(max(float(r["val_acc"]) for r in rows), abs=0.011)
    assert np.array(report["confusion_matrix"]).sum() == 100
    assert set(report["per_class_accuracy"]) >= {"airplane", "truck"}
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "per-class accuracy" in proc.stdout


def test_evaluate_test_split_and_labeled_pickle(trained_run, cifar_dir, tmp_path):
    run_cli("evaluate.py", "--checkpoint", str(trained_run / "last.safetensors"), "--data-dir", str(cifar_dir),
            "--tta", "2", config=None)
    assert json.loads((trained_run / "eval_test_tta2.json").read_text())["n"] == 100
    write_custom_pickle(tmp_path / "labeled.pkl", "nhwc", n=53, labels=True)
    run_cli("evaluate.py", "--checkpoint", str(trained_run), "--data", str(tmp_path / "labeled.pkl"),
            "--out", str(tmp_path / "l.json"), config=None)
    assert json.loads((tmp_path / "l.json").read_text())["n"] == 53


@pytest.mark.parametrize("layout", ["rows", "nhwc"])
def test_predict_writes_one_row_per_id_in_order(trained_run, tmp_path, layout):
    truth = write_custom_pickle(tmp_path / "custom_test.pkl", layout, n=41, labels=True)
    out = tmp_path / "submission.csv"
    run_cli("predict.py", "--data", str(tmp_path / "custom_test.pkl"), "--out", str(out),
            "--checkpoint", str(trained_run), config=None)
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["ID", "Labels"]
    assert [int(r[0]) for r in rows[1:]] == truth["ids"].tolist()
    labels = np.array([int(r[1]) for r in rows[1:]])
    assert set(labels) <= set(range(10))
    assert (labels == truth["labels"]).mean() > 0.3  # the predictions are the model's, not placeholders


def test_predict_defaults_to_the_newest_run(trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path / "runs" / "tiny", ignore=shutil.ignore_patterns("wandb", "state"))
    write_custom_pickle(tmp_path / "custom_test.pkl", "rows", n=12)
    proc = run_cli(str(ROOT / "predict.py"), "--data", "custom_test.pkl", "--out", "submission.csv", config=None,
                   cwd=tmp_path)
    assert "runs/tiny/best.safetensors" in proc.stdout
    assert len((tmp_path / "submission.csv").read_text().splitlines()) == 13


def test_bad_inputs_fail_with_one_clear_line(tmp_path, cifar_dir):
    proc = run_cli("predict.py", "--data", str(tmp_path / "missing.pkl"), "--checkpoint", str(tmp_path),
                   config=None, check=False)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("train.py", *TINY_RUN, "--data-dir", str(tmp_path), "--wandb", "off", config=None, check=False)
    assert proc.returncode == 2 and "put the official cifar-10-batches-py folder in" in proc.stderr
    proc = run_cli("train.py", "--hflip", "1.5", config=None, check=False)
    assert proc.returncode == 2 and "--hflip" in proc.stderr


def test_fp16_on_cpu_is_refused_with_advice(cifar_dir, tmp_path):
    proc = run_cli("train.py", *TINY_RUN, "--data-dir", str(cifar_dir), "--run-dir", str(tmp_path / "r"),
                   "--wandb", "off", config="fp16.yaml", check=False)
    assert proc.returncode != 0 and "bf16" in proc.stderr


def test_every_augmentation_through_the_cli(cifar_dir, tmp_path):
    """In bf16 on any CPU (RESNET_CPU_BF16=1: the numerics are under test here, not the speed)."""
    proc = run_cli("train.py", *TINY_RUN, "--data-dir", str(cifar_dir), "--epochs", "1", "--run-dir",
                   str(tmp_path / "r"), "--wandb", "off", "--crop-scale", "0.35", "--rotation", "15", "--vflip", "0.5",
                   "--color-jitter", "0.4", "--hue", "0.1", "--blur-sigma", "1.5", "--cutout", "8", "--mixup", "0.2",
                   "--cutmix", "1.0", "--ema-decay", "0.9", "--clip-grad", "5", "--activation", "gelu", "--opt",
                   "nesterov", config="bf16.yaml", env={"RESNET_CPU_BF16": "1"})
    assert (tmp_path / "r" / "best.safetensors").is_file()
    assert "precision bf16" in proc.stdout and "not the bf16 asked for" not in proc.stdout
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["precision"] == "bf16"


def test_bf16_on_a_cpu_without_native_bf16_trains_in_fp32_and_says_so(cifar_dir, tmp_path):
    """RESNET_CPU_BF16=0 makes this CPU one without AVX512-BF16 or AMX, as most laptops are."""
    proc = run_cli("train.py", *TINY_RUN, "--data-dir", str(cifar_dir), "--epochs", "1", "--run-dir",
                   str(tmp_path / "r"), "--wandb", "off", config="bf16.yaml", env={"RESNET_CPU_BF16": "0"})
    lines = [line for line in proc.stdout.splitlines() if "not the bf16 asked for" in line]
    assert len(lines) == 1 and lines[0].startswith("precision: fp32, not the bf16 asked for: this CPU (")
    assert "precision fp32" in proc.stdout
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["precision"] == "fp32"
    assert (tmp_path / "r" / "config.yaml").read_text().startswith("# precision used: fp32")


def _train_in_process(args: list[str]) -> dict:
    return training.train(parse_config(TrainConfig, args))


def test_resume_after_a_crash_continues_exactly(cifar_dir, tmp_path, monkeypatch):
    args = [*TINY_RUN, "--data-dir", str(cifar_dir), "--epochs", "3", "--wandb", "off", "--ema-decay", "0.5"]
    straight = _train_in_process([*args, "--run-dir", str(tmp_path / "a")])

    real_epoch = training.train_epoch

    def crash_in_epoch_3(parts, loader, schedule, plan, *a, **k):
        if plan.epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(parts, loader, schedule, plan, *a, **k)

    monkeypatch.setattr(training, "train_epoch", crash_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        _train_in_process([*args, "--run-dir", str(tmp_path / "b")])
    assert json.loads((tmp_path / "b/state/trainer.json").read_text())["epoch"] == 2
    monkeypatch.setattr(training, "train_epoch", real_epoch)
    resumed = _train_in_process(["--resume", str(tmp_path / "b")])

    assert resumed["epoch"] == 3 and resumed["step"] == straight["step"]
    assert resumed["val_acc"] == straight["val_acc"]
    a, b = load_file(str(tmp_path / "a/last.safetensors")), load_file(str(tmp_path / "b/last.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    rows = list(csv.DictReader((tmp_path / "b/metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]


def test_worker_loader_with_timm_policies(cifar_dir, tmp_path):
    proc = run_cli("train.py", *TINY_RUN, "--data-dir", str(cifar_dir), "--epochs", "1", "--run-dir",
                   str(tmp_path / "r"), "--wandb", "off", "--loader", "workers", "--workers", "1",
                   "--auto-augment", "rand-m9-mstd0.5", "--random-erasing", "0.25", "--cutout", "4",
                   "--lookahead", "--tta", "2")
    assert "epoch 1/1" in proc.stdout and (tmp_path / "r" / "best.safetensors").is_file()


def test_evaluate_and_predict_default_to_the_runs_own_tta_level(trained_run, cifar_dir, tmp_path):
    from safetensors.torch import save_file

    from resnet.checkpoint import read_meta

    run = tmp_path / "run"
    run.mkdir()
    meta = read_meta(trained_run / "best.safetensors")
    assert meta["tta"] == 0  # the fixture validated without TTA
    save_file(load_file(str(trained_run / "best.safetensors")), str(run / "best.safetensors"),
              metadata={"resnet": json.dumps({**meta, "tta": 2})})  # as if trained with --tta 2
    proc = run_cli("evaluate.py", "--checkpoint", str(run), "--data-dir", str(cifar_dir), "--wandb", "off",
                   config=None)
    assert "test-time augmentation level 2 (the run's own validation setting)" in proc.stdout
    assert json.loads((run / "eval_test_tta2.json").read_text())["tta"] == 2
    write_custom_pickle(tmp_path / "t.pkl", "rows", n=12)
    proc = run_cli("predict.py", "--data", str(tmp_path / "t.pkl"), "--out", str(tmp_path / "s.csv"),
                   "--checkpoint", str(run), "--tta", "0", config=None)
    assert "test-time augmentation level 0 (as asked)" in proc.stdout
