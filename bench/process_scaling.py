"""Benchmark: training images/s with 1 process vs N processes (DDP) on this machine, and the efficiency.

    python bench/process_scaling.py [--model resnet_report_4m] [--batch-size 128] [--images 6400]
                                    [--single accelerate_configs/cpu.yaml] [--multi accelerate_configs/cpu_ddp.yaml]

Runs the real `accelerate launch train.py` twice for 2 epochs on the first --images training images
(no validation) and reports the second, warm epoch. Both runs keep the same per-process batch, so the
N-process run steps with an N times larger global batch. Efficiency = N-process images/s divided by
N x the 1-process images/s when each process has its own device; on one CPU the processes share the
cores, so the ratio of the two rates is printed as well.
"""
import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, args, run_dir: Path) -> float:
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", config, "train.py",
           "--model", args.model, "--batch-size", str(args.batch_size), "--epochs", "2", "--val-split", "0",
           "--train-subset", str(args.images), "--data-dir", args.data_dir, "--no-download", "--no-progress",
           "--wandb", "off", "--run-dir", str(run_dir), *args.extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    return float(rows[-1]["images_per_sec"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet_report_4m")
    parser.add_argument("--batch-size", type=int, default=128, help="per process")
    parser.add_argument("--images", type=int, default=6400)
    parser.add_argument("--data-dir", default="~/.cache/cifar10")
    parser.add_argument("--single", default="accelerate_configs/cpu.yaml")
    parser.add_argument("--multi", default="accelerate_configs/cpu_ddp.yaml")
    parser.add_argument("extra", nargs="*", help="more train.py flags, after --")
    args = parser.parse_args()
    n = yaml.safe_load((ROOT / args.multi).read_text())["num_processes"]
    with tempfile.TemporaryDirectory() as tmp:
        one = run(args.single, args, Path(tmp) / "one")
        many = run(args.multi, args, Path(tmp) / "many")
    print(f"\n{args.model}, batch {args.batch_size} per process, {args.images} images, epoch 2 of 2")
    print(f"1 process:  {one:8.1f} img/s")
    print(f"{n} processes: {many:8.1f} img/s  ({many / one:.2f}x the single process)")
    print(f"scaling efficiency if each process had its own device: {many / (n * one):.0%}")


if __name__ == "__main__":
    main()
