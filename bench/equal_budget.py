"""Benchmark: several recipes (or variants of one) trained for the same number of images, then one table.

    python bench/equal_budget.py [--epochs 4] [--train-subset 20000] [--out /tmp/equal_budget] [RUN ...]

RUN is a recipe file, or ``default`` for the suite's defaults, optionally followed by train.py flags in
the same argument: ``"configs/fast.yaml --lookahead-ema 0"`` (an ablation: the recipe without one
technique). Default RUNs: configs/report.yaml, default, configs/best.yaml.

Each RUN is the real `accelerate launch train.py --config RECIPE --epochs E --train-subset N [flags]`
with a 5000-image validation split carved from the training set (never the test set), one after
another. Its schedule is compressed to the budget: every length given in epochs (warm-up, whitening-bias
training, lookahead-EMA start) keeps the same fraction of the run as in the recipe (best.yaml's 5 of 200
warm-up epochs become 0.1 of 4); everything else is the recipe's own. A finished run is not trained
again. Then `python -m resnet.compare` prints the table (best val accuracy per run; the last epoch is
validated with the recipe's TTA level, if any).
"""
import argparse
import dataclasses
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from resnet.budget import EPOCH_LENGTHS  # noqa: E402  (what --time-budget scales too)
from resnet.config import TrainConfig, load_recipe  # noqa: E402
from resnet.grid import run_state  # noqa: E402

DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def compressed_lengths(recipe: dict, epochs: float) -> dict:
    """The recipe's lengths in epochs, each as the same fraction of ``epochs`` as of the recipe's own length
    (warm-up always applies, the others only where the recipe sets them)."""
    ratio = epochs / recipe.get("epochs", DEFAULTS["epochs"])
    return {name: recipe.get(name, DEFAULTS[name]) * ratio
            for name in EPOCH_LENGTHS if name == "warmup_epochs" or name in recipe}


def run_name(spec: list) -> str:
    """A folder name from the recipe's stem and its extra flags: 'fast_lookahead-ema_0'."""
    flags = "_".join(re.sub(r"[^A-Za-z0-9.]+", "-", arg).strip("-") for arg in spec[1:])
    return Path(spec[0]).stem + (f"_{flags}" if flags else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", default=["configs/report.yaml", "default", "configs/best.yaml"])
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--train-subset", type=int, default=20000, help="training images per epoch (0 = all 45,000)")
    parser.add_argument("--accelerate-config", default="accelerate_configs/bf16.yaml")
    parser.add_argument("--data-dir", default="~/.cache/cifar10")
    parser.add_argument("--out", default="/tmp/equal_budget", help="folder of the run folders")
    args = parser.parse_args()

    run_dirs = []
    for spec in map(shlex.split, args.runs):
        recipe_path, flags = spec[0], spec[1:]
        recipe = {} if recipe_path == "default" else load_recipe(TrainConfig, ROOT / recipe_path)
        run_dir = Path(args.out) / run_name(spec)
        run_dirs.append(str(run_dir))
        if run_state(run_dir) == "finished":  # summary.json alone is written after every epoch
            print(f"{' '.join(spec)}: finished in {run_dir}, not trained again", flush=True)
            continue
        lengths = [a for name, value in compressed_lengths(recipe, args.epochs).items()
                   for a in (f"--{name.replace('_', '-')}", f"{value:.4g}")]
        cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", args.accelerate_config,
               "train.py", *([] if recipe_path == "default" else ["--config", recipe_path]),
               "--epochs", str(args.epochs), "--train-subset", str(args.train_subset), *lengths,
               "--val-split", "5000", "--data-dir", args.data_dir, "--no-download", "--no-progress",
               "--wandb", "off", "--run-dir", str(run_dir), "--overwrite", *flags]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    subprocess.run([sys.executable, "-m", "resnet.compare", *run_dirs, "--png", str(Path(args.out) / "compare.png")],
                   cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
