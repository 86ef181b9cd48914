"""Each training flag changes what training does: the final weights differ from the same run without it.

Real (tiny) training runs in-process on the synthetic data, one epoch of 4 steps each; a flag that were silently
ignored would leave the weights bit-for-bit equal to the baseline's, since the runs are deterministic
on CPU (same seed, same data order). Every run gets a fresh run folder.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_RUN
from resnet import training
from resnet.config import TrainConfig, parse_config

pytestmark = pytest.mark.slow


def _train(cifar_dir: Path, run_dir: Path, *flags: str) -> dict:
    # 128 images: 4 steps of 32, enough for every flag to leave its mark, and a few seconds a run.
    args = [*TINY_RUN, "--data-dir", str(cifar_dir), "--epochs", "1", "--train-subset", "128", "--wandb", "off",
            "--run-dir", str(run_dir), *flags]
    result = training.train(parse_config(TrainConfig, args))
    result["weights"] = {k: v.detach().cpu().clone() for k, v in result["model"].state_dict().items()}
    return result


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def run(cifar_dir, tmp_path_factory):
    """run(*flags) -> result of a fresh one-epoch training run with those flags (cached per flag set)."""
    cache: dict[tuple, dict] = {}

    def go(*flags: str) -> dict:
        if flags not in cache:
            cache[flags] = _train(cifar_dir, tmp_path_factory.mktemp("effects") / "run", *flags)
        return cache[flags]

    return go


def test_the_baseline_is_deterministic(run, cifar_dir, tmp_path):
    """Without this, 'differs from the baseline' would prove nothing."""
    again = _train(cifar_dir, tmp_path / "again")
    assert _equal(run()["weights"], again["weights"])


@pytest.mark.parametrize("flags", [("--mixup", "0.4"), ("--cutmix", "1.0")], ids=["mixup", "cutmix"])
def test_mixing_changes_training(run, flags):
    assert not _equal(run(*flags)["weights"], run()["weights"])


def test_clip_grad_clips_only_when_the_norm_is_larger(run):
    base = run()["weights"]
    assert not _equal(run("--clip-grad", "1e-4")["weights"], base)
    assert _equal(run("--clip-grad", "1e9")["weights"], base)  # never reached: exactly the baseline


def test_ema_weights_are_what_gets_saved(run):
    ema = run("--ema-decay", "0.9")
    # The EMA only watches: the trained model itself is the baseline's, bit for bit.
    assert _equal(ema["weights"], run()["weights"])
    run_dir = Path(ema["run_dir"])
    for name in ("last.safetensors", "best.safetensors"):
        saved = load_file(str(run_dir / name))
        assert not _equal(saved, ema["weights"]), f"{name} holds the raw weights, not the EMA"
    # Without EMA the saved weights are the model's own.
    assert _equal(load_file(str(Path(run()["run_dir"]) / "last.safetensors")), run()["weights"])


def test_a_long_run_ema_decay_still_follows_a_short_run(run):
    """The EMA warms up (timm's schedule): with a decay meant for 200 epochs, 4 steps still move it
    most of the way from the initial weights to the trained ones, instead of keeping the initial ones."""
    trained = run()["weights"]
    initial = run("--lr", "1e-30")["weights"]  # steps below float resolution: the weights stay the initial ones
    ema = load_file(str(Path(run("--ema-decay", "0.9999")["run_dir"]) / "last.safetensors"))
    for name, w in trained.items():
        if name.endswith("weight") and w.ndim > 1:
            assert torch.dist(ema[name], w) < 0.5 * torch.dist(initial[name], w), name


WORKERS = ("--loader", "workers", "--workers", "0")


@pytest.mark.parametrize("flags", [("--auto-augment", "rand-m9-mstd0.5"), ("--random-erasing", "0.5")],
                         ids=["auto-augment", "random-erasing"])
def test_per_image_policies_change_training(run, flags):
    assert not _equal(run(*WORKERS, *flags)["weights"], run(*WORKERS)["weights"])
