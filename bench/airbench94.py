"""Benchmark: airbench94 from its PyPI package, trained and scored on the suite's own split.

    pip install airbench==0.1.8
    python bench/airbench94.py [--data-dir ~/.cache/cifar10] [--val-split 5000] [--seed 0] [--runs 1] [--cpu]

airbench's ``train94`` reads ``cifar10/train.pt`` and ``cifar10/test.pt`` under its working folder (and
downloads the official sets when they are missing). This writes them from the split that train.py and
``bench/time_to_accuracy.py`` use with the same ``--val-split`` and ``--seed``: train.pt holds the training
images, test.pt the validation images. So both train on the same images and are scored on the same images,
and the test batch is never used. Then it runs ``airbench.warmup94(); airbench.train94()`` in a fresh Python
process, as airbench's README does, and prints airbench's own table (``tta_val_acc`` is its final accuracy;
``total_time_seconds`` counts GPU time of the whitening fit, training and the final evaluation only) and the
whole process's wall time, start-up and warm-up run included.

airbench is written for one CUDA GPU in pure fp16. With ``--cpu`` (the default when there is no GPU) it runs
ported as the suite runs on a CPU: fp32 weights and images, the net under bf16 autocast (this CPU computes
fp16 at about 7 img/s), and wall-clock time in place of CUDA events. Nothing else of airbench changes.
"""
import argparse
import importlib.util
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


# Run before ``import airbench`` in its process; train94 and warmup94 then get ``make_net=make_net_bf16``.
CPU_PORT = """
import time
import torch
from torch import nn
torch.Tensor.half = lambda self, *args, **kwargs: self  # keep fp32; autocast picks bf16 per op
nn.Module.half = lambda self: self
nn.Module.cuda = lambda self, *args, **kwargs: self
_load = torch.load
torch.load = lambda *args, map_location=None, **kwargs: _load(*args, map_location="cpu", **kwargs)

class WallClockEvent:  # the CPU runs synchronously, so a wall-clock reading marks the same instant
    def __init__(self, **kwargs):
        self.time = None
    def record(self):
        self.time = time.perf_counter()
    def elapsed_time(self, end):
        return 1e3 * (end.time - self.time)

torch.cuda.Event = WallClockEvent
torch.cuda.synchronize = lambda *args, **kwargs: None
from airbench.lib_airbench94 import make_net94

class Bf16Sequential(nn.Sequential):
    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().forward(x).float()

def make_net_bf16():
    net = make_net94()
    net.__class__ = Bf16Sequential
    return net
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="~/.cache/cifar10")
    parser.add_argument("--val-split", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0, help="the split's seed, as train.py's --seed")
    parser.add_argument("--runs", type=int, default=1, help="train94 runs after the one warm-up run")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder")
    parser.add_argument("--cpu", action="store_true", help="run the CPU port (default when there is no GPU)")
    args = parser.parse_args()
    if args.val_split <= 0:
        parser.error("--val-split must be at least 1: airbench scores itself on the validation images")
    if importlib.util.find_spec("airbench") is None:
        sys.exit("error: airbench is not installed: pip install airbench==0.1.8")
    cpu = args.cpu or not torch.cuda.is_available()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="airbench94_"))
    n_train, n_val = write_airbench_sets(args.data_dir, args.val_split, args.seed, workdir / "cifar10")
    print(f"airbench94: {n_train} training images, {n_val} validation images as its test set (seed {args.seed})"
          + (", CPU port (fp32 weights, bf16 autocast)" if cpu else ""))
    net = "make_net=make_net_bf16" if cpu else ""
    script = ((CPU_PORT if cpu else "") + "import airbench\n"
              f"airbench.warmup94({net})\n"
              f"for i in range({args.runs}):\n"
              f"    airbench.train94(run=i, {net})\n")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], cwd=workdir, check=True)
    print(f"whole python process (start-up, warm-up run and {args.runs} run(s)): {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
