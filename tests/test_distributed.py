"""Two real CPU processes (gloo) through accelerate launch with accelerate_configs/cpu_ddp.yaml."""
import csv
import json

import numpy as np
import pytest
import torch

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
                   "--wandb", "offline", config="cpu_ddp.yaml")
    assert "2 process(es)" in proc.stdout
    # Printing and file writing happen once, on the main process.
    assert proc.stdout.count("epoch 2/2") == 1
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    # Each rank saved its own RNG state; the model was written once.
    assert sorted(p.name for p in (run_dir / "state").glob("random_states_*")) == \
        ["random_states_0.pkl", "random_states_1.pkl"]
    assert np.isfinite(float(rows[-1]["val_loss"]))
