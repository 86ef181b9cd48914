"""Every GPU figure of the suite in one go, most important first, cut at a deadline; rows go to results/gpu.csv.

    python bench/gpu_session.py [--deadline 470] [--only loop|recipes] [--data-dir ~/.cache/cifar10] [--dry-run]

Made for a lent GPU machine with a few minutes of device time and no network. Before it, on this side:
  pip download --no-deps airbench==0.1.8 -d .wheels       (.wheels/ is ignored by git; carry it along)
  cp -r ../shared/data .cifar-build                        (16 MB, ignored too: the training set is built
                                                            there into --data-dir when that has none)
Each task is a bench of bench/ run with --record, so every figure lands in results/gpu.csv as it is
measured (date, GPU, torch, commit, command, figure); a task cut by the deadline leaves what it recorded.

Tasks, in order:
  loop     the training loop against airbench94 (the loop issue): airbench94 x3 and configs/fast.yaml x3 on
           the same split; the step overhead of the report net at batch 256 and 1024
  recipes  the recipes (the GPU-recipes issue): configs/fast_gpu.yaml x3 (against the same airbench94 runs),
           configs/best95.yaml x3 against airbench95 x3, the mission's command and configs/report.yaml run to
           their ends, airbench96 x1
"""
import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def tasks(data: str) -> dict[str, list[list[str]]]:
    """The task groups, each a list of bench commands."""
    tta = [PY, "bench/time_to_accuracy.py", "--record", "--data-dir", data, "--accelerate-config",
           "accelerate_configs/bf16.yaml"]

    def airbench(variant: str, runs: int) -> list[str]:
        return [PY, "bench/airbench.py", "--variant", variant, "--runs", str(runs), "--data-dir", data, "--record"]

    def recipe(path: str, seed: int, *flags: str) -> list[str]:  # on airbench's split (seed 0), whatever the seed
        return [*tta, "--recipe", path, "--", "--seed", str(seed), "--split-seed", "0", *flags]

    def overhead(batch: int) -> list[str]:
        return [PY, "bench/step_overhead.py", "--mixed-precision", "bf16", "--batch-size", str(batch),
                "--steps", "100", "--repeats", "3", "--record"]

    return {
        "loop": [
            airbench("94", 3),
            *[recipe("configs/fast.yaml", seed) for seed in range(3)],
            overhead(256), overhead(1024),
        ],
        "recipes": [
            *[recipe("configs/fast_gpu.yaml", seed) for seed in range(3)],
            airbench("95", 3),
            *[recipe("configs/best95.yaml", seed) for seed in range(3)],
            recipe("none", 0, "--activation", "gelu", "--opt", "adam"),  # the mission's command, as written
            recipe("configs/report.yaml", 0),
            airbench("96", 1),
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deadline", type=float, default=470, help="seconds for all tasks together")
    parser.add_argument("--only", choices=["loop", "recipes"], action="append", help="task groups to run (default: all)")
    parser.add_argument("--data-dir", default="~/.cache/cifar10")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and run nothing")
    args = parser.parse_args()
    wheels = ROOT / ".wheels"
    if wheels.is_dir() and not args.dry_run:  # no network on a lent machine: install what was carried
        subprocess.run([PY, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--find-links", str(wheels),
                        *[w.name.split("-")[0] for w in wheels.iterdir()]], check=False)
    build, data = ROOT / ".cifar-build" / "build_cifar10.py", Path(args.data_dir).expanduser()
    if build.is_file() and not (data / "cifar-10-batches-py").is_dir() and not args.dry_run:
        subprocess.run([PY, str(build), "--out", str(data)], check=True)
    end, groups = time.monotonic() + args.deadline, tasks(args.data_dir)
    for group in args.only or list(groups):
        for cmd in groups[group]:
            left = end - time.monotonic()
            print(f"[{group}] {shlex.join(cmd)}", flush=True)
            if args.dry_run:
                continue
            if left < 10:
                print(f"deadline reached; not run: {shlex.join(cmd)}", flush=True)
                continue
            try:
                subprocess.run(cmd, cwd=ROOT, timeout=left)
            except subprocess.TimeoutExpired:
                print(f"cut at the deadline: {shlex.join(cmd)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
