"""Launched by test_distributed.py under `accelerate launch`: train, then save what this rank holds.

Usage: ddp_train_probe.py OUT_DIR [train.py flags] -> OUT_DIR/rank<r>.pt with rank, world size,
final train loss, the model's state dict and, with --ema-decay, the EMA's.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accelerate import PartialState  # noqa: E402

from resnet.config import TrainConfig, parse_config  # noqa: E402
from resnet.training import train  # noqa: E402


def main(out_dir: str, *flags: str) -> None:
    result = train(parse_config(TrainConfig, flags))
    state = PartialState()
    held = {"rank": state.process_index, "world_size": state.num_processes, "train_loss": result["train_loss"]}
    for key in ("model", "ema"):
        if result[key] is not None:
            held["state" if key == "model" else "ema"] = {k: v.detach().cpu() for k, v in result[key].state_dict().items()}
    torch.save(held, Path(out_dir, f"rank{state.process_index}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])
