import contextlib
import os

import pytest
import torch
import torch.distributed as dist

from resnet.cli import run_script
from resnet.config import ConfigError, EvalConfig
from resnet.distributed import create_accelerator, scaled_lr, use_all_cores


def test_lr_scaling_rules():
    assert scaled_lr(0.1, "none", 8) == 0.1
    assert scaled_lr(0.1, "linear", 8) == pytest.approx(0.8)
    assert scaled_lr(0.1, "sqrt", 4) == pytest.approx(0.2)


@pytest.mark.parametrize("local_world_size", [1, 2])
def test_cpu_processes_get_their_share_of_the_cores(monkeypatch, local_world_size):
    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world_size))
    monkeypatch.delenv("RESNET_THREADS", raising=False)
    try:
        torch.set_num_threads(1)  # what accelerate launch leaves behind with OMP_NUM_THREADS=1
        use_all_cores()
        assert torch.get_num_threads() == max(1, cores // local_world_size)
        monkeypatch.setenv("RESNET_THREADS", "1")  # an explicit share wins
        use_all_cores()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_fp16_is_refused_on_cpu():
    from accelerate.state import AcceleratorState

    if torch.accelerator.is_available():
        pytest.skip("this machine has an accelerator")
    AcceleratorState._reset_state(reset_partial_state=True)  # other tests may have fixed the precision
    try:
        with pytest.raises(ConfigError, match="bf16"):
            create_accelerator(mixed_precision="fp16")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_native_bf16_follows_the_cpu_unless_overridden(monkeypatch):
    from resnet import hardware

    monkeypatch.delenv(hardware.FORCE_ENV, raising=False)
    assert hardware.cpu_has_native_bf16() == any(hardware.cpu_bf16_features().values())
    for value, expected in (("1", True), ("0", False)):
        monkeypatch.setenv(hardware.FORCE_ENV, value)
        assert hardware.cpu_has_native_bf16() is expected
    assert hardware.cpu_model() in hardware.describe_cpu()


def test_hardware_command_names_the_cpu_and_the_config_to_use():
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run([sys.executable, "-m", "resnet.hardware"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("CPU: ") and "bf16" in out.stdout
    assert any(f"accelerate_configs/{name}" in out.stdout for name in ("cpu.yaml", "bf16.yaml", "single_gpu.yaml"))


@pytest.mark.parametrize("ending", ["returns", "user error"])
def test_a_script_tears_its_process_group_down_on_the_way_out(tmp_path, ending):
    # A gloo rank that exits with its group alive can abort at exit (SIGABRT): a finished run reported as failed.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    seen = []

    def main(cfg):
        seen.append(dist.is_initialized())
        if ending == "user error":
            raise ConfigError("a bad flag")

    try:
        with pytest.raises(SystemExit) if ending == "user error" else contextlib.nullcontext():
            run_script(EvalConfig, main, "", [])
        assert seen == [True] and not dist.is_initialized()
    finally:
        if dist.is_initialized():  # never leak a group into the worker's next test
            dist.destroy_process_group()
