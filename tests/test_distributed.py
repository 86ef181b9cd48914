"""Two real CPU processes (gloo) through accelerate launch with accelerate_configs/cpu_ddp.yaml."""
import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY_RUN, run_cli, write_custom_pickle
from resnet.data import MEAN, STD, load_custom_pickle
from resnet.engine import evaluate
from resnet.distributed import create_accelerator
from resnet.loader import eval_loader
from resnet.models import create_model

pytestmark = pytest.mark.slow


def test_two_process_eval_counts_every_sample_once(tmp_path):
    n = 101  # uneven: 2 ranks x batches of 8 need padding that gather_for_metrics must drop
    truth = write_custom_pickle(tmp_path / "labeled.pkl", "rows", n=n, labels=True)
    run_cli(str(ROOT / "tests" / "ddp_eval_probe.py"), str(tmp_path / "labeled.pkl"), str(tmp_path),
            config="cpu_ddp.yaml")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert all(r["world_size"] == 2 for r in ranks)
    # Each rank saw about half before the gather...
    assert all(r["local_batches_images"] < n for r in ranks)
    # ...and after it, every sample exactly once, in input order.
    for r in ranks:
        assert r["n"] == n and r["targets"] == truth["labels"].tolist()

    # The single-process score of the same seeded model is exactly the same.
    accelerator = create_accelerator()
    torch.manual_seed(0)
    model = create_model("resnet_tiny_20k")
    data = load_custom_pickle(tmp_path / "labeled.pkl", need_labels=True)
    single = evaluate(model, accelerator.prepare(eval_loader(data.images, data.labels, 8)), accelerator, MEAN, STD)
    assert ranks[0]["preds"] == single["preds"].tolist()
    assert ranks[0]["acc"] == single["acc"]


def test_two_process_training_run_finishes(cifar_dir, tmp_path):
    run_dir = tmp_path / "ddp"
    proc = run_cli("train.py", *TINY_RUN, "--data-dir", str(cifar_dir), "--epochs", "2", "--run-dir", str(run_dir),
                   "--wandb", "offline", "--lr", "0.1", "--lr-scale", "linear", config="cpu_ddp.yaml")
    assert "global batch 64 (2 processes x 32), lr 0.2 (linear-scaled from 0.1)" in proc.stdout
    # Printing and file writing happen once, on the main process.
    assert proc.stdout.count("epoch 2/2") == 1
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    # Each rank saved its own RNG state; the model was written once.
    assert sorted(p.name for p in (run_dir / "state").glob("rng_*")) == ["rng_0.json", "rng_1.json"]
    assert np.isfinite(float(rows[-1]["val_loss"]))


def _probe_train(out_dir, config, *flags):
    out_dir.mkdir(parents=True, exist_ok=True)
    run_cli(str(ROOT / "tests" / "ddp_train_probe.py"), str(out_dir), *flags, config=config)
    return {p.stem: torch.load(p) for p in sorted(out_dir.glob("rank*.pt"))}


# No augmentation, so the only difference between 1 x 32 and 2 x 16 is per-process BatchNorm statistics.
# A gentle lr keeps that BatchNorm difference from compounding over the few steps compared.
SAME_GLOBAL_BATCH = [*TINY_RUN[:2], "--epochs", "1", "--val-split", "100", "--no-progress", "--no-download",
                     "--wandb", "off", "--hflip", "0", "--translate", "0", "--opt", "sgd", "--lr", "0.02",
                     "--warmup-epochs", "0"]


def test_ranks_agree_and_match_a_single_process_run_with_the_same_global_batch(cifar_dir, tmp_path):
    flags = [*SAME_GLOBAL_BATCH, "--data-dir", str(cifar_dir), "--ema-decay", "0.9"]
    two = _probe_train(tmp_path / "two", "cpu_ddp.yaml", *flags, "--batch-size", "16", "--run-dir",
                       str(tmp_path / "two_run"))
    one = _probe_train(tmp_path / "one", "cpu.yaml", *flags, "--batch-size", "32", "--run-dir",
                       str(tmp_path / "one_run"))
    assert sorted(r["rank"] for r in two.values()) == [0, 1]
    assert all(r["world_size"] == 2 for r in two.values()) and one["rank0"]["world_size"] == 1
    # After training, both ranks hold identical parameters (DDP keeps them in step).
    for k, v in two["rank0"]["state"].items():
        assert torch.equal(v, two["rank1"]["state"][k]), k
    # The EMA too, BatchNorm statistics included (each rank's follow its own batches until synced), and it is
    # the EMA that rank 0 saved: every rank validated the model that was written.
    saved = load_file(str(tmp_path / "two_run" / "last.safetensors"))
    for k, v in two["rank0"]["ema"].items():
        assert torch.equal(v, two["rank1"]["ema"][k]) and torch.equal(v, saved[k]), k
    # Same global batches, same seed: the loss agrees within a small tolerance.
    assert two["rank0"]["train_loss"] == pytest.approx(one["rank0"]["train_loss"], rel=0.03)
    drift = max((two["rank0"]["state"][k].float() - v.float()).abs().max().item()
                for k, v in one["rank0"]["state"].items() if "running_" not in k)  # weights, not BN buffers
    assert drift < 0.05


def test_sync_bn_is_refused_on_cpu(cifar_dir, tmp_path):
    proc = run_cli("train.py", *TINY_RUN, "--data-dir", str(cifar_dir), "--epochs", "1", "--wandb", "off",
                   "--run-dir", str(tmp_path / "s"), "--sync-bn", config=None, check=False)
    assert proc.returncode == 2 and "SyncBatchNorm runs on GPUs only" in proc.stderr
