"""Launched by test_distributed.py under `accelerate launch`: one JSON per rank with what the rank saw.

Usage: ddp_eval_probe.py DATA.pkl OUT_DIR — evaluates a seeded tiny model on the labeled pickle.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resnet.data import MEAN, STD, load_custom_pickle  # noqa: E402
from resnet.distributed import create_accelerator, end_process_group  # noqa: E402
from resnet.engine import evaluate  # noqa: E402
from resnet.loader import eval_loader  # noqa: E402
from resnet.models import create_model  # noqa: E402


def main(data_path: str, out_dir: str) -> None:
    accelerator = create_accelerator()
    torch.manual_seed(0)
    model = accelerator.prepare_model(create_model("resnet_tiny_20k"), evaluation_mode=True)
    data = load_custom_pickle(data_path, need_labels=True)
    loader = accelerator.prepare(eval_loader(data.images, data.labels, batch_size=8))
    result = evaluate(model, loader, accelerator, MEAN, STD)
    local = sum(len(y) for _, y in loader)  # what this rank evaluated before the gather
    Path(out_dir, f"rank{accelerator.process_index}.json").write_text(json.dumps({
        "rank": accelerator.process_index, "world_size": accelerator.num_processes, "local_batches_images": local,
        "n": result["n"], "acc": result["acc"], "targets": result["targets"].tolist(),
        "preds": result["preds"].tolist(),
    }))
    end_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
