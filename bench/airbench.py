"""Benchmark: airbench (94, 95 or 96) from its PyPI package, trained and scored on the suite's own split.

    pip install airbench==0.1.8      (on a machine without network: pip download it, carry the file)
    python bench/airbench.py [--variant 94] [--data-dir ~/.cache/cifar10] [--val-split 5000] [--seed 0]
                             [--runs 1] [--cpu] [--record]

airbench's ``train94`` (``train95``, ``train96``) reads ``cifar10/train.pt`` and ``cifar10/test.pt`` under its
working folder (and downloads the official sets when they are missing). This writes them from the split that
train.py and ``bench/time_to_accuracy.py`` use with the same ``--val-split`` and ``--seed``: train.pt holds the
training images, test.pt the validation images. So both train on the same images and are scored on the same
images, and the test batch is never used. Then it runs ``airbench.warmup94(); airbench.train94()`` in a fresh
Python process, as airbench's README does, and prints airbench's own table (``tta_val_acc`` is its final
accuracy; ``total_time_seconds`` counts GPU time of the whitening fit, training and the final evaluation only)
and the whole process's wall time, start-up and warm-up run included. ``--record`` appends, per run, the
validation accuracy, airbench's own seconds and the whole process's seconds to results/ (gpu.csv on a GPU);
each run's rows carry the seed 'split S run N', N counted from ``--first-run`` (0), so runs launched one at a
time on one split keep their own labels (bench/budget_recipes.py does that: a cut session keeps the runs done).

airbench is written for one CUDA GPU in pure fp16. With ``--cpu`` (the default when there is no GPU) it runs
ported as the suite runs on a CPU: fp32 weights and images, the net under bf16 autocast where the CPU computes
bf16 natively, else in fp32 (resnet.hardware), and wall-clock time in place of CUDA events. Nothing else of
airbench changes.
"""
import argparse
import importlib.machinery
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resnet.data import CLASSES, cifar10_splits  # noqa: E402
from resnet.hardware import cpu_has_native_bf16  # noqa: E402
from results import record  # noqa: E402

VARIANTS = ("94", "95", "96")


def write_airbench_sets(data_dir: str, val_split: int, seed: int, folder: Path) -> tuple[int, int]:
    """airbench's cache format: {'images': uint8 NHWC, 'labels': int64, 'classes': [...]}."""
    train, val = cifar10_splits(data_dir, val_split, seed, download=False)
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in (("train.pt", train), ("test.pt", val)):
        torch.save({"images": torch.from_numpy(split.images), "labels": torch.from_numpy(split.labels).long(),
                    "classes": list(CLASSES)}, folder / name)
    return len(train.images), len(val.images)


# Run before ``import airbench`` in its process; trainNN and warmupNN then get ``make_net=make_net_cpu``.
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
import airbench

class CpuSequential(nn.Sequential):
    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
            return super().forward(x).float()

def make_net_cpu():
    net = getattr(airbench, "make_net" + VARIANT)()
    net.__class__ = CpuSequential
    return net
"""

# Keeps each run's final figures: airbench passes its train() locals to print_training_details.
CAPTURE = """
import json
import airbench
from airbench import utils as _utils
_print = _utils.print_training_details
def _capture(variables, is_final_entry):
    _print(variables, is_final_entry=is_final_entry)
    if is_final_entry and variables.get("run") not in (-1, "warmup"):
        with open("runs.jsonl", "a") as f:
            f.write(json.dumps({"tta_val_acc": variables["tta_val_acc"],
                                "total_time_seconds": variables["total_time_seconds"]}) + "\\n")
for _module in (_utils, *[getattr(airbench, "lib_airbench" + v) for v in ("93", "94", "95", "96")]):
    if hasattr(_module, "print_training_details"):
        _module.print_training_details = _capture
"""


def child_script(variant: str, runs: int, cpu: bool) -> str:
    net = "make_net=make_net_cpu" if cpu else ""
    port = f"VARIANT = {variant!r}\nBF16 = {cpu_has_native_bf16()}\n" + CPU_PORT if cpu else ""
    return (port + CAPTURE + f"airbench.warmup{variant}({net})\n"
            f"for i in range({runs}):\n"
            f"    airbench.train{variant}(run=i, {net})\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="94", choices=VARIANTS)
    parser.add_argument("--data-dir", default="~/.cache/cifar10")
    parser.add_argument("--val-split", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0, help="the split's seed, as train.py's --seed")
    parser.add_argument("--runs", type=int, default=1, help="training runs after the one warm-up run")
    parser.add_argument("--first-run", type=int, default=0, help="the number the first run's rows carry "
                        "('split S run N'): a later launch on the same split counts on from the runs recorded")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder")
    parser.add_argument("--cpu", action="store_true", help="run the CPU port (default when there is no GPU)")
    parser.add_argument("--record", action="store_true", help="append each run's figures to results/")
    parser.add_argument("--dry-run", action="store_true", help="write the sets and compile airbench's script, run "
                        "nothing (works without airbench installed: bench/gpu_session.py --rehearse)")
    args = parser.parse_args()
    if args.val_split <= 0:
        parser.error("--val-split must be at least 1: airbench scores itself on the validation images")
    # This file is airbench.py too, first on sys.path: look for the package everywhere else.
    here = Path(__file__).resolve().parent
    installed = importlib.machinery.PathFinder.find_spec("airbench", [p for p in sys.path if Path(p).resolve() != here])
    if installed is None and not args.dry_run:
        sys.exit("error: airbench is not installed: pip install airbench==0.1.8")
    cpu = args.cpu or not torch.cuda.is_available()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix=f"airbench{args.variant}_"))
    n_train, n_val = write_airbench_sets(args.data_dir, args.val_split, args.seed, workdir / "cifar10")
    print(f"airbench{args.variant}: {n_train} training images, {n_val} validation images as its test set "
          f"(seed {args.seed})" + (", CPU port" if cpu else ""), flush=True)
    if args.dry_run:
        compile(child_script(args.variant, args.runs, cpu), "airbench's script", "exec")  # a syntax error shows
        print(f"dry run: sets written to {workdir / 'cifar10'}, airbench's script compiles; not run")
        return
    (workdir / "runs.jsonl").unlink(missing_ok=True)  # a reused --workdir: only this launch's runs are recorded
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", child_script(args.variant, args.runs, cpu)], cwd=workdir, check=True)
    whole = time.perf_counter() - start
    print(f"whole python process (start-up, warm-up run and {args.runs} run(s)): {whole:.1f} s")
    if not args.record:
        return
    command = (f"python bench/airbench.py --variant {args.variant} --val-split {args.val_split} --seed {args.seed} "
               f"--runs {args.runs}" + (f" --first-run {args.first_run}" if args.first_run else ""))
    subject = f"airbench{args.variant} (PyPI 0.1.8){' CPU port' if cpu else ''}"
    for i, line in enumerate((workdir / "runs.jsonl").read_text().splitlines()):
        run = json.loads(line)
        seed = f"split {args.seed} run {args.first_run + i}"
        record("airbench", subject, "val_acc", float(run["tta_val_acc"]), command, seed=seed)
        record("airbench", subject, "train_s", float(run["total_time_seconds"]), command, seed=seed)
    # One process for all runs: its time per run, as a launch of the suite is one run.
    record("airbench", subject, "process_s", whole / args.runs, command, seed=f"split {args.seed}, {args.runs} runs"
           + (f" from run {args.first_run}" if args.first_run else ""))


if __name__ == "__main__":
    main()
