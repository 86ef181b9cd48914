"""Benchmark: the recipes against airbench on this CPU, each launch given a time budget, side by side (issue 28).

    python bench/budget_recipes.py [--dry-run] [--only PATTERN ...] [--data-dir ~/.cache/cifar10]
                                   [--out ~/.cache/resnet-bench/budget_recipes] [--best configs/best95.yaml]
    python bench/budget_recipes.py --plot [docs/budget.png] [--cpu-model TEXT]
    python bench/budget_recipes.py --rehearse [--only PATTERN ...]

The runs, most important first, since a session may be cut at any point (runs() below): airbench94 and
configs/fast.yaml at airbench94's measured time, seeds 0 and 1; fast.yaml at half that time; the mission's
command (train.py --activation gelu --opt adam) and configs/report.yaml at 30 minutes each; airbench95 and the
best recipe under 5M parameters (--best) at airbench95's time and at half of it; fast.yaml and the mission's
command at 5 minutes (seed 0, then seed 1 last). A budget "at airbench94's time" is the mean whole-process seconds (process_s) of the
airbench94 runs recorded for this CPU on this bench's split, read when the run starts; a run whose airbench
has no such row yet is skipped with a line saying so (run its airbench first: the order does).

Each recipe run is the real `accelerate launch --config_file accelerate_configs/bf16.yaml train.py --config R
--time-budget B ...` (accelerate_configs/cpu.yaml, fp32, where the CPU lacks native bf16: resnet.hardware),
timed from outside: wall_s is the whole launch, start-up to exit, the figure the budget is meant to bound.
It records (bench budget_recipes, subject 'recipe, precision, budget', seed) wall_s, budget_s, used_fraction
(wall_s / budget_s), planned_epochs (train.py's plan, from summary.json) and last val_acc: the final score with
the recipe's TTA where it has one, else without. Each airbench run is bench/airbench.py --cpu --record, one run
per launch (--first-run numbers it), so its rows say variant, split and run. airbench seeds nothing: its
"seed N" is its N-th run on the split; the recipes' seed N is train.py's --seed N, the same N in every recipe.

One validation split for every run: 5000 images carved from the training set by split seed 1 (SPLIT_SEED).
Not 0: the recipes were chosen on split 0 (train.py's --seed 0 sets --split-seed 0 by default, and
bench/time_to_accuracy.py ran them so), so scoring them there would flatter them against airbench, which was
tuned on other data. airbench.py --seed S writes airbench's train.pt/test.pt from the split train.py
--split-seed S trains and scores on (both call resnet.data.cifar10_splits with the same size and seed).

Resumable: a run is done when the results file (RESNET_RESULTS_FILE, else results/cpu.csv) holds its val_acc
row for this CPU (the whole hardware description: model, cores, SIMD and bf16; the model name alone, 'AMD
EPYC', covers an AVX2 machine and an AVX-512 one in results/cpu.csv) with the same subject and seed; done runs
are skipped, so the comparison can span sessions. A run that fails is reported and the bench goes on (exit 1).
--dry-run prints the plan (what is done, what runs, expected minutes, the commands) and runs nothing.

--plot draws the picture from the results file: validation accuracy (%) against minutes (wall_s / 60), one
line per recipe through the mean over seeds at each budget, each seed a faint point, and one marker per
airbench run (at its process_s). Rows of one CPU only: this machine's, or --cpu-model (a prefix of the
hardware column).

--rehearse runs the comparison at toy size (default: the first run of each recipe and of each airbench) on
synthetic data in a temporary folder: a tiny net, budgets of 40-50 s, airbench as --dry-run (its split written,
its script compiled; airbench is not installed in CI), figures to RESNET_RESULTS_FILE when set, else a scratch
file; never results/. Then it draws the picture from that file.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from results import RESULTS, hardware, record  # noqa: E402

BENCH = "budget_recipes"
PY = sys.executable
SPLIT_SEED = 1  # not 0, the split the recipes were chosen on (module docstring)
VAL_SPLIT = 5000
MISSION = ("--activation", "gelu", "--opt", "adam")  # the mission's command: train.py's defaults otherwise
# Whole-process seconds of an airbench run before one is recorded here: airbench94's CPU port took 992 s on a
# 2-core AVX-512 EPYC (README, CPU model not recorded); airbench95 about 50 minutes (the issue).
AIRBENCH_GUESS = {"94": 1000.0, "95": 3000.0}
# --rehearse: airbench is not run, so its times are stand-ins; every budget then lies in 40-50 s. Not less:
# train.py refuses a budget below what its start-up, measuring, a step, an evaluation and the saves need, on
# 2 cores about 36 s for the tiny net (its measuring and second build; a plain launch of it takes 17 s).
TOY_AIRBENCH = {"94": 40.0, "95": 50.0}
TOY_BUDGET = (40.0, 50.0)
TOY_TRAIN = ["--model", "resnet_tiny_20k", "--no-compile", "--val-split", "100"]
TOY_AIRBENCH_FLAGS = ["--val-split", "100", "--dry-run"]


@dataclass(frozen=True)
class Run:
    name: str  # --only matches it; its folder under --out
    seed: int  # train.py --seed; airbench: the run's number on the split
    variant: str = ""  # an airbench run: "94" or "95"
    recipe: str = ""  # a recipe file, or "" for train.py's defaults (the mission's command)
    flags: tuple[str, ...] = ()  # train.py flags after the recipe
    seconds: float = 0.0  # a fixed budget, or
    anchor: str = ""  # a budget of `fraction` x airbench<anchor>'s measured seconds
    fraction: float = 1.0
    budget_label: str = ""  # the budget as the subject names it: '30m', "airbench94's time"

    @property
    def recipe_label(self) -> str:
        if self.variant:
            return f"airbench{self.variant}"
        return self.recipe or f"mission (train.py {' '.join(self.flags)})"


def runs(best: str = "configs/best95.yaml") -> list[Run]:
    """Every run of the comparison, most important first."""
    fast, report, stem = "configs/fast.yaml", "configs/report.yaml", Path(best).stem

    def airbench(variant: str, seed: int) -> Run:
        return Run(f"airbench{variant}-seed{seed}", seed, variant=variant)

    def at(short: str, recipe: str, variant: str, seed: int, half: bool = False) -> Run:
        return Run(f"{short}-at-{'half-' if half else ''}airbench{variant}-seed{seed}", seed, recipe=recipe,
                   anchor=variant, fraction=0.5 if half else 1.0,
                   budget_label=f"{'half ' if half else ''}airbench{variant}'s time")

    def fixed(short: str, recipe: str, minutes: int, seed: int, flags: tuple[str, ...] = ()) -> Run:
        return Run(f"{short}-{minutes}m-seed{seed}", seed, recipe=recipe, flags=flags, seconds=60.0 * minutes,
                   budget_label=f"{minutes}m")

    return [airbench("94", 0), at("fast", fast, "94", 0), airbench("94", 1), at("fast", fast, "94", 1),
            at("fast", fast, "94", 0, half=True), at("fast", fast, "94", 1, half=True),
            fixed("mission", "", 30, 0, MISSION), fixed("report", report, 30, 0),
            fixed("mission", "", 30, 1, MISSION), fixed("report", report, 30, 1),
            airbench("95", 0), at(stem, best, "95", 0), at(stem, best, "95", 1),
            at(stem, best, "95", 0, half=True), at(stem, best, "95", 1, half=True),
            fixed("fast", fast, 5, 0), fixed("mission", "", 5, 0, MISSION),
            fixed("fast", fast, 5, 1), fixed("mission", "", 5, 1, MISSION)]


# ------------------------------------------------------------------------------------------------
# What the results file says
def results_file() -> Path:
    """Where results.record writes on this CPU: RESNET_RESULTS_FILE, else results/cpu.csv."""
    return Path(os.environ.get("RESNET_RESULTS_FILE") or RESULTS / "cpu.csv")


def read_rows(path: Path) -> list[dict]:
    import csv

    return list(csv.DictReader(path.open(newline=""))) if path.is_file() else []


def precision() -> str:
    from resnet.hardware import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "fp32"


def accelerate_config() -> str:
    return "accelerate_configs/bf16.yaml" if precision() == "bf16" else "accelerate_configs/cpu.yaml"


def airbench_subject(variant: str) -> str:
    return f"airbench{variant} (PyPI 0.1.8) CPU port"  # as bench/airbench.py --cpu records it


def subject(run: Run) -> str:
    if run.variant:
        return airbench_subject(run.variant)
    return f"{run.recipe_label}, {precision()}, {run.budget_label}"


def seed_label(run: Run) -> str:
    return f"split {SPLIT_SEED} run {run.seed}" if run.variant else str(run.seed)


def on_our_split(row: dict) -> bool:
    """An airbench row measured on this bench's split: its command's --val-split and --seed (airbench.py's
    defaults, 5000 and 0, where the command leaves them out)."""
    try:
        words = shlex.split(row.get("command", ""))
    except ValueError:  # a hand-written command with an open quote
        words = row.get("command", "").split()

    def flag(name: str, default: str) -> str:
        return words[words.index(name) + 1] if name in words[:-1] else default

    return flag("--val-split", "5000") == str(VAL_SPLIT) and flag("--seed", "0") == str(SPLIT_SEED)


def is_done(run: Run, rows: list[dict], cpu: str) -> bool:
    """Its val_acc row is recorded for this CPU (recorded last, so the run's other rows are there too)."""
    bench = "airbench" if run.variant else BENCH
    return any(r["hardware"] == cpu and r["bench"] == bench and r["subject"] == subject(run)
               and r["seed"] == seed_label(run) and r["metric"] == "val_acc" and (not run.variant or on_our_split(r))
               for r in rows)


def airbench_seconds(variant: str, rows: list[dict], cpu: str) -> float | None:
    """The mean whole-process seconds of the airbench runs recorded for this CPU on this bench's split."""
    seconds = [float(r["value"]) for r in rows if r["hardware"] == cpu and r["bench"] == "airbench"
               and r["subject"] == airbench_subject(variant) and r["metric"] == "process_s" and on_our_split(r)]
    return statistics.fmean(seconds) if seconds else None


def budget_seconds(run: Run, rows: list[dict], cpu: str, toy: bool = False) -> float | None:
    """The run's budget in seconds; None while its airbench anchor is not measured. --rehearse: toy seconds."""
    if toy:
        seconds = TOY_AIRBENCH[run.anchor] * run.fraction if run.anchor else run.seconds / 60
        return min(max(seconds, TOY_BUDGET[0]), TOY_BUDGET[1])
    if not run.anchor:
        return run.seconds
    anchor = airbench_seconds(run.anchor, rows, cpu)
    return None if anchor is None else anchor * run.fraction


# ------------------------------------------------------------------------------------------------
# The commands
def airbench_command(run: Run, data_dir: str, out: Path, toy: bool = False) -> list[str]:
    return [PY, "bench/airbench.py", "--variant", run.variant, "--cpu", "--data-dir", data_dir,
            "--val-split", str(VAL_SPLIT), "--seed", str(SPLIT_SEED), "--runs", "1", "--first-run", str(run.seed),
            "--workdir", str(out / run.name), "--record", *(TOY_AIRBENCH_FLAGS if toy else [])]


def train_command(run: Run, budget: str, data_dir: str, out: Path, toy: bool = False) -> list[str]:
    """The whole launch; --overwrite: a launch cut before its val_acc row starts afresh (a budget's clock
    cannot resume)."""
    return [str(Path(PY).with_name("accelerate")), "launch", "--config_file", accelerate_config(), "train.py",
            *(["--config", run.recipe] if run.recipe else []), *run.flags, "--time-budget", budget,
            "--data-dir", data_dir, "--val-split", str(VAL_SPLIT), "--split-seed", str(SPLIT_SEED),
            "--seed", str(run.seed), "--run-dir", str(out / run.name), "--overwrite", "--wandb", "off",
            "--no-download", "--no-progress", *(TOY_TRAIN if toy else [])]


def command(run: Run, rows: list[dict], cpu: str, data_dir: str, out: Path, toy: bool = False) -> list[str]:
    if run.variant:
        return airbench_command(run, data_dir, out, toy)
    seconds = budget_seconds(run, rows, cpu, toy)
    unknown = "<" + run.budget_label.replace("'s", "") + ">"  # the dry run's stand-in until airbench is measured
    return train_command(run, f"{seconds:.0f}" if seconds else unknown, data_dir, out, toy)


def expected_seconds(run: Run, rows: list[dict], cpu: str, toy: bool = False) -> tuple[float, str]:
    """What the run should take and why: a budgeted launch ends within its budget."""
    if toy:
        return (15.0, "airbench.py --dry-run") if run.variant else (budget_seconds(run, rows, cpu, True), "toy budget")
    variant = run.variant or run.anchor
    if variant:
        measured = airbench_seconds(variant, rows, cpu)
        if measured is None:
            guess = AIRBENCH_GUESS[variant] * run.fraction
            return guess, f"airbench{variant} not measured here yet: {AIRBENCH_GUESS[variant]:.0f} s guessed"
        if run.variant:
            return measured, f"airbench{variant}'s process_s recorded here"
    return budget_seconds(run, rows, cpu), "its budget"


def plan_lines(todo: list[Run], rows: list[dict], cpu: str, data_dir: str, out: Path, toy: bool = False) -> list[str]:
    lines = [(f"{BENCH} on {cpu}: {precision()} ({accelerate_config()}), split seed {SPLIT_SEED} "
              f"({VAL_SPLIT} validation images), rows in {results_file()}, run folders in {out}")]
    left = 0.0
    for i, run in enumerate(todo, 1):
        if is_done(run, rows, cpu):
            lines.append(f"{i:3} {run.name:<36} done          {subject(run)}, seed {seed_label(run)}")
            continue
        seconds, why = expected_seconds(run, rows, cpu, toy)
        left += seconds
        lines.append(f"{i:3} {run.name:<36} {seconds / 60:6.1f} min    {subject(run)}, seed {seed_label(run)} ({why})")
        lines.append(f"      $ {shlex.join(command(run, rows, cpu, data_dir, out, toy))}")
    done = sum(is_done(r, rows, cpu) for r in todo)
    lines.append(f"{len(todo)} runs: {done} done, {len(todo) - done} to run, about {left / 60:.0f} min "
                 f"({left / 3600:.1f} h)")
    return lines


# ------------------------------------------------------------------------------------------------
# Running
def launch(cmd: list[str], env: dict | None = None) -> tuple[int, float]:
    """(exit code, wall seconds). Its own process group: a Ctrl-C or SIGTERM of the bench stops the training
    processes accelerate launch started too, which would otherwise train on and skew the next run's clock."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        code = proc.wait()
    except BaseException:
        stop_group(proc)
        raise
    return code, time.perf_counter() - start


def stop_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the launch's group (train.py saves and stops at the next step); wait until every process of
    it is gone, not only accelerate (train.py may still be saving when the launcher exits); SIGKILL after
    ``grace`` seconds."""
    os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()  # reaps the launcher, so only live processes keep the group
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def record_train_run(run: Run, cmd: list[str], budget: float, wall: float) -> str:
    """Its rows from summary.json; val_acc last, so a cut between rows leaves the run not done."""
    import json

    summary_path = Path(cmd[cmd.index("--run-dir") + 1]) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if summary.get("finished") is not True:
        return f"failed (no finished run in {summary_path})"
    acc = summary.get("final_val_acc_tta")
    acc = summary.get("final_val_acc") if acc is None else acc
    if acc is None:
        return f"failed (no final_val_acc in {summary_path})"
    planned = (summary.get("budget") or {}).get("planned_epochs")
    shown = [Path(cmd[0]).name, *cmd[1:]]
    where = f"python bench/{BENCH}.py --only {run.name}: {shlex.join(shown)}"
    figures = [("wall_s", wall), ("budget_s", budget), ("used_fraction", wall / budget),
               *([("planned_epochs", float(planned))] if planned is not None else []), ("val_acc", float(acc))]
    for metric, value in figures:
        record(BENCH, subject(run), metric, value, where, seed=run.seed)
    over = f", {wall - budget:.0f} s over budget" if wall > budget else ""
    return f"ok: val acc {acc:.4f}, {wall:.0f} s of {budget:.0f} s{over}" + \
        ("" if planned is not None else "; summary.json has no budget.planned_epochs")


def execute(todo: list[Run], data_dir: str, out: Path, toy: bool = False) -> list[str]:
    """Run what is not done, in order; returns the names of the runs that failed."""
    failed, cpu = [], hardware()
    for run in todo:
        rows = read_rows(results_file())  # again before each run: the runs before it recorded rows
        if is_done(run, rows, cpu):
            print(f"== done already: {run.name} ({subject(run)}, seed {seed_label(run)})", flush=True)
            continue
        budget = None if run.variant else budget_seconds(run, rows, cpu, toy)
        if not run.variant and budget is None:
            print(f"== skipped: {run.name}: airbench{run.anchor} is not measured on this CPU and split yet "
                  f"(run airbench{run.anchor}-seed0 first)", flush=True)
            continue
        cmd = command(run, rows, cpu, data_dir, out, toy)
        print(f"== {run.name}\n$ {shlex.join(cmd)}", flush=True)
        code, wall = launch(cmd)
        if code:
            status = f"failed (exit {code})"
        elif run.variant:
            status = "ok" if toy or is_done(run, read_rows(results_file()), cpu) else "failed (recorded nothing)"
            if not toy:
                shutil.rmtree(out / run.name / "cifar10", ignore_errors=True)  # 150 MB, written again from the split
        else:
            status = record_train_run(run, cmd, budget, wall)
        print(f"== {status}: {run.name} ({wall:.0f} s)", flush=True)
        if not status.startswith("ok"):
            failed.append(run.name)
    return failed


def has_time_budget() -> bool:
    help_text = subprocess.run([PY, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                               check=False).stdout
    return "--time-budget" in help_text


# ------------------------------------------------------------------------------------------------
# The picture
def cpus_in(rows: list[dict]) -> list[str]:
    return sorted({r["hardware"] for r in rows if r["bench"] == BENCH})


def pick_cpu(rows: list[dict], wanted: str | None) -> str:
    """This machine's CPU, or the one CPU of this bench's rows whose hardware column starts with ``wanted``."""
    if not wanted:
        return hardware()
    matches = [c for c in cpus_in(rows) if c.startswith(wanted)]
    if len(matches) != 1:
        raise SystemExit(f"error: --cpu-model {wanted!r} matches {len(matches)} CPUs of {BENCH}'s rows: "
                         f"{'; '.join(cpus_in(rows)) or 'none recorded'}")
    return matches[0]


def measured_runs(rows: list[dict], cpu: str) -> dict[tuple[str, str], dict[str, float]]:
    """{(subject, seed): {metric: value}} of this bench's rows for one CPU; the last row of each metric wins."""
    found: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        if r["bench"] == BENCH and r["hardware"] == cpu:
            found.setdefault((r["subject"], r["seed"]), {})[r["metric"]] = float(r["value"])
    return {key: m for key, m in found.items() if "val_acc" in m and "wall_s" in m}


def airbench_points(rows: list[dict], cpu: str) -> list[tuple[str, float, float]]:
    """(subject, minutes, accuracy %) per airbench run on this bench's split. Its process_s row follows its
    launch's val_acc rows and is per run, so each run takes the process_s recorded after it."""
    points, waiting = [], []
    for r in rows:
        if r["bench"] != "airbench" or r["hardware"] != cpu or not on_our_split(r):
            continue
        if r["metric"] == "val_acc":
            waiting.append((r["subject"], r["command"], 100 * float(r["value"])))
        elif r["metric"] == "process_s":
            points += [(s, float(r["value"]) / 60, acc) for s, c, acc in waiting if c == r["command"]]
            waiting = [w for w in waiting if w[1] != r["command"]]
    return points


def plot(rows: list[dict], cpu: str, path: Path) -> Path:
    """Accuracy against minutes: a line per recipe (mean over seeds per budget), a marker per airbench run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = measured_runs(rows, cpu)
    if not measured:
        raise SystemExit(f"error: no finished {BENCH} runs for {cpu} in the rows; CPUs with some: "
                         f"{'; '.join(cpus_in(rows)) or 'none'}")
    recipes: dict[str, dict[str, list[dict]]] = {}
    for (subj, _seed), m in measured.items():
        recipe, prec, budget = subj.rsplit(", ", 2)
        recipes.setdefault(f"{recipe} ({prec})", {}).setdefault(budget, []).append(m)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (label, budgets) in enumerate(sorted(recipes.items())):
        colour = f"C{i}"
        means = sorted((statistics.fmean(m["wall_s"] for m in ms) / 60, statistics.fmean(m["val_acc"] for m in ms) * 100)
                       for ms in budgets.values())
        ax.plot(*zip(*means), "-o", color=colour, label=label)
        seeds = [(m["wall_s"] / 60, m["val_acc"] * 100) for ms in budgets.values() for m in ms]
        ax.scatter(*zip(*seeds), color=colour, alpha=0.3, s=14)
    markers = iter("*^sD")
    for name in sorted({s for s, _, _ in airbench_points(rows, cpu)}):
        xs, ys = zip(*[(x, y) for s, x, y in airbench_points(rows, cpu) if s == name])
        ax.scatter(xs, ys, marker=next(markers), s=120, color="black", label=f"{name} (each run)", zorder=3)
    precisions = sorted({label.rsplit("(", 1)[1].rstrip(")") for label in recipes})
    ax.set(xlabel="minutes (whole launch, start-up to exit)", ylabel=f"validation accuracy, % ({VAL_SPLIT} images)",
           title=f"CIFAR-10 by time budget on {cpu}\nrecipes trained in {' and '.join(precisions)}; split seed "
                 f"{SPLIT_SEED}; lines: mean over seeds, faint points: each seed")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
def selected(all_runs: list[Run], only: list[str] | None) -> list[Run]:
    """Runs whose whole name matches one PATTERN (a name, or a glob: 'airbench*', '*-seed0'), in the
    comparison's order."""
    if not only:
        return all_runs
    return [r for r in all_runs if any(fnmatch.fnmatchcase(r.name, p) for p in only)]


def rehearsal_runs(all_runs: list[Run]) -> list[Run]:
    """The first run of each recipe and of each airbench."""
    firsts: dict[str, Run] = {}
    for r in all_runs:
        firsts.setdefault(r.recipe_label, r)
    return [r for r in all_runs if r in firsts.values()]


def rehearse(todo: list[Run], only: bool) -> int:
    from gpu_session import write_synthetic_cifar

    with tempfile.TemporaryDirectory(prefix="budget_recipes_") as scratch:
        scratch = Path(scratch)
        os.environ.setdefault("RESNET_RESULTS_FILE", str(scratch / "results.csv"))  # never results/
        os.environ["TMPDIR"] = str(scratch)
        write_synthetic_cifar(scratch / "data" / "cifar-10-batches-py")
        todo = todo if only else rehearsal_runs(todo)
        rows, cpu = read_rows(results_file()), hardware()
        print("\n".join(plan_lines(todo, rows, cpu, str(scratch / "data"), scratch / "runs", toy=True)), flush=True)
        failed = execute(todo, str(scratch / "data"), scratch / "runs", toy=True)
        rows = read_rows(results_file())
        if measured_runs(rows, cpu):
            print(f"picture drawn: {plot(rows, cpu, scratch / 'budget.png')} "
                  f"({(scratch / 'budget.png').stat().st_size} bytes)", flush=True)
    print(f"rehearsal: {len(todo) - len(failed)} of {len(todo)} runs without failure"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="~/.cache/cifar10")
    parser.add_argument("--out", default="~/.cache/resnet-bench/budget_recipes", help="folder of the run folders")
    parser.add_argument("--best", default="configs/best95.yaml", help="the best recipe under 5M parameters")
    parser.add_argument("--only", action="append", metavar="PATTERN", help="runs whose whole name matches (a name, "
                        "or a glob: 'airbench*', 'fast-*'); repeatable")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    parser.add_argument("--plot", nargs="?", const="docs/budget.png", metavar="PATH",
                        help="draw the picture from the recorded rows (default docs/budget.png; relative to the repository), "
                        "run nothing")
    parser.add_argument("--cpu-model", help="with --plot: the CPU whose rows to draw (a prefix of the hardware "
                        "column; default: this machine's)")
    parser.add_argument("--rehearse", action="store_true", help="run at toy size on synthetic data, rows to a "
                        "scratch file (RESNET_RESULTS_FILE when set), never results/")
    args = parser.parse_args(argv)
    import torch

    if torch.cuda.is_available():
        sys.exit("error: this bench measures the CPU; on a GPU, bench/gpu_session.py")
    if args.plot:
        rows = read_rows(results_file())
        path = plot(rows, pick_cpu(rows, args.cpu_model), ROOT / args.plot)
        print(f"wrote {path}")
        return 0
    todo = selected(runs(args.best), args.only)
    if not todo:
        sys.exit(f"error: no run matches --only {' '.join(args.only)}; runs: "
                 f"{' '.join(r.name for r in runs(args.best))}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through launch(), which stops its group
    if args.rehearse:
        return rehearse(todo, bool(args.only))
    out, rows, cpu = Path(args.out).expanduser(), read_rows(results_file()), hardware()
    print("\n".join(plan_lines(todo, rows, cpu, args.data_dir, out)), flush=True)
    if args.dry_run:
        return 0
    if not all(r.variant or is_done(r, rows, cpu) for r in todo) and not has_time_budget():
        sys.exit("error: train.py has no --time-budget yet (issue 28): the recipes' runs need it")
    failed = execute(todo, args.data_dir, out)
    print(f"{BENCH}: {len(todo) - len(failed)} of {len(todo)} runs done or skipped without failure"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
