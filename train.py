"""Train a CIFAR-10 ResNet.  Run `accelerate launch train.py --help` for every flag."""
from resnet.config import TrainConfig, parse_config
from resnet.training import train


def main(cfg: TrainConfig) -> dict:
    return train(cfg)


if __name__ == "__main__":
    main(parse_config(TrainConfig, description=__doc__))
