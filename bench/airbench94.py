"""Benchmark (GPU only): airbench94 from its PyPI package, trained and scored on the suite's own split.

    pip install airbench==0.1.8
    python bench/airbench94.py [--data-dir ~/.cache/cifar10] [--val-split 5000] [--seed 0] [--runs 1]

airbench's ``train94`` reads ``cifar10/train.pt`` and ``cifar10/test.pt`` under its working folder (and
downloads the official sets when they are missing). This writes them from the split that train.py and
``bench/time_to_accuracy.py`` use with the same ``--val-split`` and ``--seed``: train.pt holds the training
images, test.pt the validation images. So both train on the same images and are scored on the same images,
and the test batch is never used. Then it runs ``airbench.warmup94(); airbench.train94()`` in a fresh Python
process, as airbench's README does, and prints airbench's own table (``tta_val_acc`` is its final accuracy;
``total_time_seconds`` counts GPU time of the whitening fit, training and the final evaluation only) and the
whole process's wall time, start-up and warm-up run included.
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resnet.data import CLASSES, cifar10_splits  # noqa: E402


def write_airbench_sets(data_dir: str, val_split: int, seed: int, folder: Path) -> tuple[int, int]:
    """airbench's cache format: {'images': uint8 NHWC, 'labels': int64, 'classes': [...]}."""
    train, val = cifar10_splits(data_dir, val_split, seed, download=False)
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in (("train.pt", train), ("test.pt", val)):
        torch.save({"images": torch.from_numpy(split.images), "labels": torch.from_numpy(split.labels).long(),
                    "classes": list(CLASSES)}, folder / name)
    return len(train.images), len(val.images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="~/.cache/cifar10")
    parser.add_argument("--val-split", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0, help="the split's seed, as train.py's --seed")
    parser.add_argument("--runs", type=int, default=1, help="train94 runs after the one warm-up run")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: airbench94 needs a CUDA GPU (it times with CUDA events and loads data onto GPU 0)")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="airbench94_"))
    n_train, n_val = write_airbench_sets(args.data_dir, args.val_split, args.seed, workdir / "cifar10")
    print(f"airbench94: {n_train} training images, {n_val} validation images as its test set (seed {args.seed})")
    script = ("import airbench\n"
              "airbench.warmup94()\n"
              f"for i in range({args.runs}):\n"
              "    airbench.train94(run=i)\n")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], cwd=workdir, check=True)
    print(f"whole python process (start-up, warm-up run and {args.runs} run(s)): {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
