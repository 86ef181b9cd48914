"""Benchmark: train a recipe on the real training set and print time to 85%, 90% and 94% val accuracy.

    python bench/time_to_accuracy.py [--recipe configs/fast.yaml] [--accelerate-config accelerate_configs/bf16.yaml]
                                     [--data-dir ~/.cache/cifar10] [-- extra train.py flags]

Runs the whole `accelerate launch train.py` as a subprocess (start-up, per-epoch evaluation and saving
included), with a 5000-image validation split carved from the training set (never the test set). Prints,
per epoch, the cumulative training seconds, the seconds since launch and the val accuracy, then the first
time each threshold was reached.
"""
import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import ROOT, record

THRESHOLDS = (0.85, 0.90, 0.94)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="configs/fast.yaml", help="a recipe, or none: train.py's defaults")
    parser.add_argument("--accelerate-config", default="accelerate_configs/bf16.yaml")
    parser.add_argument("--data-dir", default="~/.cache/cifar10")
    parser.add_argument("--run-dir", default=None, help="default: a temporary folder")
    parser.add_argument("--record", action="store_true", help="append the run's figures to results/")
    parser.add_argument("extra", nargs="*", help="more train.py flags, after --")
    args = parser.parse_args()

    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="tta_bench_")) / "run"
    args.run_dir_used = run_dir
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", args.accelerate_config,
           "train.py", *(["--config", args.recipe] if args.recipe != "none" else []), "--data-dir", args.data_dir,
           "--val-split", "5000",
           "--no-download", "--no-progress", "--wandb", "off", "--run-dir", str(run_dir), *args.extra]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - start

    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    print(f"\n{'epoch':>5} {'train s':>9} {'since start s':>14} {'img/s':>7} {'val acc':>8}")
    train_s, first = 0.0, {}
    for r in rows:
        train_s += float(r["epoch_time"])
        acc = float(final_acc(r)) if final_acc(r) else None
        print(f"{r['epoch']:>5} {train_s:>9.1f} {float(r['elapsed']):>14.1f} {float(r['images_per_sec']):>7.0f} "
              f"{'' if acc is None else f'{acc:.4f}':>8}")
        for t in THRESHOLDS:
            if acc is not None and acc >= t and t not in first:
                first[t] = (train_s, float(r["elapsed"]), r["epoch"])
    print(f"\nwhole accelerate launch: {wall:.1f} s; final val acc {final_acc(rows[-1])}")
    if args.record:
        record_run(args, rows, train_s, wall)
    if not any(r.get("val_acc") for r in rows):
        print("no validation split (--val-split 0): accuracy not measured")
        return
    for t in THRESHOLDS:
        if t in first:
            tr, el, ep = first[t]
            print(f"{t:.0%} reached at epoch {ep}: {tr:.1f} s of training, {el:.1f} s since start-up")
        else:
            print(f"{t:.0%} not reached")


def final_acc(row: dict) -> str | None:
    """An epoch's validation accuracy with the recipe's TTA where it was measured (the last epoch), else without."""
    return row.get("val_acc_tta") or row.get("val_acc")


def record_run(args, rows: list[dict], train_s: float, wall: float) -> None:
    """The run's final val accuracy, training and whole-launch seconds and images/s as rows of results/."""
    summary = json.loads((Path(args.run_dir_used) / "summary.json").read_text())
    extra = [a for a in args.extra if a != "--"]
    seed = extra[extra.index("--seed") + 1] if "--seed" in extra else "0"
    subject = " ".join([args.recipe, *[a for a in extra if a not in ("--seed", seed)]]) + \
        f" ({summary['precision']}, {Path(args.accelerate_config).name})"
    command = f"python bench/time_to_accuracy.py --recipe {args.recipe} --accelerate-config " \
              f"{args.accelerate_config}" + (f" -- {' '.join(extra)}" if extra else "")
    for metric, value in (("val_acc", final_acc(rows[-1])), ("train_s", train_s), ("process_s", wall),
                          ("images_per_sec", summary.get("images_per_sec"))):
        if value not in (None, ""):
            record("time_to_accuracy", subject, metric, float(value), command, seed=seed)


if __name__ == "__main__":
    main()
