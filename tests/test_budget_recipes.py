"""bench/budget_recipes.py (issue 28): its order, what it counts as done, the budgets it takes from airbench's
rows, its picture, and one rehearsal of a real budgeted launch through its command line."""
import csv
import hashlib
import importlib.util
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from resnet.config import TrainConfig, parse_config
from resnet.data import cifar10_splits

sys.path.insert(0, str(ROOT / "bench"))
import budget_recipes as br  # noqa: E402
from results import hardware, record  # noqa: E402

ORDER = ["airbench94-seed0", "fast-at-airbench94-seed0", "airbench94-seed1", "fast-at-airbench94-seed1",
         "fast-at-half-airbench94-seed0", "fast-at-half-airbench94-seed1",
         "mission-30m-seed0", "report-30m-seed0", "mission-30m-seed1", "report-30m-seed1",
         "airbench95-seed0", "best95-at-airbench95-seed0", "best95-at-airbench95-seed1",
         "best95-at-half-airbench95-seed0", "best95-at-half-airbench95-seed1",
         "fast-5m-seed0", "mission-5m-seed0", "fast-5m-seed1", "mission-5m-seed1"]
AIRBENCH_CMD = "python bench/airbench.py --variant {v} --val-split 5000 --seed {split} --runs 1"


@pytest.fixture
def scratch_csv(tmp_path, monkeypatch):
    path = tmp_path / "cpu.csv"
    monkeypatch.setenv("RESNET_RESULTS_FILE", str(path))
    return path


def run_named(name: str) -> br.Run:
    return next(r for r in br.runs() if r.name == name)


def record_airbench(variant: str, run: int, acc: float, seconds: float, split: int = br.SPLIT_SEED) -> None:
    """Rows as bench/airbench.py --record writes them for one run."""
    command = AIRBENCH_CMD.format(v=variant, split=split) + (f" --first-run {run}" if run else "")
    subject = br.airbench_subject(variant)
    record("airbench", subject, "val_acc", acc, command, seed=f"split {split} run {run}")
    record("airbench", subject, "process_s", seconds, command, seed=f"split {split}, 1 runs")


def record_recipe(name: str, acc: float, wall: float) -> None:
    run = run_named(name)
    for metric, value in (("wall_s", wall), ("budget_s", wall + 5), ("val_acc", acc)):
        record(br.BENCH, br.subject(run), metric, value, "test", seed=run.seed)


def test_the_plan_puts_each_airbench_before_its_recipes_and_pairs_the_seeds():
    plan = br.runs()
    assert [r.name for r in plan] == ORDER
    for i, run in enumerate(plan):
        if run.anchor:  # its airbench is measured earlier in the same session
            assert any(r.variant == run.anchor for r in plan[:i]), run.name
    by_setting = {}
    for run in plan:
        if not run.variant:
            by_setting.setdefault(br.subject(run), set()).add(run.seed)
    assert all(seeds == {0, 1} for seeds in by_setting.values()), by_setting
    assert {r.budget_label for r in plan if r.recipe_label.startswith("mission")} == {"30m", "5m"}


def test_airbench_and_train_py_score_on_the_same_split_and_it_is_not_split_0(cifar_dir, tmp_path):
    rows, cpu = [], hardware()
    airbench_cmd = br.command(run_named("airbench94-seed1"), rows, cpu, "/data", tmp_path)
    train_cmd = br.train_command(run_named("fast-at-airbench94-seed1"), "600", "/data", tmp_path)
    split_seed = airbench_cmd[airbench_cmd.index("--seed") + 1]
    assert airbench_cmd[airbench_cmd.index("--first-run") + 1] == "1" and "--cpu" in airbench_cmd
    cfg = parse_config(TrainConfig, train_cmd[train_cmd.index("train.py") + 1:])
    assert cfg.split_seed == int(split_seed) == 1 and cfg.seed == 1 and cfg.time_budget == "600"
    assert cfg.val_split == int(airbench_cmd[airbench_cmd.index("--val-split") + 1]) == 5000
    assert cfg.overwrite and cfg.wandb == "off"
    # airbench.py --seed S writes exactly the images train.py --split-seed S holds out, in the same order.
    spec = importlib.util.spec_from_file_location("bench_airbench", ROOT / "bench" / "airbench.py")
    airbench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(airbench)
    airbench.write_airbench_sets(str(cifar_dir), 100, 1, tmp_path / "cifar10")
    test = torch.load(tmp_path / "cifar10" / "test.pt")
    _, val = cifar10_splits(cifar_dir, 100, 1, download=False)
    assert np.array_equal(test["images"].numpy(), val.images) and np.array_equal(test["labels"].numpy(), val.labels)
    _, val0 = cifar10_splits(cifar_dir, 100, 0, download=False)
    assert not np.array_equal(val0.images, val.images)


def test_done_runs_are_skipped_and_only_this_cpus_rows_count(scratch_csv, capsys):
    record_airbench("94", 0, 0.90, 1000.0)
    record_airbench("94", 1, 0.91, 990.0, split=0)  # another split: airbench94-seed1 is not done
    record_recipe("fast-at-airbench94-seed0", 0.905, 980.0)
    record_recipe("fast-at-half-airbench94-seed1", 0.88, 490.0)
    with scratch_csv.open("a", newline="") as f:  # another CPU's run of mission-30m-seed0
        csv.writer(f).writerow(["2026-12-05", "AMD EPYC, 2 cores, AVX2, no native bf16", "2.14.1", "x", br.BENCH,
                                br.subject(run_named("mission-30m-seed0")), "0", "val_acc", "0.8", "test"])
    assert br.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    done = {line.split()[1] for line in lines if line.split()[2:3] == ["done"]}
    assert done == {"airbench94-seed0", "fast-at-airbench94-seed0", "fast-at-half-airbench94-seed1"}
    assert lines[-1].startswith("19 runs: 3 done, 16 to run")
    # the budget of the runs to do: airbench94's measured 1000 s (not the other split's 990 s)
    commands = [shlex.split(line.split("$ ", 1)[1]) for line in lines if "$ " in line]
    budgets = {c[c.index("--run-dir") + 1].rsplit("/", 1)[1]: c[c.index("--time-budget") + 1]
               for c in commands if "--time-budget" in c}
    assert budgets["fast-at-airbench94-seed1"] == "1000" and budgets["fast-at-half-airbench94-seed0"] == "500"
    assert budgets["best95-at-airbench95-seed0"] == "<airbench95 time>" and budgets["report-30m-seed0"] == "1800"


def test_budgets_are_the_mean_of_this_cpus_airbench_runs_on_the_split_and_wait_for_one(scratch_csv, tmp_path, capfd):
    record_airbench("94", 0, 0.90, 1000.0)
    record_airbench("94", 1, 0.91, 1100.0)
    record_airbench("94", 2, 0.91, 400.0, split=0)
    with scratch_csv.open("a", newline="") as f:
        csv.writer(f).writerow(["2026-12-05", "Another CPU, 8 cores, AVX2, no native bf16", "2.14.1", "x", "airbench",
                                br.airbench_subject("94"), "split 1, 1 runs", "process_s", "7",
                                AIRBENCH_CMD.format(v="94", split=1)])
    rows, cpu = br.read_rows(scratch_csv), hardware()
    assert br.budget_seconds(run_named("fast-at-airbench94-seed0"), rows, cpu) == pytest.approx(1050)
    assert br.budget_seconds(run_named("fast-at-half-airbench94-seed1"), rows, cpu) == pytest.approx(525)
    assert br.budget_seconds(run_named("best95-at-airbench95-seed0"), rows, cpu) is None
    # A failing run is reported and the bench goes on; a run whose airbench is not measured is skipped.
    todo = [run_named("airbench95-seed0"), run_named("best95-at-airbench95-seed0")]
    failed = br.execute(todo, str(tmp_path / "no_data_here"), tmp_path / "runs")
    out, err = capfd.readouterr()
    assert failed == ["airbench95-seed0"] and "== failed (exit 1): airbench95-seed0" in out
    assert "usage:" not in err  # airbench.py took every flag (--first-run, --workdir): it failed on the data
    assert "== skipped: best95-at-airbench95-seed0: airbench95 is not measured" in out
    assert not (tmp_path / "runs" / "best95-at-airbench95-seed0").exists()


def test_the_picture_is_drawn_from_one_cpus_rows(scratch_csv, tmp_path):
    record_airbench("94", 0, 0.900, 1000.0)
    record_airbench("94", 1, 0.910, 990.0)
    for name, acc, wall in (("fast-at-airbench94-seed0", 0.905, 980), ("fast-at-airbench94-seed1", 0.911, 985),
                            ("fast-at-half-airbench94-seed0", 0.88, 490), ("mission-30m-seed0", 0.86, 1790)):
        record_recipe(name, acc, wall)
    rows, cpu = br.read_rows(scratch_csv), hardware()
    assert sorted(br.airbench_points(rows, cpu)) == [(br.airbench_subject("94"), 990 / 60, 91.0),
                                                       (br.airbench_subject("94"), 1000 / 60, 90.0)]
    proc = subprocess.run([sys.executable, "bench/budget_recipes.py", "--plot", str(tmp_path / "b.png"),
                           "--cpu-model", cpu.split(",")[0]], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False, env={**os.environ, "RESNET_RESULTS_FILE": str(scratch_csv)})
    assert proc.returncode == 0, proc.stderr
    png = (tmp_path / "b.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    with pytest.raises(SystemExit, match="matches 0 CPUs"):
        br.pick_cpu(rows, "Some Other CPU")


@pytest.mark.slow
def test_a_rehearsal_records_a_real_budgeted_launch_then_skips_it(tmp_path):
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (ROOT / "results").glob("*.csv")}
    scratch = tmp_path / "rehearsal.csv"
    cmd = [sys.executable, "bench/budget_recipes.py", "--rehearse", "--only", "fast-5m-seed0"]
    env = {**os.environ, "RESNET_RESULTS_FILE": str(scratch), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "rehearsal: 1 of 1 runs without failure" in proc.stdout and "picture drawn" in proc.stdout
    rows = {r["metric"]: r for r in br.read_rows(scratch) if r["bench"] == br.BENCH}
    assert rows["val_acc"]["subject"] == br.subject(run_named("fast-5m-seed0")) and rows["val_acc"]["seed"] == "0"
    assert rows["val_acc"]["hardware"] == hardware()
    wall, budget = float(rows["wall_s"]["value"]), float(rows["budget_s"]["value"])
    assert budget == br.TOY_BUDGET[0] and float(rows["used_fraction"]["value"]) == pytest.approx(wall / budget, rel=1e-4)
    assert float(rows["planned_epochs"]["value"]) > 0 and 0 <= float(rows["val_acc"]["value"]) <= 1
    assert "--time-budget 40" in rows["val_acc"]["command"]
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert again.returncode == 0 and "== done already: fast-5m-seed0" in again.stdout
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (ROOT / "results").glob("*.csv")} == before
