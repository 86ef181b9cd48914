"""Benchmark: training images/s of this checkout against another commit's, side by side on one machine.

    python bench/speed_vs_commit.py --commit a089c0f [--recipe configs/fast.yaml] [--epochs 0.25] [--repeats 2]
                                    [--accelerate-config accelerate_configs/cpu.yaml] [--record]

Checks the commit out into a temporary git worktree and launches the same short training run from both,
alternating (old, new, old, new, ...), so that a slow hour hits both alike. Each launch trains on all
50,000 images (no validation) for --epochs and reports the images/s of its training loop (summary.json);
the best of --repeats counts. Both use this environment's packages.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from results import ROOT, record


def launch(code: Path, args, run_dir: Path) -> float:
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
           str(ROOT / args.accelerate_config), "train.py", "--config", str(ROOT / args.recipe), "--data-dir",
           args.data_dir, "--no-download", "--no-progress", "--wandb", "off", "--val-split", "0", "--epochs",
           str(args.epochs), "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, cwd=code, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} (in {code}) failed:\n{proc.stderr[-3000:]}")
    return float(json.loads((run_dir / "summary.json").read_text())["images_per_sec"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", required=True, help="the commit to compare with (e.g. the last release)")
    parser.add_argument("--recipe", default="configs/fast.yaml")
    parser.add_argument("--epochs", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--accelerate-config", default="accelerate_configs/cpu.yaml")
    parser.add_argument("--data-dir", default="~/.cache/cifar10")
    parser.add_argument("--record", action="store_true", help="append the figures to results/")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="speed_vs_commit_"))
    old = tmp / "code"
    subprocess.run(["git", "worktree", "add", "--detach", str(old), args.commit], cwd=ROOT, check=True,
                   capture_output=True)
    rates: dict[str, list[float]] = {"old": [], "new": []}
    try:
        for r in range(args.repeats):
            for name, code in (("old", old), ("new", ROOT)):
                rate = launch(code, args, tmp / f"{name}-{r}")
                rates[name].append(rate)
                print(f"{name} ({args.commit if name == 'old' else 'this checkout'}): {rate:.1f} img/s", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)
    best = {name: max(values) for name, values in rates.items()}
    print(f"this checkout: {best['new'] / best['old']:.3f}x the images/s of {args.commit} (best of {args.repeats})")
    if args.record:
        command = (f"python bench/speed_vs_commit.py --commit {args.commit} --recipe {args.recipe} --epochs "
                   f"{args.epochs} --repeats {args.repeats} --accelerate-config {args.accelerate_config}")
        config = Path(args.accelerate_config).name
        record("speed_vs_commit", f"{args.recipe} ({config}) at {args.commit}", "images_per_sec", best["old"], command)
        record("speed_vs_commit", f"{args.recipe} ({config}) at this commit", "images_per_sec", best["new"], command)
        record("speed_vs_commit", f"{args.recipe} ({config}): this commit / {args.commit}", "speed_ratio",
               best["new"] / best["old"], command)


if __name__ == "__main__":
    main()
