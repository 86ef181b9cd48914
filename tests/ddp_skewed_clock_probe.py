"""Launched by test_budget.py under `accelerate launch`: train.py, with rank 1 reading its step times 3x long.

Usage: ddp_skewed_clock_probe.py [train.py flags]. Ranks that timed a budget's steps each on their own clock
would end their timing blocks apart, and their all-reduces would no longer pair up.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resnet import engine  # noqa: E402
from resnet.cli import run_script  # noqa: E402
from resnet.config import TrainConfig  # noqa: E402
from resnet.training import train  # noqa: E402

if os.environ.get("RANK") == "1":
    timed = engine.train_epoch  # measure_costs imports it when called, so it gets this one

    def slow_clock(*args, **kwargs):
        outcome = timed(*args, **kwargs)
        outcome.sums.elapsed *= 3
        return outcome

    engine.train_epoch = slow_clock

run_script(TrainConfig, train, __doc__, sys.argv[1:])
