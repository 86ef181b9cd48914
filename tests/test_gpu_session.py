"""bench/gpu_session.py: its plan from recorded figures, its cut at the deadline, and the rehearsal, the CI run of
every GPU task at toy size on the CPU (a crash on the lent GPU machine would waste its few minutes)."""
import csv
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_session


def results_files() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((ROOT / "results").rglob("*")) if p.is_file()}


def test_the_rehearsal_runs_every_kind_of_task_and_leaves_results_alone():
    before = results_files()
    proc = subprocess.run([sys.executable, "bench/gpu_session.py", "--rehearse"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    kinds = {t.kind: t for t in reversed(gpu_session.tasks("~/.cache/cifar10"))}  # the first task of each kind
    assert len(kinds) == 10
    for t in kinds.values():
        assert f"== ok: {t.name} (" in proc.stdout, t.name
    assert "rehearsal: 10 of 10 tasks without failure" in proc.stderr
    assert "plan for " in proc.stderr  # the session's plan, printed before the tasks
    assert results_files() == before


def test_the_plan_takes_recorded_seconds_and_names_what_the_deadline_cuts(tmp_path, monkeypatch):
    rows = tmp_path / "gpu.csv"
    with rows.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["date", "hardware", "bench", "subject", "metric", "value"])
        w.writerow(["2026-12-01", "GPU X", "time_to_accuracy", "configs/fast.yaml --split-seed 0 (bf16, bf16.yaml)",
                    "process_s", "100"])
        w.writerow(["2026-12-01", "GPU Y", "airbench", "airbench94 (PyPI 0.1.8)", "process_s", "7"])  # another GPU
    monkeypatch.setattr(gpu_session, "GPU_CSV", rows)
    todo = [t for t in gpu_session.tasks("/data") if t.group == "loop"]
    lines = gpu_session.plan(todo, 250, "GPU X")
    assert "(a guess" in lines[1] and "airbench94" in lines[1]  # GPU Y's row is not this GPU's
    fast = [line for line in lines if "fast.yaml" in line]
    assert all("100 s  (process_s 100 x 1 recorded 2026-12-01)" in line for line in fast)
    # airbench94's guessed 60 s, then 100 s each: seed 0 ends at 160 s, seed 1 is cut at 250 s, the rest not started.
    assert "->" not in fast[0] and fast[1].endswith("-> cut by the deadline")
    assert fast[2].endswith("-> not started") and lines[-2].endswith("-> not started")
    assert lines[-1] == f"expected: 2 of {len(todo)} tasks done by the deadline"


def test_a_cut_task_takes_its_child_processes_with_it(tmp_path):
    # As accelerate launch's training process under a bench: cut at the deadline, it must not stay on the GPU.
    pid_file = tmp_path / "pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    started = time.monotonic()
    assert gpu_session.run([sys.executable, "-c", parent], 3, dict(os.environ)) == "cut"
    assert time.monotonic() - started < 30
    pid = int(pid_file.read_text())
    for _ in range(50):  # gone, or a zombie (dead, waiting for whoever adopted it to reap it)
        stat = Path(f"/proc/{pid}/stat")
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the task's child {pid} survived the cut")
