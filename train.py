"""Train a CIFAR-10 ResNet.  Usage: accelerate launch train.py [--config recipe.yaml] [flags]

Device, process count and precision (fp32 or bf16) are not flags of train.py: the accelerate config sets
them. A bare `accelerate launch train.py` reads accelerate's default config; write one for this machine
(its GPUs or CPU, bf16 where computed natively) with `python -m resnet.hardware --write-accelerate-config`,
or name one: `accelerate launch --config_file accelerate_configs/bf16.yaml train.py ...`. The start-up
line says the device and precision used. One GPU of several, with a one-process config:
  CUDA_VISIBLE_DEVICES=1 accelerate launch --config_file accelerate_configs/bf16.yaml train.py ...
  accelerate launch --config_file accelerate_configs/bf16.yaml --gpu_ids 1 train.py ...
See docs/training.md and docs/distributed.md.
"""
from resnet.cli import run_script
from resnet.config import TrainConfig
from resnet.training import train


def main(cfg: TrainConfig) -> dict:
    return train(cfg)


if __name__ == "__main__":
    run_script(TrainConfig, main, __doc__)
