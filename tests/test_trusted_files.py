"""What evaluate.py and predict.py take from a run folder or a weights file: data from the run's own folder,
metadata only once the weights bear it out, and "the newest run" by what happened here, not by what a file says."""
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, TINY_RUN, run_cli, write_custom_pickle
from resnet import checkpoint
from resnet.data import CLASSES, MEAN, STD
from resnet.models import create_model, list_models

MEMORY_LIMIT = 4 << 30  # address space: room for torch and a tiny net, not for a net of 100,000-wide layers


@pytest.fixture(scope="module")
def run(cifar_dir, tmp_path_factory) -> Path:
    """A one-epoch run trained on ``cifar_dir`` (its own --data-dir, not the default ~/.cache/cifar10)."""
    run_dir = tmp_path_factory.mktemp("trusted") / "run"
    run_cli("train.py", *TINY_RUN, "--data-dir", str(cifar_dir), "--epochs", "1", "--wandb", "off",
            "--run-dir", str(run_dir))
    return run_dir


def restamp(file: Path, **meta_overrides) -> None:
    """Rewrite ``file``'s metadata (the weights stay), as anyone handing out a file can."""
    meta = {**checkpoint.read_meta(file), **meta_overrides}
    save_file(load_file(str(file)), str(file), metadata={checkpoint.META_KEY: json.dumps(meta)})


@pytest.mark.slow
@pytest.mark.parametrize("split, weights", [("val", ""), ("test", "last.safetensors")])
def test_evaluate_reads_cifar10_from_the_runs_own_data_dir(run, tmp_path, split, weights):
    home = tmp_path / "home"  # an empty ~: CIFAR-10 is only where the run was trained from
    home.mkdir()
    out = tmp_path / f"{split}.json"
    proc = run_cli("evaluate.py", "--checkpoint", str(run / weights), "--split", split, "--no-download",
                   "--wandb", "off", "--out", str(out), config=None,
                   env={"HOME": str(home), "MPLCONFIGDIR": str(tmp_path / "mpl")})
    assert json.loads(out.read_text())["n"] == 100, proc.stdout
    assert not (home / ".cache" / "cifar10").exists()
    # --data-dir on the command line still wins over the run's own
    proc = run_cli("evaluate.py", "--checkpoint", str(run / weights), "--split", split, "--no-download",
                   "--wandb", "off", "--data-dir", str(tmp_path / "elsewhere"), "--out", str(out), config=None,
                   check=False, env={"HOME": str(home), "MPLCONFIGDIR": str(tmp_path / "mpl")})
    assert proc.returncode == 2 and f"{tmp_path / 'elsewhere'}" in proc.stderr, proc.stderr


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def predict_with_memory_limit(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """``python predict.py ARGS`` in an address space of MEMORY_LIMIT (run_cli takes no preexec_fn)."""
    return subprocess.run([sys.executable, "predict.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_limit_memory,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""})


@pytest.mark.slow
@pytest.mark.parametrize("declared, named", [
    ({"blocks": [1, 1, 1, 1], "widths": [100000] * 4},
     "size mismatch for stem.0.0.weight: [8, 3, 3, 3] in the file, [100000, 3, 3, 3] in the model"),
    ({"blocks": [1_000_000, 1, 1]}, "declares a resnet_tiny_20k of more than"),
], ids=["huge-widths", "a-million-blocks"])
def test_metadata_that_the_weights_do_not_bear_out_is_refused_before_building(tmp_path, declared, named):
    """A tiny net's weights under metadata declaring a huge one: refused from the file's header, in seconds and
    without allocating, not by running out of memory (or minutes) building the declared net."""
    file = tmp_path / "downloaded.safetensors"
    checkpoint.save_weights(file, create_model("resnet_tiny_20k", blocks=[1, 1, 1, 1], widths=[8, 16, 32, 64]),
                            {"model": "resnet_tiny_20k", "model_kwargs": declared, "classes": list(CLASSES),
                             "mean": list(MEAN), "std": list(STD)})
    write_custom_pickle(tmp_path / "x.pkl", "rows", n=5)
    started = time.monotonic()
    proc = predict_with_memory_limit("--checkpoint", str(file), "--data", str(tmp_path / "x.pkl"),
                                     "--out", str(tmp_path / "o.csv"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: {file}: ") and named in lines[0], lines[0]
    assert "allocate" not in lines[0] and time.monotonic() - started < 60
    assert not (tmp_path / "o.csv").exists()


def test_every_registered_net_builds_on_the_meta_device_as_it_does_for_real(tmp_path):
    """load_checkpoint checks a file against the net built on the meta device first: that net must be the real
    one's twin, or a good checkpoint would be refused."""
    for name in list_models():
        with torch.device("meta"):
            skeleton = create_model(name)
        real = create_model(name)
        assert [(k, v.shape) for k, v in skeleton.state_dict().items()] == \
               [(k, v.shape) for k, v in real.state_dict().items()], name
        checkpoint.save_weights(tmp_path / f"{name}.safetensors", real,
                                {"model": name, "model_kwargs": {}, "classes": list(CLASSES), "mean": list(MEAN),
                                 "std": list(STD)})
        model, _, _ = checkpoint.load_checkpoint(tmp_path / f"{name}.safetensors")
        assert all(torch.equal(model.state_dict()[k], v) for k, v in real.state_dict().items()), name


@pytest.mark.parametrize("meta, named", [
    ({"classes": ["a", "b"]}, "'classes' must be a list of 10 names"),
    ({"mean": [0.5, 0.5]}, "'mean' must be 3 numbers"),
    ({"model_kwargs": "blocks"}, "'model_kwargs' (a mapping)"),
    ({"model": "resnet_report_4m"}, "do not fit the model its metadata declares (resnet_report_4m: "),
])
def test_metadata_the_scripts_use_is_checked_with_one_line_naming_the_file(tmp_path, meta, named):
    file = tmp_path / "w.safetensors"
    checkpoint.save_weights(file, create_model("resnet_tiny_20k"),
                            {"model": "resnet_tiny_20k", "model_kwargs": {}, "classes": list(CLASSES),
                             "mean": list(MEAN), "std": list(STD), **meta})
    with pytest.raises(checkpoint.CheckpointError, match=f"^{re.escape(str(file))}: ") as info:
        checkpoint.load_checkpoint(file)
    assert named in str(info.value) and "\n" not in str(info.value)


def _two_runs(run: Path, root: Path) -> tuple[Path, Path]:
    """runs/downloaded (a copy of ``run``'s weights claiming to be trained in 2999), then runs/mine."""
    downloaded, mine = root / "runs" / "downloaded", root / "runs" / "mine"
    for folder in (downloaded, mine):
        folder.mkdir(parents=True)
    shutil.copyfile(run / "best.safetensors", downloaded / "best.safetensors")
    restamp(downloaded / "best.safetensors", trained_at="2999-01-01T00:00:00Z")
    return downloaded, mine


@pytest.mark.slow
def test_the_default_checkpoint_is_the_newest_here_not_the_one_claiming_the_latest_date(run, tmp_path):
    downloaded, mine = _two_runs(run, tmp_path)
    an_hour_ago = time.time() - 3600
    os.utime(downloaded / "best.safetensors", (an_hour_ago, an_hour_ago))  # placed here before mine was trained
    shutil.copyfile(run / "best.safetensors", mine / "best.safetensors")
    write_custom_pickle(tmp_path / "x.pkl", "rows", n=7)
    proc = run_cli(str(ROOT / "predict.py"), "--data", "x.pkl", "--out", "o.csv", config=None, cwd=tmp_path)
    assert "from runs/mine/best.safetensors" in proc.stdout, proc.stdout


def test_a_future_file_time_does_not_make_a_run_the_newest_for_ever(run, tmp_path):
    """An archive can carry any mtime; unpacking it sets the inode change time to now."""
    downloaded, mine = _two_runs(run, tmp_path)
    year_2999 = 32472144000
    os.utime(downloaded / "best.safetensors", (year_2999, year_2999))
    time.sleep(0.05)  # mine comes later on a coarse file clock too
    shutil.copyfile(run / "best.safetensors", mine / "best.safetensors")
    assert checkpoint.newest_run(tmp_path / "runs") == mine
    (mine / "best.safetensors").write_bytes(b"not a safetensors file")  # never ours: not a candidate
    assert checkpoint.newest_run(tmp_path / "runs") == downloaded
