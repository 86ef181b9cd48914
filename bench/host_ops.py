"""Benchmark (runs on a CPU): tensor operations dispatched and values read back per training step.

    python bench/host_ops.py [--batch-size 8] [--record]

On a GPU each operation costs the host a few microseconds in eager PyTorch (checks, dispatch, a kernel
launch), whatever the batch size, and a read-back (``.item()``, ``.tolist()``, ``bool(tensor)``) makes the
host wait until the GPU has finished everything queued. This counts both per step of the suite's real
loop (``engine.train_epoch`` over a run built by ``training.setup_run``, bf16 autocast as on a GPU) with a
TorchDispatchMode, against the bare forward + backward + optimizer step of the same net, so the parts that
cost the host show without a GPU. Views are counted too (no kernel, but host time). The optimizers' foreach
paths are the ones CUDA takes. Muon's Newton-Schulz chain is compiled on CUDA (one call from the host):
it is counted as one operation, and its eager operations apart.
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resnet import optim, training  # noqa: E402
from resnet.config import TrainConfig, parse_config  # noqa: E402
from resnet.engine import EpochPlan, train_epoch  # noqa: E402
from resnet.interrupt import StopRequest  # noqa: E402
from resnet.models import create_model  # noqa: E402
from results import record  # noqa: E402

READ_BACKS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_read_backs(counts: Counter):
    """Count the calls of every Tensor method that copies a value to the host."""
    patches = []
    for name in READ_BACKS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            counts[_name] += 1
            return _real(self, *a, **k)
        patches.append(mock.patch.object(torch.Tensor, name, counted))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def write_images(folder: Path, n: int) -> None:
    """A tiny CIFAR-format training set (n images) for setup_run."""
    import pickle

    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        rows = rng.integers(0, 256, (n // 5, 3072), dtype=np.uint8)
        data = {"data": rows, "labels": (np.arange(n // 5) % 10).tolist()}
        (batches / f"data_batch_{i}").write_bytes(pickle.dumps(data, protocol=2))


READ_STEPS = 50  # steps of the pass that counts read-backs (they come every check_every steps)


def loop_counts(flags: list[str], data: Path, steps: int = 6, check_every: int = 25,
                compiled_calls: int = 0) -> tuple[Counter, Counter]:
    """(ops per step, read-backs per step) of steady-state steps of a run with train.py ``flags``.

    The first pass creates the optimizer's state and is not counted; ops are (ops of a steps-step pass -
    ops of a 2-step pass) / (steps - 2), which leaves out each pass's own start and end (the read at the
    end of an epoch); read-backs are counted over a whole pass of READ_STEPS steps, its end included.
    """
    cfg = parse_config(TrainConfig, [*flags, "--data-dir", str(data), "--no-download", "--wandb", "off",
                                     "--val-split", "0", "--no-progress", "--run-dir", tempfile.mkdtemp(),
                                     "--check-every", str(check_every)])
    run = training.setup_run(cfg)
    ops = []
    with StopRequest() as stop:
        for n in (2, 2, steps):
            counter = OpCounter()
            run.train_loader.set_epoch(0)
            with counter:
                train_epoch(run.parts, run.train_loader, run.schedule, EpochPlan(0, 0, n, 0), stop, check_every,
                            progress=False)
            ops.append(counter.ops)
        reads = Counter()
        run.train_loader.set_epoch(1)
        with counting_read_backs(reads):
            train_epoch(run.parts, run.train_loader, run.schedule, EpochPlan(1, 0, READ_STEPS, 0), stop,
                        check_every, progress=False)
    per_step = Counter({k: (ops[2][k] - ops[1][k]) / (steps - 2) for k in ops[2] if ops[2][k] > ops[1][k]})
    if compiled_calls:
        per_step["newton_schulz (compiled on CUDA)"] = compiled_calls
    return per_step, Counter({k: v / READ_STEPS for k, v in reads.items()})


def bare_ops(model_name: str, batch_size: int, **model_kwargs) -> Counter:
    """One forward + backward + Nesterov SGD step of the net alone (bf16 autocast, CUDA's foreach update)."""
    model = create_model(model_name, **model_kwargs).to(memory_format=torch.channels_last)
    optimizer = optim.create_optimizer(model, "nesterov", 0.05, 5e-4)
    x = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.arange(batch_size) % 10
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    counter = OpCounter()
    for counting in (False, True):  # count the second step: the first creates the momentum buffers
        with counter if counting else contextlib.nullcontext():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return counter.ops


@contextlib.contextmanager
def newton_schulz_as_one_call(eager: Counter):
    """Hide Muon's Newton-Schulz chain from the counters (loop_counts adds it back as one operation, as its
    compiled form on CUDA is called); ``eager`` gets its eager ops and ``calls``."""
    real = optim.newton_schulz

    def one_call(*a, **k):
        inner = OpCounter()
        with _disable_current_modes(), inner:
            out = real(*a, **k)
        eager.update(inner.ops)
        eager["calls"] += 1
        return out
    with mock.patch.object(optim, "newton_schulz", one_call):
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--record", action="store_true", help="append the figures to results/cpu.csv")
    args = parser.parse_args()
    # bf16 autocast's ops on any CPU: counted, not timed (set here, not on import: tests import the counter)
    os.environ.setdefault("RESNET_CPU_BF16", "1")
    os.environ.setdefault("ACCELERATE_MIXED_PRECISION", "bf16")
    data = Path(tempfile.mkdtemp()) / "data"
    write_images(data, (READ_STEPS + 5) * args.batch_size)
    # The nets at narrow widths: the same layers, so the same operations, in seconds rather than minutes
    # (bf16 is emulated on CPUs without native bf16).
    narrow = {"resnet_report_4m": (8, 16, 32, 64), "resnet_airbench_whiten_2m": (8, 16, 16)}
    width = {name: ["--model-kwargs", json.dumps({"widths": list(w)})] for name, w in narrow.items()}
    batch = ["--batch-size", str(args.batch_size)]
    fast = ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "fast.yaml"), *batch,
            *width["resnet_airbench_whiten_2m"]]
    report = [*batch, *width["resnet_report_4m"]]
    rows = [
        ("report net: bare forward + backward + Nesterov step",
         bare_ops("resnet_report_4m", args.batch_size, widths=narrow["resnet_report_4m"]), None),
        ("  default recipe's step (SGD, translate 4 + flip, label smoothing)", *loop_counts(report, data)),
        ("  + cutout 16 + EMA of the weights (best.yaml's extras)",
         *loop_counts([*report, "--cutout", "16", "--ema-decay", "0.999"], data)),
        ("whitened airbench net: bare forward + backward + Nesterov step",
         bare_ops("resnet_airbench_whiten_2m", args.batch_size, widths=narrow["resnet_airbench_whiten_2m"]), None),
    ]
    eager_ns = Counter()
    with newton_schulz_as_one_call(eager_ns):
        rows.append(("  fast.yaml's step (Muon, Newton-Schulz as one call; translate 2, alternating flip)",
                     *loop_counts(fast, data, compiled_calls=1)))
        rows.append(("  + airbench's lookahead-EMA at every step (the previous fast.yaml's)",
                     *loop_counts([*fast, "--lookahead-ema", "1", "--lookahead-ema-start", "0"], data,
                                  compiled_calls=1)))
    command = f"python bench/host_ops.py --batch-size {args.batch_size}"
    bare = None
    for name, ops, reads in rows:
        total = sum(ops.values())
        line = f"{total:7.0f} ops/step"
        if reads is None:
            bare = total
        else:
            line += f" ({100 * (total / bare - 1):+.0f}% over bare), {sum(reads.values()):.3f} read-backs/step"
        print(f"{line}  {name}")
        if reads is not None:
            print("         most: " + ", ".join(f"{k} {v:g}" for k, v in ops.most_common(6)))
        if args.record:
            record("host_ops", name.strip(), "ops_per_step", total, command)
            if reads is not None:
                record("host_ops", name.strip(), "readbacks_per_step", sum(reads.values()), command)
    calls = eager_ns.pop("calls")
    print(f"(Muon's Newton-Schulz chain, counted as one op above: {sum(eager_ns.values()) / calls:.0f} ops in "
          "eager mode, as on a CPU)")


if __name__ == "__main__":
    main()
