"""Train a CIFAR-10 ResNet.  Usage: accelerate launch train.py [--config recipe.yaml] [flags]"""
from resnet.cli import run_script
from resnet.config import TrainConfig
from resnet.training import train


def main(cfg: TrainConfig) -> dict:
    return train(cfg)


if __name__ == "__main__":
    run_script(TrainConfig, main, __doc__)
