"""What this machine computes fast: the CPU's model and bf16 support, and the precision to train in.

    python -m resnet.hardware      # prints the CPU, its bf16 support, the GPUs, and the accelerate config to use
    python -m resnet.hardware --write-accelerate-config   # writes accelerate's default config for this machine

bf16 autocast on a CPU is only fast where the CPU computes bf16 itself (x86: AVX512-BF16 or AMX; Arm:
what oneDNN reports as bf16 support). Elsewhere oneDNN emulates it: measured on a 2-core AMD EPYC (AVX2,
no AVX-512), resnet_airbench_2m at batch 256 ran 10.8 images/s in bf16 against 199 in fp32 (18x slower).

The written config is the file a bare ``accelerate launch train.py`` reads (where ``accelerate config
default`` writes it: under HF_HOME, else XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface). It sets
every value accelerate launch otherwise warns about having defaulted, and the precision this machine
computes fast: bf16 on a GPU or CPU that computes it natively, else fp32.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

# RESNET_CPU_BF16=1 keeps bf16 on a CPU without native support (to test bf16 numerics, not for speed);
# =0 treats every CPU as one without it.
FORCE_ENV = "RESNET_CPU_BF16"
# How much slower emulated bf16 is than fp32 on a CPU without native bf16 (the module docstring's measurement):
# the one phrase every message and doc uses.
EMULATED_BF16_SLOWDOWN = "about 18x"


def cpu_model() -> str:
    """The CPU's marketing name, e.g. 'AMD EPYC 7B13' (Linux: /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_bf16_features() -> dict[str, bool]:
    """The CPU features that make bf16 fast, as torch sees them."""
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        return {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx": torch.cpu._is_amx_tile_supported()}
    return {"onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}


def cpu_has_native_bf16() -> bool:
    """True where bf16 autocast on this CPU is faster than fp32 (see the module docstring); RESNET_CPU_BF16 overrides."""
    forced = os.environ.get(FORCE_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return any(cpu_bf16_features().values())


def describe_cpu() -> str:
    """'AMD EPYC 7B13, 2 cores, AVX2, no native bf16': the CPU, its widest SIMD as torch uses it, its bf16."""
    features = cpu_bf16_features()
    have = [name for name, on in features.items() if on]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    bf16 = f"native bf16 ({', '.join(have)})" if have else "no native bf16"
    return f"{cpu_model()}, {cores} cores, {torch.backends.cpu.get_cpu_capability()}, {bf16}"


def gpu_has_native_bf16() -> bool:
    """True where the GPU computes bf16 itself (NVIDIA Ampere or newer), not by emulation."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def accelerate_config_path() -> Path:
    """The file a bare ``accelerate launch`` reads, as accelerate itself computes it (from HF_HOME or
    XDG_CACHE_HOME, read when accelerate's config module is first imported)."""
    from accelerate.commands.config.config_args import default_config_file
    return Path(default_config_file)


def accelerate_config_for_machine() -> dict:
    """accelerate's config for this machine: every GPU with DDP, or one process on the CPU; bf16 where it is
    computed natively, else fp32. Every value accelerate launch would otherwise default with a warning.

    ``use_cpu`` stays false on a CPU-only machine: with it, accelerate launch warns that it chose the thread
    count; without it, it sets one thread and the scripts give each process its share of the cores
    (resnet.distributed.use_all_cores), so the run is the same and silent. The scripts train on the CPU
    whenever no accelerator exists."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    bf16 = gpu_has_native_bf16() if gpus else cpu_has_native_bf16()
    config = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU" if gpus > 1 else "NO",
              "num_processes": max(gpus, 1), "num_machines": 1, "machine_rank": 0,
              "mixed_precision": "bf16" if bf16 else "no", "use_cpu": False, "dynamo_config": {}, "debug": False,
              "enable_cpu_affinity": False}
    if gpus:
        config["gpu_ids"] = "all"
    return config


def describe_config(config: dict) -> str:
    """'1 process on the CPU, bf16' or '8 GPUs with DDP, fp32'."""
    n, precision = config["num_processes"], "bf16" if config["mixed_precision"] == "bf16" else "fp32"
    if "gpu_ids" not in config:
        return f"1 process on the CPU, {precision}"
    return f"{n} GPUs with DDP, {precision}" if n > 1 else f"1 GPU, {precision}"


def write_accelerate_config(force: bool = False) -> Path:
    """Write accelerate_config_for_machine() where a bare ``accelerate launch`` reads it; FileExistsError
    when a config is there already and not ``force``."""
    import yaml

    path, config = accelerate_config_path(), accelerate_config_for_machine()
    if path.exists() and not force:
        raise FileExistsError(path)
    why = ("bf16: computed natively here" if config["mixed_precision"] == "bf16" else
           f"fp32: bf16 would be emulated here, {EMULATED_BF16_SLOWDOWN} slower" if "gpu_ids" not in config else
           "fp32: this GPU has no native bf16")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# Written by python -m resnet.hardware --write-accelerate-config: {describe_config(config)} "
                    f"({why}).\n" + yaml.safe_dump(config, sort_keys=False))
    return path


def precision_hint(accelerator) -> str | None:
    """One line when a run computes in fp32 on a device that computes bf16 natively (a faster precision left
    unused), else None."""
    if accelerator.mixed_precision not in (None, "no"):
        return None
    device = accelerator.device.type
    if device == "cpu" and cpu_has_native_bf16():
        where = "this CPU computes bf16 natively"
    elif device == "cuda" and gpu_has_native_bf16():
        where = "this GPU computes bf16 natively"
    else:
        return None
    return (f"hint: training in fp32, but {where} and bf16 trains faster: accelerate launch --mixed_precision bf16 "
            "train.py ..., or once for every launch: python -m resnet.hardware --write-accelerate-config")


def print_precision_hint(accelerator) -> None:
    """Print precision_hint() from the main process, if there is one (train.py calls this at start-up)."""
    hint = precision_hint(accelerator)
    if hint:
        accelerator.print(hint)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnet.hardware", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-accelerate-config", action="store_true",
                        help="write accelerate's default config for this machine, so that a bare "
                             "`accelerate launch train.py` uses its devices and fast precision without a warning")
    parser.add_argument("--force", action="store_true", help="with --write-accelerate-config: replace an existing file")
    args = parser.parse_args(argv)
    if args.write_accelerate_config:
        try:
            path = write_accelerate_config(force=args.force)
        except FileExistsError as e:
            print(f"error: {e} exists (accelerate launch reads it); not replaced: add --force to replace it",
                  file=sys.stderr)
            return 1
        print(f"wrote {path}: {describe_config(accelerate_config_for_machine())}; "
              "accelerate launch train.py ... now uses it")
        return 0
    print(f"CPU: {describe_cpu()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"GPU {i}: {torch.cuda.get_device_name(i)} (bf16: {torch.cuda.is_bf16_supported()})")
        one = "bf16.yaml" if gpu_has_native_bf16() else "single_gpu.yaml (fp32)"
        print(f"train on the GPU: accelerate_configs/{one} (one) or multi_gpu.yaml (all of them)")
    elif cpu_has_native_bf16():
        print("train in bf16 on this CPU: accelerate launch --config_file accelerate_configs/bf16.yaml train.py ...")
    else:
        print("train in fp32 on this CPU: accelerate launch --config_file accelerate_configs/cpu.yaml train.py ... "
              f"(bf16 would be emulated here, {EMULATED_BF16_SLOWDOWN} slower; a bf16 config falls back to fp32 "
              "and says so)")
    print("or write accelerate's default config for this machine, for a bare accelerate launch: "
          "python -m resnet.hardware --write-accelerate-config")
    return 0


if __name__ == "__main__":
    sys.exit(main())
