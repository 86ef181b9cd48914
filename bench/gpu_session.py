"""Every GPU figure of the suite in one go, most important first, cut at a deadline; rows go to results/gpu.csv.

    python bench/gpu_session.py [--deadline 470] [--only loop|recipes] [--data-dir ~/.cache/cifar10]
                                [--dry-run | --rehearse]

Made for a lent GPU machine with a few minutes of device time and no network. Before it, on this side:
  pip wheel --no-deps airbench==0.1.8 -w .wheels          (.wheels/ is ignored by git; carry it along. A wheel:
                                                            `pip download` gets an sdist, to build offline there)
  cp -r ../shared/data .cifar-build                        (16 MB, ignored too: the training set is built
                                                            there into --data-dir when that has none)
  python bench/gpu_session.py --rehearse                   (every kind of task on the CPU at toy size)
Each task is a bench of bench/ run with --record, so every figure lands in results/gpu.csv as it is
measured (date, GPU, torch, commit, command, figure); a task cut by the deadline leaves what it recorded.
First it prints (on stderr) the plan: each task's expected seconds, from the figures last recorded for
this GPU in results/gpu.csv or a stated guess, and which tasks the deadline will cut or leave unstarted.
It exits 1 when a task failed (not when the deadline cut one).

Tasks, in order:
  loop     the training loop against airbench94 (the loop issue): airbench94 x3 and configs/fast.yaml x3 on
           the same split; the step overhead of the report net at batch 256 and 1024
  recipes  the recipes (the GPU-recipes issue): configs/fast_gpu.yaml x3 (against the same airbench94 runs),
           configs/best95.yaml x3 against airbench95 x3, the mission's command and configs/report.yaml run to
           their ends, airbench96 x1

--rehearse runs the first of each kind of task (seed 0 of the x3) on the CPU through the same commands, with
flags appended that shrink it (TOY below: 2,100 synthetic images in the official format, a tiny net, a step
or two, no torch.compile), two at a time, figures to scratch CSVs (RESNET_RESULTS_FILE), never results/.
The airbench tasks run bench/airbench.py --dry-run: the split written in airbench's format, airbench's script
compiled, not run (airbench is not in the venv). About 100 s of CPU, mostly the launches' start-up.
"""
import argparse
import csv
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
GPU_CSV = ROOT / "results" / "gpu.csv"
MIN_LEFT = 10  # seconds: below this a task is not started
# Flags appended per bench by --rehearse (argparse keeps the last of a repeated flag).
TOY = {
    "bench/time_to_accuracy.py": ["--epochs", "0.05", "--train-subset", "2000", "--val-split", "100",
                                  "--model", "resnet_tiny_20k", "--no-compile"],
    "bench/step_overhead.py": ["--model", "resnet_tiny_20k", "--batch-size", "64", "--steps", "1", "--repeats", "1"],
    # airbench's own training has no size flags (its epochs and batch are in the package), and the package
    # is not in the venv: its split and script only.
    "bench/airbench.py": ["--runs", "1", "--val-split", "100", "--dry-run"],
}


@dataclass
class Task:
    group: str
    name: str  # what the plan and the summary call it
    kind: str  # tasks of one kind differ only in the seed: --rehearse runs the first
    cmd: list[str]
    figure: tuple[str, str]  # (bench, subject prefix) of its rows in results/gpu.csv
    runs: int  # process_s is recorded per run
    guess: float  # seconds on an H200 when nothing is recorded


def tasks(data: str) -> list[Task]:
    """The tasks in order of importance."""
    tta = [PY, "bench/time_to_accuracy.py", "--record", "--data-dir", data, "--accelerate-config",
           "accelerate_configs/bf16.yaml"]

    def airbench(variant: str, runs: int, guess: float) -> Task:
        return Task("", f"airbench{variant} x{runs}", f"airbench{variant}",
                    [PY, "bench/airbench.py", "--variant", variant, "--runs", str(runs), "--data-dir", data, "--record"],
                    ("airbench", f"airbench{variant} (PyPI 0.1.8)"), runs, guess)

    def recipe(path: str, seeds: int, guess: float, *flags: str) -> list[Task]:
        # On airbench's split (seed 0), whatever the seed; the subject is what time_to_accuracy records.
        subject = " ".join([path, "--split-seed", "0", *flags]) + " ("
        name = "the mission's command" if path == "none" else path
        return [Task("", f"{name} seed {seed}", name,
                     [*tta, "--recipe", path, "--", "--seed", str(seed), "--split-seed", "0", *flags],
                     ("time_to_accuracy", subject), 1, guess) for seed in range(seeds)]

    def overhead(batch: int, guess: float) -> Task:
        return Task("", f"step overhead batch {batch}", f"overhead{batch}",
                    [PY, "bench/step_overhead.py", "--mixed-precision", "bf16", "--batch-size", str(batch),
                     "--steps", "100", "--repeats", "3", "--record"],
                    ("step_overhead", f"resnet_report_4m, batch {batch}, bf16"), 1, guess)

    # Guesses (H200, start-up included): fast.yaml as it was at bb26357 (41 s recorded); fast_gpu.yaml's
    # max-autotune compile a minute or two; the others scaled from airbench94's 18 s and from the report
    # net's 23,500 img/s (the mission's 40 epochs of 45,000 images: about 80 s).
    loop = [airbench("94", 3, 60), *recipe("configs/fast.yaml", 3, 45), overhead(256, 25), overhead(1024, 45)]
    recipes = [*recipe("configs/fast_gpu.yaml", 3, 120), airbench("95", 3, 75), *recipe("configs/best95.yaml", 3, 60),
               *recipe("none", 1, 100, "--activation", "gelu", "--opt", "adam"),  # the mission's command, as written
               *recipe("configs/report.yaml", 1, 200), airbench("96", 1, 90)]
    for group, items in (("loop", loop), ("recipes", recipes)):
        for t in items:
            t.group = group
    return loop + recipes


def expected(task: Task, rows: list[dict]) -> tuple[float, str]:
    """The task's seconds from the last figures recorded for it (rows of this GPU), else its guess."""
    bench, subject = task.figure
    last = {r["metric"]: r for r in rows if r["bench"] == bench and r["subject"].startswith(subject)}
    if "process_s" in last:
        r = last["process_s"]
        return float(r["value"]) * task.runs, f"process_s {r['value']} x {task.runs} recorded {r['date']}"
    if "full_images_per_sec" in last and "bare_images_per_sec" in last:  # step_overhead records speeds only
        cmd = task.cmd
        images = (int(cmd[cmd.index("--repeats") + 1]) + 1) * int(cmd[cmd.index("--steps") + 1]) \
            * int(cmd[cmd.index("--batch-size") + 1])  # per path; round 0 warms up
        seconds = 15 + images * sum(1 / float(last[m]["value"]) for m in ("full_images_per_sec", "bare_images_per_sec"))
        return seconds, f"img/s recorded {last['full_images_per_sec']['date']}, + a guessed 15 s start-up"
    return task.guess, "a guess: nothing recorded"


def gpu_name() -> str:
    """This machine's GPU, else (planning on this side) the GPU last recorded in results/gpu.csv."""
    if shutil.which("nvidia-smi"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    return read_rows(GPU_CSV)[-1]["hardware"] if read_rows(GPU_CSV) else "unknown GPU"


def read_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open(newline=""))) if path.is_file() else []


def plan(todo: list[Task], deadline: float, gpu: str) -> list[str]:
    """Each task's expected seconds and whether the deadline cuts it, as the runner will meet it."""
    rows = [r for r in read_rows(GPU_CSV) if r["hardware"] == gpu]
    lines, at, done = [f"plan for {gpu}, deadline {deadline:.0f} s (expected seconds from results/gpu.csv):"], 0.0, 0
    for t in todo:
        seconds, why = expected(t, rows)
        fate = "not started" if deadline - at < MIN_LEFT else "cut by the deadline" if at + seconds > deadline else ""
        at = min(at + seconds, deadline)
        lines.append(f"  {f'[{t.group}] {t.name}':<48} {seconds:5.0f} s  ({why}){'  -> ' + fate if fate else ''}")
        done += not fate
    return lines + [f"expected: {done} of {len(todo)} tasks done by the deadline"]


def write_synthetic_cifar(folder: Path, per_batch: int = 420) -> None:
    """data_batch_1..5 and batches.meta as build_cifar10.py writes them (no test batch), learnable images."""
    folder.mkdir(parents=True)
    palette = np.random.default_rng(1234).integers(30, 225, size=(10, 3))
    for i in range(1, 6):
        labels = np.arange(per_batch) % 10
        pixels = palette[labels][:, :, None, None] + np.random.default_rng(i).normal(0, 25, (per_batch, 3, 32, 32))
        batch = {b"batch_label": b"synthetic", b"labels": labels.tolist(),
                 b"data": np.clip(pixels, 0, 255).astype(np.uint8).reshape(per_batch, 3072),
                 b"filenames": [f"img_{j}.png".encode() for j in range(per_batch)]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [b"class%d" % c for c in range(10)], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def run(cmd: list[str], timeout: float, env: dict, log=None) -> str:
    """'ok', 'failed (exit N)' or 'cut'. Its own process group, so a cut also stops the training processes
    that accelerate launch started (killing the bench alone would leave them on the GPU)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=log, stderr=log)
    try:
        return "ok" if proc.wait(timeout=timeout) == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # train.py saves and stops at the next step
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return "cut"


def rehearse(todo: list[Task], data_dir: str, scratch: Path) -> list[tuple[Task, str]]:
    """The first task of each kind at toy size on the CPU, two at a time (the launches' start-up, not the
    toy training, is most of the time), each with its own log and scratch results file."""
    write_synthetic_cifar(scratch / "data" / "cifar-10-batches-py")
    firsts = {t.kind: t for t in reversed(todo)}

    def one(i_task: tuple[int, Task]) -> tuple[Task, str]:
        i, t = i_task
        cmd = [str(scratch / "data") if a == data_dir else a for a in t.cmd] + TOY[t.cmd[1]]
        results = scratch / f"results_{i}.csv"
        env = {**os.environ, "RESNET_RESULTS_FILE": str(results), "TMPDIR": str(scratch)}  # run folders too
        began = time.monotonic()
        with (scratch / f"log_{i}.txt").open("w+") as log:
            status = run(cmd, 600, env, log)  # a stuck task still ends the rehearsal, as a failure
            if status == "ok" and "--dry-run" not in cmd and not read_rows(results):
                status = "failed (recorded nothing)"
            log.seek(0)
            tail = "" if status == "ok" else "".join(log.readlines()[-25:])
        print(f"[{t.group}] {shlex.join(cmd)}\n== {status}: {t.name} ({time.monotonic() - began:.1f} s)\n{tail}",
              flush=True)
        return t, status

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, enumerate(t for t in todo if firsts[t.kind] is t)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deadline", type=float, default=470, help="seconds for all tasks together")
    parser.add_argument("--only", choices=["loop", "recipes"], action="append", help="task groups to run (default: all)")
    parser.add_argument("--data-dir", default="~/.cache/cifar10")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    parser.add_argument("--rehearse", action="store_true", help="run every kind of task at toy size on the CPU, "
                        "figures to a scratch file, never results/; exit 1 on a failure")
    args = parser.parse_args()
    todo = [t for t in tasks(args.data_dir) if t.group in (args.only or ["loop", "recipes"])]
    print("\n".join(plan(todo, args.deadline, gpu_name())), file=sys.stderr, flush=True)  # stdout: the commands
    start = time.monotonic()
    if args.rehearse:
        with tempfile.TemporaryDirectory(prefix="gpu_session_") as scratch:
            results = rehearse(todo, args.data_dir, Path(scratch))
            wheels_ok = install_wheels(Path(scratch) / "site")  # as on the lent machine, into a scratch folder
        failed = [t.name for t, status in results if status != "ok"] + ([] if wheels_ok else [".wheels/ install"])
    else:
        if not args.dry_run:
            prepare(args.data_dir)
        end, results = start + args.deadline, []
        for t in todo:
            print(f"[{t.group}] {shlex.join(t.cmd)}", flush=True)
            if args.dry_run:
                continue
            left, began = end - time.monotonic(), time.monotonic()
            status = "not started: deadline" if left < MIN_LEFT else run(t.cmd, left, dict(os.environ))
            results.append((t, status))
            print(f"== {status}: {t.name} ({time.monotonic() - began:.0f} s)", file=sys.stderr, flush=True)
        if args.dry_run:
            return 0
        failed = [t.name for t, status in results if status.startswith("failed")]
    print(f"{'rehearsal' if args.rehearse else 'session'}: {len(results) - len(failed)} of {len(results)} tasks "
          f"without failure in {time.monotonic() - start:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""),
          file=sys.stderr, flush=True)
    return 1 if failed else 0


def install_wheels(target: Path | None = None) -> bool:
    """Install what was carried in .wheels/ (no network on a lent machine); True when there was nothing to.
    No build isolation: an sdist (what `pip download` gets for airbench) would fetch setuptools to build."""
    wheels = ROOT / ".wheels"
    if not wheels.is_dir():
        return True
    names = sorted({w.name.split("-")[0] for w in wheels.iterdir()})
    proc = subprocess.run([PY, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                           "--find-links", str(wheels), *(["--target", str(target)] if target else []), *names], check=False)
    if proc.returncode:
        print(f"installing {', '.join(names)} from .wheels/ failed: their tasks will fail", file=sys.stderr, flush=True)
    return proc.returncode == 0


def prepare(data_dir: str) -> None:
    """On the lent machine: install the carried wheels and build the training set."""
    install_wheels()
    build, data = ROOT / ".cifar-build" / "build_cifar10.py", Path(data_dir).expanduser()
    if build.is_file() and not (data / "cifar-10-batches-py").is_dir():
        subprocess.run([PY, str(build), "--out", str(data)], check=True)


if __name__ == "__main__":
    sys.exit(main())
