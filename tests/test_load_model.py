"""``resnet.load_model`` / ``resnet.predict_images``: a run folder's net in Python, predicting as predict.py does.

Runs are tiny (1 epoch of the synthetic data). A ``--compile`` run is not trained here: torch.compile takes
about a minute on a 2-core CPU. Its saved weights carry no ``_orig_mod.`` prefix (training saves the unwrapped
net, ``keep_torch_compile=False``), so it loads as any other run.
"""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import resnet
from conftest import ROOT, TINY_RUN, write_custom_pickle
from resnet.checkpoint import CheckpointError

KINDS = {
    "plain": [],
    "ema": ["--ema-decay", "0.9"],
    # The whitening stem, and a run that validated with TTA level 2: predict_images must use it too.
    "whiten": ["--model", "resnet_airbench_whiten_2m", "--model-kwargs", '{"widths": [8, 16, 16]}', "--tta", "2"],
}


def _run_all(commands: list[list[str]]) -> None:
    """Run the scripts side by side (one thread each: most of their time is Python's imports), as run_cli does."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RESNET_THREADS": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cmd in commands]
    for cmd, proc in zip(commands, procs):
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}"


@pytest.fixture(scope="module")
def runs(cifar_dir, tmp_path_factory):
    """{kind: run folder}, the custom pickle, and {kind: predict.py's labels for it}."""
    root = tmp_path_factory.mktemp("load_model")
    pickle_path = root / "custom.pkl"
    write_custom_pickle(pickle_path, "nhwc", n=37)
    folders = {kind: root / kind for kind in KINDS}
    _run_all([["train.py", *TINY_RUN, "--epochs", "1", "--data-dir", str(cifar_dir), "--run-dir", str(folders[kind]),
               "--wandb", "off", *extra] for kind, extra in KINDS.items()])
    _run_all([["predict.py", "--checkpoint", str(folders[kind]), "--data", str(pickle_path),
               "--out", str(root / f"{kind}.csv")] for kind in KINDS])
    predicted = {}
    for kind in KINDS:
        with (root / f"{kind}.csv").open(newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["ID", "Labels"] and len(rows) == 38
        predicted[kind] = [int(label) for _, label in rows[1:]]
    return folders, pickle_path, predicted


def custom_images(pickle_path) -> np.ndarray:
    from resnet.data import load_custom_pickle

    return load_custom_pickle(pickle_path).images


@pytest.mark.parametrize("kind", list(KINDS))
def test_load_model_predicts_as_predict_py(runs, kind):
    folders, pickle_path, predicted = runs
    model = resnet.load_model(folders[kind])
    assert not model.training
    assert model.meta["file"] == str(folders[kind] / "best.safetensors")
    if kind == "whiten":
        assert model.meta["tta"] == 2 and model.meta["model"] == "resnet_airbench_whiten_2m"
    labels = resnet.predict_images(model, custom_images(pickle_path)).argmax(1).tolist()
    assert labels == predicted[kind]


def test_ema_run_loads_the_ema_weights_it_saved(runs):
    """best/last.safetensors of an EMA run hold the EMA's weights: load_model returns exactly those."""
    from safetensors.torch import load_file

    folder = runs[0]["ema"]
    model = resnet.load_model(folder, which="last")
    saved = load_file(str(folder / "last.safetensors"))
    state = model.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)


def test_which_last_and_a_file_and_bad_which(runs, tmp_path):
    folder = runs[0]["plain"]
    assert resnet.load_model(folder, which="last").meta["file"] == str(folder / "last.safetensors")
    assert resnet.load_model(folder / "last.safetensors").meta["file"] == str(folder / "last.safetensors")
    with pytest.raises(ValueError, match="'best' or 'last'"):
        resnet.load_model(folder, which="newest")
    only_last = tmp_path / "only_last"
    only_last.mkdir()
    (only_last / "last.safetensors").write_bytes((folder / "last.safetensors").read_bytes())
    assert resnet.load_model(only_last).meta["file"] == str(only_last / "last.safetensors")  # best, else last
    with pytest.raises(CheckpointError, match="not found"):
        resnet.load_model(tmp_path / "empty", which="last")


def test_predict_images_takes_rows_nhwc_and_tensors_and_a_tta_override(runs):
    folders, pickle_path, _ = runs
    model = resnet.load_model(folders["whiten"])
    nhwc = custom_images(pickle_path)
    rows = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)).reshape(len(nhwc), 3072)
    logits = resnet.predict_images(model, nhwc)
    assert logits.shape == (len(nhwc), 10) and logits.dtype == torch.float32
    assert torch.equal(resnet.predict_images(model, rows), logits)
    assert torch.equal(resnet.predict_images(model, torch.from_numpy(nhwc), batch_size=7), logits)
    assert not torch.allclose(resnet.predict_images(model, nhwc, tta=0), logits)  # the run's TTA 2 was used
    with pytest.raises(ValueError, match="mean and std"):
        resnet.predict_images(resnet.create_model("resnet_tiny_20k"), nhwc)
