"""What this machine computes fast: the CPU's model and bf16 support, and the precision to train in.

    python -m resnet.hardware      # prints the CPU, its bf16 support, the GPUs, and the accelerate config to use

bf16 autocast on a CPU is only fast where the CPU computes bf16 itself (x86: AVX512-BF16 or AMX; Arm:
what oneDNN reports as bf16 support). Elsewhere oneDNN emulates it: measured on a 2-core AMD EPYC (AVX2,
no AVX-512), resnet_airbench_2m at batch 256 ran 10.8 images/s in bf16 against 199 in fp32.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# RESNET_CPU_BF16=1 keeps bf16 on a CPU without native support (to test bf16 numerics, not for speed);
# =0 treats every CPU as one without it.
FORCE_ENV = "RESNET_CPU_BF16"


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


def main() -> None:
    print(f"CPU: {describe_cpu()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"GPU {i}: {torch.cuda.get_device_name(i)} (bf16: {torch.cuda.is_bf16_supported()})")
        print("train on the GPU: accelerate_configs/single_gpu.yaml (one) or multi_gpu.yaml (all of them)")
    elif cpu_has_native_bf16():
        print("train in bf16 on this CPU: accelerate launch --config_file accelerate_configs/bf16.yaml train.py ...")
    else:
        print("train in fp32 on this CPU: accelerate launch --config_file accelerate_configs/cpu.yaml train.py ... "
              "(bf16 would be emulated here, about 10-18x slower; a bf16 config falls back to fp32 and says so)")


if __name__ == "__main__":
    main()
