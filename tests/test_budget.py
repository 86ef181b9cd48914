"""--time-budget: the plan from measured costs, the schedule scaled to it, the refusals, and real budgeted
launches (ends in time, repeats from its config.yaml, finishes its plan after a stop)."""
import json
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY_RUN, run_cli, start_and_signal
from resnet import budget, training
from resnet.config import TrainConfig, load_recipe, parse_config
from resnet.knobs import ConfigError

# ------------------------------------------------------------------------------------------------
# The plan, from costs given as numbers (the clock a launch would have measured)
NO_OVERHEAD = dict(first_step_extra_s=0.0, setup_s=0.0, eval_image_s=0.0, save_s=0.0)


def test_the_plan_fills_the_time_left_with_steps_at_the_measured_rate():
    costs = budget.Costs(step_s=0.5, **NO_OVERHEAD)
    shape = budget.Shape(steps_per_epoch=10, val_images=0, probe_images=0, eval_every=1, tta=0)
    assert budget.plan_steps(budget.CLOSING_S + 24.0, costs, shape) == 48  # 24 s at 2 steps a second
    slower = budget.Costs(step_s=1.0, **{**NO_OVERHEAD, "setup_s": 4.0, "first_step_extra_s": 6.0})
    assert budget.plan_steps(budget.CLOSING_S + 24.0, slower, shape) == 14  # 10 s of start-up first


def test_the_plan_counts_every_validation_and_the_last_ones_tta():
    """10 steps an epoch of 1 s; validating 100 images costs 1 s, TTA 2 adds 6 passes to the last."""
    costs = budget.Costs(step_s=1.0, first_step_extra_s=0.0, setup_s=0.0, eval_image_s=0.01, save_s=0.5)
    shape = budget.Shape(steps_per_epoch=10, val_images=100, probe_images=50, eval_every=1, tta=2)
    one_epoch = 10 + 7 + 0.5  # steps, the last validation with TTA, its save
    assert budget.launch_seconds(10, costs, shape) == pytest.approx(budget.CLOSING_S + one_epoch)
    assert budget.plan_steps(budget.CLOSING_S + one_epoch, costs, shape) == 10
    # An 11th step starts a second epoch: one more validation and save before the last
    assert budget.launch_seconds(11, costs, shape) == pytest.approx(budget.CLOSING_S + one_epoch + 1 + 1 + 0.5)
    assert budget.plan_steps(budget.CLOSING_S + one_epoch + 2.4, costs, shape) == 10
    # Validating every 2nd epoch: the epochs between check 50 training images instead (0.5 s)
    sparse = budget.Shape(steps_per_epoch=10, val_images=100, probe_images=50, eval_every=2, tta=2)
    assert budget.launch_seconds(30, costs, sparse) == pytest.approx(budget.CLOSING_S + 30 + 0.5 + 1 + 7 + 3 * 0.5)
    assert budget.plan_steps(budget.launch_seconds(1, costs, shape) - 0.1, costs, shape) == 0


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("15m", 900), ("1h", 3600), ("1h30m", 5400),
                                           ("1.5h", 5400), ("600", 600), ("2m 30s", 150)])
def test_durations_read_as_a_user_types_them(text, seconds):
    assert budget.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "15x", "0", "m", "-5m", "1h30"])
def test_a_duration_that_is_not_one_is_refused_naming_the_flag(text):
    with pytest.raises(ConfigError, match="--time-budget"):
        budget.parse_duration(text)


# ------------------------------------------------------------------------------------------------
# The schedule scaled to the plan
def test_every_length_in_epochs_scales_to_the_planned_length(cifar_dir, tmp_path):
    recipe = parse_config(TrainConfig, ["--config", str(ROOT / "configs/fast.yaml"), "--warmup-epochs", "2",
                                        "--lookahead-ema", "5", "--lookahead-ema-start", "4"])
    scaled = budget.scaled_config(recipe, 2.0)  # a quarter of fast.yaml's 8 epochs
    assert (scaled.epochs, scaled.warmup_epochs, scaled.whiten_bias_epochs, scaled.lookahead_ema_start) == \
        (2.0, 0.5, 0.75, 1.0)
    assert scaled.lr == recipe.lr and scaled.batch_size == recipe.batch_size  # nothing else moves

    # A run built from the scaled config: its cosine schedule warms up over the scaled epochs and ends at 0
    # exactly at the planned last update.
    cfg = parse_config(TrainConfig, [*TINY_RUN, "--data-dir", str(cifar_dir), "--wandb", "off", "--epochs", "8",
                                     "--warmup-epochs", "2", "--run-dir", str(tmp_path / "run")])
    run = training.setup_run(budget.scaled_config(cfg, 23 / 9), announce=False)  # 23 steps of 9 an epoch
    assert run.total_steps == 23
    warm = round(0.25 * 23 / 9 * 9)  # 2 of the recipe's 8 epochs
    peak = run.schedule.lr_at(warm)
    assert run.schedule.lr_at(warm - 1) < peak and run.schedule.lr_at(warm + 1) < peak
    assert run.schedule.lr_at(23) == pytest.approx(0.0, abs=1e-12)
    assert run.schedule.lr_at(22) > 0


# ------------------------------------------------------------------------------------------------
# Measuring
class CountedPasses:
    """A run's train loader that counts the batches drawn from each pass it starts."""

    def __init__(self, loader):
        self.loader, self.drawn = loader, []

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch, skip=0):
        self.loader.set_epoch(epoch, skip)

    def __iter__(self):
        self.drawn.append(0)
        for batch in self.loader:
            self.drawn[-1] += 1
            yield batch


def test_the_step_timing_draws_consecutive_batches_and_starts_a_pass_only_when_one_ends(cifar_dir, tmp_path):
    """Timing blocks of a few seconds that each started a pass would weigh its start (the workers' first
    batches) far above an epoch's share."""
    cfg = parse_config(TrainConfig, [*TINY_RUN, "--data-dir", str(cifar_dir), "--wandb", "off",
                                     "--run-dir", str(tmp_path / "run")])
    run = training.setup_run(cfg, announce=False)
    run.train_loader = counted = CountedPasses(run.train_loader)
    costs = budget.measure_costs(run, budget_s=60, setup_s=1.0)
    assert sum(counted.drawn) > 2  # the warm-up's 2 steps and the timed blocks'
    assert all(drawn == run.steps_per_epoch for drawn in counted.drawn[:-1]), counted.drawn
    assert 0 < costs.step_s and costs.setup_s == 1.0 and costs.eval_image_s > 0 and costs.save_s > 0


# ------------------------------------------------------------------------------------------------
# Refusals
def budgeted(cifar_dir: Path, run_dir: Path, seconds: str, *flags: str) -> TrainConfig:
    return parse_config(TrainConfig, [*TINY_RUN, "--data-dir", str(cifar_dir), "--wandb", "off", "--time-budget",
                                      seconds, "--run-dir", str(run_dir), *flags])


def test_a_budget_too_small_for_one_step_and_evaluation_is_refused_naming_the_minimum(cifar_dir, tmp_path):
    run_dir = tmp_path / "run"
    # A launch that started 95 s before a 100 s budget: the plan aims at 96 s, and measuring takes 5 s at least.
    with pytest.raises(ConfigError) as refused:
        budget.plan_budget(budgeted(cifar_dir, run_dir, "100s"), training.setup_run, started=time.time() - 95)
    least = re.fullmatch(r"--time-budget 100s: .*; give at least (\d+)m (\d+)s", str(refused.value))
    assert least and 60 * int(least[1]) + int(least[2]) > 100, str(refused.value)
    assert not run_dir.exists()  # the folder made for the refused plan is gone
    with pytest.raises(ConfigError, match=r"start-up alone took 16m 0\ds; give at least 40m"):
        budget.plan_budget(budgeted(cifar_dir, run_dir, "15m"), training.setup_run, started=time.time() - 960)


@pytest.mark.parametrize("epochs, hinted", [("5000", True), ("10", False)])
def test_the_plan_points_to_a_short_run_recipe_when_a_long_schedule_is_cut_to_a_fraction(cifar_dir, tmp_path, capsys,
                                                                                         epochs, hinted):
    _, plan = budget.plan_budget(budgeted(cifar_dir, tmp_path / "run", "20s", "--epochs", epochs), training.setup_run,
                                 started=time.time())
    out = capsys.readouterr().out
    squeezed = plan.planned_epochs / float(epochs) < budget.SQUEEZED
    assert squeezed == hinted  # the tiny data fits far more than 10 epochs in 20 s
    assert ("of this recipe's 5000 epochs fit; a recipe made for short runs" in out) == hinted, out
    assert ("--config configs/fast.yaml" in out) == hinted


def test_a_budget_too_small_is_refused_through_the_command_line_in_one_line(cifar_dir, tmp_path):
    args = ["train.py", *TINY_RUN, "--data-dir", str(cifar_dir), "--wandb", "off", "--run-dir", str(tmp_path / "r")]
    proc = run_cli(*args, "--time-budget", "1s", check=False)  # under accelerate launch, whose start counts
    assert proc.returncode != 0  # the launcher's 1 for train.py's 2
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and re.match(r"error: --time-budget 1s: start-up alone took \d+s; give at least \d+s$",
                                        error[0]), proc.stderr[-2000:]
    assert not (tmp_path / "r").exists()
    proc = run_cli(*args, "--time-budget", "soon", check=False, config=None)
    assert proc.returncode == 2 and "error: --time-budget: expected a duration like 90s, 15m, 1h" in proc.stderr


# ------------------------------------------------------------------------------------------------
# Real budgeted launches
BUDGET_S = 40


def launch_budgeted(cifar_dir: Path, run_dir: Path, config: str = "cpu.yaml") -> list[str]:
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    return [accelerate, "launch", "--config_file", str(ROOT / "accelerate_configs" / config), "train.py",
            *TINY_RUN, "--progress", "--data-dir", str(cifar_dir), "--wandb", "off", "--tta", "2",
            "--time-budget", f"{BUDGET_S}s", "--run-dir", str(run_dir)]


def same_weights(a: Path, b: Path) -> None:
    first, second = load_file(str(a / "last.safetensors")), load_file(str(b / "last.safetensors"))
    assert first.keys() == second.keys()
    for k in first:
        torch.testing.assert_close(first[k], second[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_budgeted_launch_ends_in_time_and_its_config_records_the_plan(cifar_dir, tmp_path):
    run_dir = tmp_path / "budgeted"
    start = time.perf_counter()
    proc = run_cli(*launch_budgeted(cifar_dir, run_dir)[4:], "--no-progress")  # run_cli adds the launcher
    wall = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    plan = summary["budget"]
    assert plan["seconds"] == BUDGET_S and summary["finished"]
    # The whole launch, from outside: the plan aims at 96% of the budget, the bench (results/) measures the spread.
    assert wall <= 1.03 * BUDGET_S + 1.0, proc.stdout[-3000:]
    assert 0.5 * BUDGET_S <= plan["used_s"] <= wall
    assert f"of the {BUDGET_S}s budget (" in proc.stdout.splitlines()[-1]
    assert re.search(rf"time budget {BUDGET_S}s: measured \d+ img/s; plan {plan['steps']} steps = ", proc.stdout)
    assert summary["steps_done"] == summary["steps"] == plan["steps"]
    saved = load_recipe(TrainConfig, run_dir / "config.yaml")
    assert "time_budget" not in saved and saved["epochs"] == pytest.approx(plan["planned_epochs"])
    assert saved["warmup_epochs"] == pytest.approx(plan["planned_epochs"] / 40)  # the default 1 of 40 epochs
    assert f"# planned by --time-budget {BUDGET_S}s" in (run_dir / "config.yaml").read_text()


@pytest.mark.slow
def test_ranks_whose_clocks_disagree_time_the_same_steps(cifar_dir, tmp_path):
    """Under DDP: a rank that ended a timing block on its own clock, before the other, would stop stepping
    while the other all-reduces, and the launch would hang."""
    run_dir = tmp_path / "run"
    run_cli(str(ROOT / "tests" / "ddp_skewed_clock_probe.py"), *TINY_RUN, "--data-dir", str(cifar_dir),
            "--wandb", "off", "--time-budget", "25s", "--run-dir", str(run_dir), config="cpu_ddp.yaml", timeout=150)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["steps_done"] == summary["budget"]["steps"] > 0


@pytest.mark.slow
def test_a_stopped_budgeted_run_resumes_to_finish_its_plan(cifar_dir, tmp_path):
    """Under DDP (2 processes): ranks that planned apart would stop at different steps and hang."""
    run_dir = tmp_path / "run"
    code, out, err = start_and_signal(launch_budgeted(cifar_dir, run_dir, "cpu_ddp.yaml"), signal.SIGTERM,
                                      re.compile(r"epoch 3: +[1-6]\d%"))
    assert code != 0 and "state saved. Continue with: " in err
    planned = load_recipe(TrainConfig, run_dir / "config.yaml")["epochs"]
    resume = err.split("Continue with: ")[1].splitlines()[0].split()
    # The printed command, with the budget typed again: it finishes the plan, it does not plan again.
    proc = run_cli(*resume[resume.index("train.py"):], "--no-progress", "--time-budget", f"{BUDGET_S}s",
                   config="cpu_ddp.yaml")
    assert f"--time-budget {BUDGET_S}s: a resume finishes the run's own plan" in proc.stdout
    assert f"of the {BUDGET_S}s budget (" in proc.stdout.splitlines()[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["changes"] == []  # nothing changed: the plan's own lengths
    assert summary["steps_done"] == summary["budget"]["steps"] == round(planned * summary["steps_per_epoch"])

    # Its config.yaml repeats the same experiment, uninterrupted: the same steps and weights, no budget
    straight = tmp_path / "straight"
    run_cli("train.py", "--config", str(run_dir / "config.yaml"), "--data-dir", str(cifar_dir), "--no-progress",
            "--no-download", "--wandb", "off", "--run-dir", str(straight), config="cpu_ddp.yaml")
    repeated = json.loads((straight / "summary.json").read_text())
    assert repeated["steps"] == summary["steps"] and repeated["budget"] is None
    same_weights(run_dir, straight)

    # A budget given to a resume of a run that had none is refused
    plain = tmp_path / "plain"
    training.train(parse_config(TrainConfig, [*TINY_RUN, "--data-dir", str(cifar_dir), "--wandb", "off",
                                              "--epochs", "1", "--run-dir", str(plain)]))
    refused = run_cli("train.py", "--resume", str(plain), "--time-budget", "1m", check=False, config=None)
    assert refused.returncode == 2 and f"--time-budget: {plain} was not planned by a budget" in refused.stderr
