"""The benches' own plumbing, without running them: the GPU session's commands are valid train.py runs."""
import shlex
import subprocess
import sys

from conftest import ROOT
from resnet.config import TrainConfig, parse_config


def test_the_gpu_session_lists_valid_commands_in_order_of_importance():
    proc = subprocess.run([sys.executable, "bench/gpu_session.py", "--dry-run", "--data-dir", "/data"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    groups = [line.split("]")[0][1:] for line in lines]
    assert groups == sorted(groups, key=["loop", "recipes"].index)  # the loop's figures first
    recipes = []
    for line in lines:
        cmd = shlex.split(line.split("] ", 1)[1])
        assert (ROOT / cmd[1]).is_file(), cmd[1]
        if cmd[1] == "bench/time_to_accuracy.py":
            recipe = cmd[cmd.index("--recipe") + 1]
            train_flags = cmd[cmd.index("--") + 1:]
            config = ["--config", str(ROOT / recipe)] if recipe != "none" else []
            cfg = parse_config(TrainConfig, [*config, *train_flags])
            assert cfg.split_seed == 0  # every run on the split the airbench runs use
            recipes.append(recipe)
        if cmd[1] in ("bench/time_to_accuracy.py", "bench/airbench.py"):
            assert "--record" in cmd and cmd[cmd.index("--data-dir") + 1] == "/data"
    assert recipes.count("configs/fast.yaml") == 3 and recipes.count("configs/best95.yaml") == 3
    assert "none" in recipes and "configs/report.yaml" in recipes
