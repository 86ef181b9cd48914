"""resnet.hardware: the accelerate config it writes for this machine, the bare `accelerate launch` that then
trains in the fast precision without accelerate's warning, and the start-up hint when a run leaves bf16 unused.

RESNET_CPU_BF16=1/0 makes this CPU one with or without native bf16, so both kinds run on any machine."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import ROOT, TINY_RUN
from resnet import hardware

ACCELERATE_WARNING = "were not passed to `accelerate launch`"


def _env(home: Path, bf16: str, **extra: str) -> dict:
    """This environment with accelerate's config location at ``home`` and no ACCELERATE_* settings of its own;
    one thread (RESNET_THREADS), as the launches are mostly start-up and the cores are shared."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_") and k != "XDG_CACHE_HOME"}
    return {**env, "HF_HOME": str(home), hardware.FORCE_ENV: bf16, "PYTHONUNBUFFERED": "1", "RESNET_THREADS": "1",
            **extra}


def _write_config(env: dict, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resnet.hardware", "--write-accelerate-config", *flags], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def _bare_launch(env: dict, cifar_dir: Path, run_dir: Path, *launch_flags: str) -> subprocess.CompletedProcess:
    """The mission command's shape: `accelerate launch train.py ...`, no --config_file."""
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", *launch_flags, str(ROOT / "train.py"),
           *TINY_RUN, "--data-dir", str(cifar_dir), "--epochs", "1", "--run-dir", str(run_dir), "--wandb", "off"]
    proc = subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_written_config_makes_the_bare_launch_train_in_bf16_without_a_warning(cifar_dir, tmp_path):
    env = _env(tmp_path / "hf", bf16="1")
    proc = _write_config(env)
    path = tmp_path / "hf" / "accelerate" / "default_config.yaml"  # where accelerate launch looks, under HF_HOME
    assert proc.returncode == 0 and str(path) in proc.stdout, proc.stderr
    config = yaml.safe_load(path.read_text())
    assert config["mixed_precision"] == "bf16" and config["num_processes"] == 1
    assert config["distributed_type"] == "NO" and config["num_machines"] == 1

    run = _bare_launch(env, cifar_dir, tmp_path / "run")
    assert "precision bf16" in run.stdout, run.stdout
    assert ACCELERATE_WARNING not in run.stdout + run.stderr, run.stderr
    assert "hint:" not in run.stdout  # bf16 is the fast precision: nothing left unused


def test_without_native_bf16_the_config_says_fp32_and_the_run_trains_in_fp32(cifar_dir, tmp_path):
    env = _env(tmp_path / "hf", bf16="0")
    assert _write_config(env).returncode == 0
    config = yaml.safe_load((tmp_path / "hf" / "accelerate" / "default_config.yaml").read_text())
    assert config["mixed_precision"] == "no"

    run = _bare_launch(env, cifar_dir, tmp_path / "run")
    assert "precision fp32" in run.stdout, run.stdout
    assert ACCELERATE_WARNING not in run.stdout + run.stderr, run.stderr
    assert "hint:" not in run.stdout  # no faster precision on such a CPU


def test_an_fp32_run_on_a_cpu_with_native_bf16_hints_at_bf16_once(cifar_dir, tmp_path, monkeypatch, capsys):
    """The start-up of a run (setup_run, in this process: no launch needed for a default fp32 Accelerator)."""
    from accelerate.state import AcceleratorState

    from resnet.config import TrainConfig, parse_config
    from resnet.training import setup_run

    for name in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv(hardware.FORCE_ENV, "1")
    AcceleratorState._reset_state(reset_partial_state=True)  # other tests may have fixed the precision
    try:
        setup_run(parse_config(TrainConfig, [*TINY_RUN, "--data-dir", str(cifar_dir), "--run-dir",
                                             str(tmp_path / "run"), "--wandb", "off"]))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    out = capsys.readouterr().out
    assert "precision fp32" in out
    hints = [line for line in out.splitlines() if line.startswith("hint:")]
    assert len(hints) == 1 and "bf16" in hints[0] and "--write-accelerate-config" in hints[0], out


def test_an_existing_config_is_kept_unless_forced(tmp_path):
    path = tmp_path / "xdg" / "huggingface" / "accelerate" / "default_config.yaml"  # no HF_HOME: XDG_CACHE_HOME
    path.parent.mkdir(parents=True)
    path.write_text("mixed_precision: fp16\n")
    env = {**_env(tmp_path / "unused", bf16="1"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    del env["HF_HOME"]
    proc = _write_config(env)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert str(path) in proc.stderr and "--force" in proc.stderr
    assert path.read_text() == "mixed_precision: fp16\n"
    proc = _write_config(env, "--force")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(path.read_text())["mixed_precision"] == "bf16"


@pytest.mark.parametrize("gpus, bf16, expected", [
    (8, True, {"distributed_type": "MULTI_GPU", "num_processes": 8, "mixed_precision": "bf16", "gpu_ids": "all"}),
    (1, False, {"distributed_type": "NO", "num_processes": 1, "mixed_precision": "no", "gpu_ids": "all"}),
])
def test_gpus_get_every_gpu_and_bf16_where_native(monkeypatch, gpus, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16 or including_emulation)
    monkeypatch.setenv(hardware.FORCE_ENV, "1")  # the CPU's bf16 does not matter when there are GPUs
    config = hardware.accelerate_config_for_machine()
    assert {k: config[k] for k in expected} == expected
    assert config["num_machines"] == 1 and config["use_cpu"] is False


@pytest.mark.parametrize("device, precision, cpu_bf16, gpu_bf16, hint", [
    ("cpu", "no", "1", False, True),
    ("cpu", "bf16", "1", False, False),
    ("cpu", "no", "0", False, False),
    ("cuda", "no", "0", True, True),
    ("cuda", "no", "1", False, False),  # a GPU without native bf16: the CPU's does not count
    ("cuda", "fp16", "0", True, False),
])
def test_the_hint_fires_only_when_fp32_leaves_native_bf16_unused(monkeypatch, device, precision, cpu_bf16,
                                                                  gpu_bf16, hint):
    monkeypatch.setenv(hardware.FORCE_ENV, cpu_bf16)
    monkeypatch.setattr(hardware, "gpu_has_native_bf16", lambda: gpu_bf16)
    printed: list[str] = []
    accelerator = SimpleNamespace(mixed_precision=precision, device=torch.device(device), print=printed.append)
    hardware.print_precision_hint(accelerator)
    assert len(printed) == (1 if hint else 0)


def test_one_figure_for_the_emulated_bf16_slowdown():
    """10.8 images/s in bf16 against 199 in fp32 (the module docstring): about 18x, said the same way everywhere."""
    assert round(199 / 10.8) == 18 and "18x" in hardware.EMULATED_BF16_SLOWDOWN
    for path in [ROOT / "README.md", ROOT / "train.py", ROOT / "resnet" / "hardware.py",
                 *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        assert "9-18x" not in text and "10-18x" not in text, path.name
    assert hardware.EMULATED_BF16_SLOWDOWN in (ROOT / "README.md").read_text()
