"""Fixtures: tiny synthetic CIFAR-10 in the official pickle layout, custom test pickles, CLI helpers.

The synthetic images are learnable on purpose (each class has its own mean colour plus noise), so a
test can check that a short run really learns instead of only that it runs.
"""
from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Under pytest-xdist the workers share the cores: one thread per process (inherited by every launch), as
# two processes of two threads each spend much of their time waiting on each other's cores.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["RESNET_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"
PER_BATCH = 80  # 5 train batches -> 400 images; test batch -> 100


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3072) uint8 rows in CIFAR's channel-first order, and labels cycling over the 10 classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    palette = np.random.default_rng(1234).integers(30, 225, size=(10, 3))
    base = palette[labels][:, :, None, None]  # (n, 3, 1, 1)
    pixels = base + rng.normal(0, 25, size=(n, 3, 32, 32))
    return np.clip(pixels, 0, 255).astype(np.uint8).reshape(n, 3072), labels


def write_official_batch(path: Path, rows: np.ndarray, labels: np.ndarray, bytes_keys: bool) -> None:
    """A batch file as the official Python-2 pickles read back: bytes keys or str keys, protocol 2."""
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    batch = {k("batch_label"): k("synthetic"), k("labels"): labels.tolist(), k("data"): rows,
             k("filenames"): [k(f"img_{i}.png") for i in range(len(rows))]}
    path.write_bytes(pickle.dumps(batch, protocol=2))


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """A data folder holding cifar-10-batches-py/ with 400 train and 100 test images."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        rows, labels = synthetic_images(PER_BATCH, seed=i)
        write_official_batch(folder / f"data_batch_{i}", rows, labels, bytes_keys=i % 2 == 0)
    rows, labels = synthetic_images(100, seed=99)
    write_official_batch(folder / "test_batch", rows, labels, bytes_keys=True)
    return root


def write_custom_pickle(path: Path, layout: str, n: int = 37, labels: bool = False, str_keys: bool = False,
                        seed: int = 7) -> dict:
    """A course-style test pickle: data (N,3072) ('rows', 2024 file) or (N,32,32,3) ('nhwc', 2025 file)."""
    rows, y = synthetic_images(n, seed)
    data = rows if layout == "rows" else rows.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    k = (lambda s: s) if str_keys else (lambda s: s.encode())
    obj = {k("data"): data, k("ids"): np.arange(1000, 1000 + n)}
    if labels:
        obj[k("labels")] = y
    path.write_bytes(pickle.dumps(obj))
    return {"ids": obj[k("ids")], "labels": y, "rows": rows}


def run_cli(*args: str, config: str | None = "cpu.yaml", timeout: int = 300, check: bool = True,
            env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run a script through the real ``accelerate launch`` (or plain python when config is None)."""
    if config:
        cmd = [str(Path(sys.executable).with_name("accelerate")), "launch",
               "--config_file", str(ROOT / "accelerate_configs" / config), *args]
    else:
        cmd = [sys.executable, *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def start_and_signal(cmd: list[str], signum: int, when: re.Pattern, timeout: float = 240,
                     group: bool = True) -> tuple[int, str, str]:
    """Run ``cmd`` in its own process group and send ``signum`` to the group once stderr matches ``when``,
    as Ctrl-C or a scheduler's preemption does (``group=False``: to the process alone, as ``kill PID``).
    Returns (exit code, stdout, stderr)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    err: list[str] = []
    sent = threading.Event()

    def read_stderr() -> None:
        while chunk := proc.stderr.read(1):
            err.append(chunk)
            if not sent.is_set() and when.search("".join(err[-400:])):
                (os.killpg if group else os.kill)(proc.pid, signum)
                sent.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    out = proc.stdout.read()
    proc.wait(timeout=timeout)
    reader.join(timeout=10)
    assert sent.is_set(), "the run finished before the signal could be sent:\n" + "".join(err)[-2000:]
    return proc.returncode, out, "".join(err)


# Flags that make a training run take seconds on the synthetic data.
TINY_RUN = ["--model", "resnet_tiny_20k", "--batch-size", "32", "--val-split", "100", "--no-progress",
            "--no-download"]


# ------------------------------------------------------------------------------------------------
# Tests write only to temporary folders: a test run that leaves a file in the repository (say, a runs/
# folder from a train.py started with cwd=ROOT and no --run-dir) fails the session.
# A walk rather than `git status --ignored`: git reports an ignored folder as one line, so a new run
# inside a runs/ that already exists would go unseen.
_NOT_OURS = ("__pycache__", ".pytest_cache", ".hypothesis", ".git")


def _repo_entries() -> set[str]:
    entries = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in _NOT_OURS and not d.startswith(".venv")]
        rel = Path(folder).relative_to(ROOT)
        entries.update(str(rel / name) for name in dirs + files)
    return entries


@pytest.fixture(scope="session", autouse=True)
def repository_stays_clean():
    before = _repo_entries()
    yield
    new = sorted(_repo_entries() - before)
    # Name the topmost new paths only (a new folder, not every file in it).
    top = [p for p in new if not any(p.startswith(q + os.sep) for q in new if q != p)]
    if top:
        pytest.fail(f"the test run created {len(new)} files/folders in the repository {ROOT}: "
                    f"{', '.join(top[:10])}{' ...' if len(top) > 10 else ''}; tests must write to tmp_path "
                    "(pass --run-dir / --out, or cwd=tmp_path)", pytrace=False)
