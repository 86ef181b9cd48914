"""Write a Kaggle-style predictions file (header ID,Labels) for a custom test pickle.

Usage: python predict.py --data custom_test.pkl --out submission.csv [--checkpoint runs/<run>] [--tta]
"""
from resnet.cli import run_script
from resnet.config import PredictConfig
from resnet.inference import run_predict


def main(cfg: PredictConfig):
    return run_predict(cfg)


if __name__ == "__main__":
    run_script(PredictConfig, main, __doc__)
