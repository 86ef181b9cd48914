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




def _machine(speed, steps: int):
    """Blocks of ``steps`` one-second steps on a simulated shared machine running at ``speed(t)`` (1 = alone);
    ``block(round)`` advances the common clock by the block's duration and returns its rate. Full and bare
    do the same work, so any overhead read from them is the measurement's."""
    clock = [0.0]

    def block(_round: int) -> float:
        start = clock[0]
        for _ in range(steps):
            clock[0] += 1 / speed(clock[0])
        return steps / (clock[0] - start)
    return block


def test_step_overhead_reads_no_overhead_from_someone_elses_load():
    sys.path.insert(0, str(ROOT / "bench"))
    from step_overhead import overhead_pct, paired_rounds

    # Another job halves the machine for 12 s of every 20. The bench's blocks (5 steps, 10 rounds) catch
    # quiet stretches for both paths; the 20-step blocks it had (3 rounds) never did, and read 5+%.
    def load(t):
        return 0.5 if t % 20 < 12 else 1.0

    block = _machine(load, 5)
    full, bare = paired_rounds(block, block, 11)
    assert abs(overhead_pct(full[1:], bare[1:])) < 1e-9  # round 0 is the warm-up
    assert min(full + bare) < 0.75  # and load there was
    block = _machine(load, 20)
    full, bare = paired_rounds(block, block, 4)
    assert abs(overhead_pct(full[1:], bare[1:])) > 5
