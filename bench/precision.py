"""Benchmark: the same short training launch under accelerate_configs/cpu.yaml (fp32) and bf16.yaml.

    python bench/precision.py [--recipe configs/fast.yaml] [--steps 20] [--repeats 2]

Each launch is a real `accelerate launch train.py` on the real training set (a subset, so it takes a minute),
alternating fp32 and bf16, best of --repeats. Prints the precision each launch says it used (summary.json)
and its images/s. On a CPU without native bf16 (AVX512-BF16 or AMX) a bf16 request trains in fp32 and says
so, so both rates should match; on one with it, bf16 should be the faster. --record appends the figures to
results/.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from results import ROOT, record

CONFIGS = {"cpu.yaml": "fp32 asked", "bf16.yaml": "bf16 asked"}


def launch(config: str, recipe: str, steps: int, data_dir: str, run_dir: Path) -> dict:
    # The whole 45,000-image training split is loaded, but only enough images for `steps` batches train.
    batch = 512
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
           str(ROOT / "accelerate_configs" / config), "train.py", "--config", recipe, "--data-dir", data_dir,
           "--no-download", "--no-progress", "--wandb", "off", "--batch-size", str(batch), "--train-subset",
           str(batch * steps), "--epochs", "1", "--eval-every", "1", "--tta", "0", "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    said = [line for line in proc.stdout.splitlines() if line.startswith("precision:")]
    return {"precision": summary["precision"], "images_per_sec": summary["images_per_sec"], "said": said}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="configs/fast.yaml")
    parser.add_argument("--steps", type=int, default=20, help="training steps of 512 images per launch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data-dir", default="~/.cache/cifar10")
    parser.add_argument("--record", action="store_true", help="append the figures to results/")
    args = parser.parse_args()

    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for config in CONFIGS:
                got = launch(config, args.recipe, args.steps, args.data_dir, Path(tmp) / f"{config}-{r}")
                print(f"{config}: precision {got['precision']}, {got['images_per_sec']:.1f} img/s"
                      + (f"  ({got['said'][0]})" if got["said"] else ""), flush=True)
                if config not in best or got["images_per_sec"] > best[config]["images_per_sec"]:
                    best[config] = got
    fp32, bf16 = best["cpu.yaml"], best["bf16.yaml"]
    ratio = bf16["images_per_sec"] / fp32["images_per_sec"]
    print(f"bf16.yaml ran in {bf16['precision']} at {ratio:.2f}x the images/s of cpu.yaml ({fp32['precision']})")
    if not args.record:
        return
    command = f"python bench/precision.py --recipe {args.recipe} --steps {args.steps} --repeats {args.repeats}"
    for config, got in best.items():
        subject = f"{args.recipe} under accelerate_configs/{config} (ran in {got['precision']})"
        record("precision", subject, "images_per_sec", got["images_per_sec"], command)
    record("precision", f"{args.recipe}: bf16.yaml / cpu.yaml", "speed_ratio", ratio, command)


if __name__ == "__main__":
    main()
