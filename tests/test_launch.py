"""How a run was launched: the resume line repeats the launch, and a killed launcher stops the run with a save."""
import contextlib
import ctypes
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY_RUN, start_and_signal
from resnet.hardware import cpu_has_native_bf16

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
# The venv's scripts first: a printed `accelerate launch ...` then runs this venv's accelerate.
VENV_PATH = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
             "PYTHONUNBUFFERED": "1"}
needs_proc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads processes from /proc")


def resume_line(err: str) -> list[str]:
    return shlex.split(re.search(r"state saved\. Continue with: (.+)", err).group(1))


def header(out: str) -> str:
    """'N process(es) x B' and 'precision P' of a run's header line."""
    found = re.search(r"global batch \d+ \((\d+ process(?:es)? x \d+)\).*?, (precision \w+)", out)
    assert found, out[-2000:]
    return f"{found.group(1)}, {found.group(2)}"


# ------------------------------------------------------------------------------------------------
# The command, from a launcher's command line (or the environment without one)
@pytest.mark.parametrize("launcher, printed", [
    (["/opt/py/bin/python3", "/opt/py/bin/accelerate", "launch", "--config_file", "c d.yaml", "--num_processes", "2"],
     "/opt/py/bin/accelerate launch --config_file 'c d.yaml' --num_processes 2"),
    (["/opt/py/bin/python3", "/opt/py/bin/torchrun", "--nproc_per_node", "4"], "/opt/py/bin/torchrun --nproc_per_node 4"),
    (["python", "-m", "accelerate.commands.launch", "--mixed_precision", "bf16"],
     "python -m accelerate.commands.launch --mixed_precision bf16"),
], ids=["accelerate", "torchrun", "module"])
def test_the_command_keeps_the_launcher_and_its_options(monkeypatch, launcher, printed):
    from resnet import launch

    monkeypatch.setattr(sys, "argv", ["train.py", "--lr", "0.1"])
    # A shell above the launcher; the launcher's own command line ends in this process's argv.
    monkeypatch.setattr(launch, "_ANCESTORS", [(20, [*launcher, "train.py", "--lr", "0.1"]), (10, ["bash"])])
    assert launch.launch_command(["--resume", "runs/a b"]) == f"{printed} train.py --resume 'runs/a b'"


@pytest.mark.parametrize("env, printed", [
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "bf16"},
     "accelerate launch --multi_gpu --num_processes 2 --mixed_precision bf16"),
    ({"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "True"}, "accelerate launch --cpu"),
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "x"}, "torchrun --nproc_per_node 4 --nnodes 2"),
    ({}, "python -u"),
], ids=["accelerate-2", "accelerate-cpu", "torchrun", "python"])
def test_without_a_launcher_found_the_environment_tells_the_launch(monkeypatch, env, printed):
    from resnet import launch

    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU",
                 "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    monkeypatch.setattr(sys, "orig_argv", ["python", "-u", "train.py"])
    monkeypatch.setattr(launch, "_ANCESTORS", [(10, ["bash"])])  # a launcher not found (or no /proc)
    assert launch.launch_command(["--resume", "r"]) == f"{printed} train.py --resume r"


def test_a_sigterm_after_ctrl_c_leaves_the_stop_named_sigint():
    """Ctrl-C ends a 1-process launcher at once; its death then sends SIGTERM (watch_launcher): still Ctrl-C's stop."""
    from resnet.interrupt import StopRequest

    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.name == "SIGINT"


@needs_proc
def test_a_launcher_that_died_before_the_watch_asks_for_the_stop_at_once(monkeypatch):
    from resnet import launch
    from resnet.interrupt import StopRequest

    libc = ctypes.CDLL(None, use_errno=True)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with StopRequest() as stop:
        monkeypatch.setattr(launch, "_ANCESTORS", [(10, ["bash"])])  # a shell: left alone
        assert not launch.watch_launcher(stop) and not stop.requested
        # A launcher at start, and another parent now: it is gone, and its death signal with it.
        monkeypatch.setattr(launch, "_ANCESTORS", [(os.getppid() + 1, ["accelerate", "launch", "train.py"])])
        try:
            assert launch.watch_launcher(stop) and stop.name == "SIGTERM"
            signum = ctypes.c_int()
            assert libc.prctl(2, ctypes.byref(signum), 0, 0, 0) == 0 and signum.value == signal.SIGTERM  # GET_PDEATHSIG
        finally:
            libc.prctl(launch.PR_SET_PDEATHSIG, 0, 0, 0, 0)  # this test process keeps no watch


# ------------------------------------------------------------------------------------------------
# Real launches
@needs_proc
@pytest.mark.slow
@pytest.mark.parametrize("config, expected", [("cpu_ddp.yaml", "2 processes x 32, precision fp32"),
                                              ("bf16.yaml", "1 process x 32, precision bf16")],
                         ids=["2-processes", "bf16"])
def test_the_printed_resume_command_comes_back_with_the_same_launch(cifar_dir, tmp_path, config, expected):
    if "bf16" in expected and not (torch.accelerator.is_available() or cpu_has_native_bf16()):
        pytest.skip("this CPU trains a bf16 launch in fp32")
    run_dir = tmp_path / "run"
    # The config path relative, as a user types it: it stays so (the resume runs from the same folder).
    cmd = [ACCELERATE, "launch", "--config_file", f"accelerate_configs/{config}", "train.py", *TINY_RUN, "--progress",
           "--data-dir", str(cifar_dir), "--wandb", "off", "--run-dir", str(run_dir), "--epochs", "12"]
    code, out, err = start_and_signal(cmd, signal.SIGTERM, re.compile(r"epoch 1: "))
    assert code != 0 and header(out) == expected, out[-2000:] + err[-3000:]
    printed = resume_line(err)
    # Run as printed: the run's config.yaml holds its flags, so `--resume R` alone continues it.
    proc = subprocess.run(printed, cwd=ROOT, capture_output=True, text=True, timeout=300, env=VENV_PATH)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "resumed at epoch" in proc.stdout and header(proc.stdout) == expected
    assert Path(printed[0]).name == "accelerate"
    assert printed[1:] == ["launch", "--config_file", f"accelerate_configs/{config}", "train.py",
                           "--resume", str(run_dir)]


@needs_proc
@pytest.mark.slow
def test_a_python_launch_is_resumed_with_python(cifar_dir, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", *TINY_RUN, "--progress", "--data-dir", str(cifar_dir), "--wandb", "off",
           "--run-dir", str(run_dir), "--epochs", "12"]
    code, out, err = start_and_signal(cmd, signal.SIGTERM, re.compile(r"epoch 1: "))
    assert code == 143, err[-3000:]
    assert resume_line(err) == [sys.executable, "train.py", "--resume", str(run_dir)]


# ------------------------------------------------------------------------------------------------
# The launcher killed alone
def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: state, ppid, ...; [] once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and _stat(int(e.name))[1:2] == [str(pid)]]


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's new parent, maybe a container's init, may never reap it)."""
    return _stat(pid)[:1] not in ([], ["Z"])


@needs_proc
@pytest.mark.slow
def test_killing_the_launcher_alone_stops_the_run_with_a_save(cifar_dir, tmp_path):
    """`kill <accelerate launch pid>`: a 1-process launcher dies at once, passing nothing on. The run must not
    train on as an orphan: it finishes its step, saves, says how to resume, and exits."""
    run_dir = tmp_path / "run"
    cmd = [ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu.yaml", "train.py", *TINY_RUN, "--progress",
           "--data-dir", str(cifar_dir), "--wandb", "off", "--run-dir", str(run_dir), "--epochs", "1000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    out: list[str] = []
    err: list[str] = []
    training = threading.Event()

    def read_stderr() -> None:
        while chunk := proc.stderr.read(1):
            err.append(chunk)
            if not training.is_set() and "epoch 1: " in "".join(err[-200:]):
                training.set()

    readers = [threading.Thread(target=read_stderr, daemon=True),
               threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        assert training.wait(timeout=180), "".join(err)[-3000:]
        (child,) = _children(proc.pid)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 60
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(child), "train.py trains on after its launcher was killed"
        for reader in readers:
            reader.join(timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the launch (its group, even reparented)
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(err)
    assert re.search(r"stopped by SIGTERM at .*; state saved", text), text[-3000:]
    done = json.loads((run_dir / "state" / "trainer.json").read_text())["epoch"]
    assert done < 1000
    printed = resume_line(text)
    assert printed[1:] == ["launch", "--config_file", "accelerate_configs/cpu.yaml", "train.py",
                           "--resume", str(run_dir)]
    # Continue it (for two more epochs, not the 1000).
    resumed = subprocess.run([*printed, "--epochs", str(done + 2), "--no-progress"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300, env=VENV_PATH)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resumed at epoch" in resumed.stdout and f"epoch {done + 2}/{done + 2}" in resumed.stdout
