"""W&B offline runs read back with W&B's own protobuf schema: keys, identity, summary, resume, evaluate, images."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import TINY_RUN, run_cli
from resnet.identity import run_group
from wandb_records import records

pytestmark = pytest.mark.slow


def read_run(offline_dir: Path) -> dict:
    """The run record, config, history rows and final summary of one offline-run-* folder."""
    out: dict = {"history": [], "summary": {}, "config": {}}
    value = json.loads
    for rec in records(next(offline_dir.glob("run-*.wandb"))):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = rec.run
        elif kind == "config":
            out["config"].update({i.key: value(i.value_json) for i in rec.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): value(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): value(i.value_json) for i in rec.summary.update})
    return out


@pytest.fixture(scope="module")
def wandb_run(cifar_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("wb") / "run"
    base = [*TINY_RUN, "--data-dir", str(cifar_dir), "--wandb", "offline", "--wandb-tags", "mine"]
    proc = run_cli("train.py", *base, "--epochs", "2", "--run-dir", str(run_dir))
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert f"W&B offline; upload later with: wandb sync {offline[0]}" in proc.stdout
    run_cli("train.py", "--resume", str(run_dir), "--epochs", "3", config=None)
    for split in ("test", "val"):
        run_cli("evaluate.py", "--checkpoint", str(run_dir), "--split", split, "--data-dir", str(cifar_dir),
                "--no-download", "--wandb", "offline", config=None)
    return run_dir


def test_one_wandb_run_across_resume_and_evaluate(wandb_run):
    runs = [read_run(d) for d in sorted((wandb_run / "wandb").glob("offline-run-*"))]
    assert len(runs) == 4  # train, resumed train, evaluate test, evaluate val: offline segments of one run
    run_id = (wandb_run / "wandb_run_id").read_text().strip()
    assert {r["run"].run_id for r in runs} == {run_id}

    config = yaml.safe_load((wandb_run / "config.yaml").read_text())
    first = runs[0]["run"]
    # The group follows the config: --epochs 3 on resume makes it another setup than the 2-epoch start.
    assert runs[1]["run"].run_group == run_group(config) == json.loads((wandb_run / "summary.json").read_text())["group"]
    assert first.run_group == run_group({**config, "epochs": 2}) != runs[1]["run"].run_group
    assert first.job_type == "train"
    assert first.display_name == "resnet_tiny_20k-default-sgd-seed0"
    assert {"resnet_tiny_20k", "sgd", "mine"} <= set(first.tags)
    logged = runs[0]["config"]
    assert logged["params"] == 19_954 and logged["lr"] is None and logged["model"] == "resnet_tiny_20k"
    assert {"torch", "accelerate", "timm"} <= set(logged)


def test_history_is_namespaced_one_row_per_epoch(wandb_run):
    runs = [read_run(d) for d in sorted((wandb_run / "wandb").glob("offline-run-*"))]
    rows = [r for run in runs[:2] for r in run["history"] if "train/loss" in r]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert {"train/loss", "train/acc", "val/loss", "val/acc", "lr", "perf/images_per_sec",
                "perf/epoch_time", "epoch"} <= set(row)
        assert not {"train_loss", "val_acc"} & set(row)  # the flat names are gone


def test_summary_holds_the_best_and_the_test_score(wandb_run):
    runs = [read_run(d) for d in sorted((wandb_run / "wandb").glob("offline-run-*"))]
    summary = json.loads((wandb_run / "summary.json").read_text())
    train = runs[1]["summary"]
    assert train["best/val_acc"] == pytest.approx(summary["best_val_acc"])
    assert train["best/epoch"] == summary["best_epoch"] and train["params"] == 19_954
    assert train["val/acc"]["max"] == pytest.approx(summary["best_val_acc"])  # define_metric(summary="max")
    assert train["train_time_s"] == pytest.approx(summary["train_time_s"])
    for split, run in zip(("test", "val"), runs[2:]):
        evaluated = json.loads((wandb_run / f"eval_{split}.json").read_text())
        assert run["summary"][f"eval/{split}/acc"] == pytest.approx(evaluated["accuracy"])
    # Scoring the validation split again leaves the training run's own val/acc alone.
    assert not any(k.startswith(("val/", "test/")) for run in runs[2:] for k in run["summary"])


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=float)


def test_augmented_batch_and_confusion_matrix_images(wandb_run):
    first = sorted((wandb_run / "wandb").glob("offline-run-*"))[0]
    grid = _png(next(first.glob("files/media/images/train/augmented_batch_*.png")))
    assert grid.shape[:2] == (4 * 34 + 2, 8 * 34 + 2)  # the 32 images of a batch, 8 a row, 2-pixel gaps
    assert grid.std() > 20  # 32 different images, not a blank or black square
    matrix = _png(next(first.glob("files/media/images/val/confusion_matrix_*.png")))
    assert matrix.std() > 20 and matrix.shape[1] > 400
    evaluated = sorted((wandb_run / "wandb").glob("offline-run-*"))[2]
    assert list(evaluated.glob("files/media/images/eval/test/confusion_matrix_*.png"))
    assert list(evaluated.glob("files/media/table/eval/test/per_class_accuracy_*.table.json"))
