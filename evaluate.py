"""Score a trained run: accuracy, loss, per-class accuracy and confusion matrix (printed, JSON and PNG).

Usage: python evaluate.py --checkpoint runs/<run> [--split test|val] [--data labeled.pkl] [--tta]
"""
from resnet.cli import run_script
from resnet.config import EvalConfig
from resnet.inference import run_evaluate


def main(cfg: EvalConfig) -> dict:
    return run_evaluate(cfg)


if __name__ == "__main__":
    run_script(EvalConfig, main, __doc__)
