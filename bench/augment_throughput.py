"""Benchmark: batched augmentation (resnet/augment.py) vs torchvision per-image transforms, same ops.

    python bench/augment_throughput.py [--batch 512] [--repeats 3] [--threads N]

Prints images/s for each augmentation and for the report's full set, per-image in one process (what
one DataLoader worker delivers) and batched on the CPU (and on CUDA when available).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resnet.augment import AugmentConfig, BatchAugment  # noqa: E402
from resnet.data import MEAN, STD  # noqa: E402
from resnet.loader import per_image_transform  # noqa: E402

CASES = {
    "flip": AugmentConfig(hflip=0.5),
    "translate 4": AugmentConfig(translate=4),
    "resized crop": AugmentConfig(crop_scale=0.35),
    "rotation 15": AugmentConfig(rotation=15),
    "color jitter": AugmentConfig(color_jitter=0.4, hue=0.1),
    "gaussian blur": AugmentConfig(blur_sigma=1.5),
    "cutout 8": AugmentConfig(cutout=8),
    "report set": AugmentConfig(crop_scale=0.8, hflip=0.5, vflip=0.1, rotation=15, color_jitter=0.2, hue=0.05,
                                jitter_p=0.8, blur_sigma=1.0, blur_p=0.2, cutout=8),
}


def best_rate(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return n_images / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images = np.random.default_rng(0).integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8)
    pil = [Image.fromarray(im) for im in images]
    batch_cpu = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"batch {args.batch}, torch threads {torch.get_num_threads()}, best of {args.repeats}")
    header = f"{'augmentation':<15}{'per-image img/s':>17}" + "".join(f"{'batched ' + d + ' img/s':>22}" for d in devices)
    print(header + f"{'speed-up (cpu)':>16}")
    for name, cfg in CASES.items():
        per_image = per_image_transform(cfg, MEAN, STD)
        slow = best_rate(lambda: [per_image(im) for im in pil], len(pil), args.repeats)
        rates = []
        for dev in devices:
            aug, x = BatchAugment(cfg, MEAN, STD), batch_cpu.to(dev)
            gen = torch.Generator(device=dev).manual_seed(0)
            rates.append(best_rate(lambda: aug(x, gen), len(x), args.repeats))
        print(f"{name:<15}{slow:>17,.0f}" + "".join(f"{r:>22,.0f}" for r in rates) + f"{rates[0] / slow:>15.1f}x")


if __name__ == "__main__":
    main()
