"""The README's and docs' tables of measured figures, built from results/*.csv (so a table cannot drift from its data).

    python bench/tables.py            rewrite every table in README.md and docs/*.md from results/
    python bench/tables.py --check    exit 1, naming the table, if any table differs from what results/ gives

A table sits between ``<!-- table: NAME -->`` and ``<!-- /table -->`` in a Markdown file; NAME is one of
TABLES below. Runs of one subject on one hardware are one row: the mean ± sample std over them, and n.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from results import RESULTS, ROOT, rows

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def all_rows() -> list[dict[str, str]]:
    return [r for path in sorted(RESULTS.glob("*.csv")) for r in rows(path)]


def _fmt(values: list[float], digits: int, percent: bool = False) -> str:
    scale = 100 if percent else 1
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:,.{digits}f}"
    return f"{mean:,.{digits}f} ± {statistics.stdev(values) * scale:,.{digits}f}"


def grouped(data: list[dict], benches: tuple[str, ...], match: str = "") -> dict[tuple, dict[str, list[float]]]:
    """(subject, hardware, torch) -> metric -> values, for rows of ``benches`` whose subject contains ``match``."""
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in data:
        if r["bench"] in benches and match in r["subject"]:
            groups[(r["subject"], r["hardware"], r["torch"])][r["metric"]].append(float(r["value"]))
    return groups


def commits(data: list[dict], subject: str, hardware: str) -> str:
    found = sorted({(r["date"], r["commit"]) for r in data if r["subject"] == subject and r["hardware"] == hardware})
    return ", ".join(f"{c} ({d})" for d, c in found)


def runs_table(data: list[dict], match: str = "") -> list[str]:
    """Training runs (time_to_accuracy, airbench): accuracy and seconds, one row per subject and hardware."""
    out = ["| what | hardware (torch) | runs | val accuracy % | training s | whole launch s | commit (date) |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for (subject, hardware, torch), m in sorted(grouped(data, ("time_to_accuracy", "airbench"), match).items()):
        if "val_acc" not in m:
            continue
        train = _fmt(m["train_s"], 1) if m.get("train_s") else "-"
        whole = _fmt(m["process_s"], 0) if m.get("process_s") else "-"
        out.append(f"| {subject} | {hardware} ({torch}) | {len(m['val_acc'])} | {_fmt(m['val_acc'], 2, True)} | "
                   f"{train} | {whole} | {commits(data, subject, hardware)} |")
    return out


def recipes_table(data: list[dict]) -> list[str]:
    """Every run of every recipe, and a row for each shipped recipe measured nowhere yet (one measured only
    under a time budget is in the budget table)."""
    out = runs_table(data)
    measured = {re.split(r"[ ,]", r["subject"])[0] for r in data if r["bench"] in ("time_to_accuracy", "budget_recipes")}
    for recipe in sorted((ROOT / "configs").glob("*.yaml")):
        name = f"configs/{recipe.name}"
        if name not in measured:
            out.append(f"| {name} | - | 0 | not measured yet | - | - | - |")
    return out


def metric_table(data: list[dict], bench: str, columns: dict[str, tuple[str, int]]) -> list[str]:
    """One row per subject and hardware of ``bench``; ``columns``: metric -> (header, digits)."""
    out = ["| what | hardware (torch) | " + " | ".join(h for h, _ in columns.values()) + " | commit (date) |",
           "| --- | --- | " + " | ".join("---" for _ in columns) + " | --- |"]
    for (subject, hardware, torch), m in sorted(grouped(data, (bench,)).items()):
        cells = [_fmt(m[k], d) if m.get(k) else "-" for k, (_, d) in columns.items()]
        out.append(f"| {subject} | {hardware} ({torch}) | " + " | ".join(cells) +
                   f" | {commits(data, subject, hardware)} |")
    return out


def flags_table(data: list[dict]) -> list[str]:
    """train.py's flags by --help section, from the config itself (the data is not used)."""
    import argparse

    from resnet.config import TrainConfig, build_parser

    out = []
    for group in build_parser(TrainConfig, "")._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions or group.title in ("options", "positional arguments"):
            continue
        out += [f"**{group.title}**", "", "| flag | what it does |", "| --- | --- |"]
        for a in actions:
            flags = ", ".join(f"`{f}`" for f in a.option_strings)
            text = (a.help or "").replace("%%", "%").replace("|", "\\|")
            if a.choices and not isinstance(a, argparse.BooleanOptionalAction):
                flags += f" {{{','.join(map(str, a.choices))}}}"
            out.append(f"| {flags} | {text} |")
        out.append("")
    return out[:-1]


# The README's quick start: per hardware, the command and the figures of the runs that back it.
# (label, command, subject, a text the hardware must contain, what to show when nothing matches)
QUICKSTART = [
    ("CPU without native bf16 (AVX2: most laptops, many servers)",
     "accelerate launch --config_file accelerate_configs/cpu.yaml train.py --config configs/fast.yaml",
     "configs/fast.yaml (fp32, cpu.yaml)", "no native bf16", "not measured yet"),
    ("CPU with AVX512-BF16 or AMX",
     "accelerate launch --config_file accelerate_configs/bf16.yaml train.py --config configs/fast.yaml",
     "configs/fast.yaml (bf16, bf16.yaml)", ", native bf16", "not measured yet"),
    ("one GPU", "accelerate launch --config_file accelerate_configs/bf16.yaml train.py --config configs/fast_gpu.yaml",
     "configs/fast_gpu.yaml", "", "not measured yet (bench/gpu_session.py)"),
    ("a node of GPUs", "accelerate launch --config_file accelerate_configs/multi_gpu.yaml --num_processes 8 "
     "train.py --config configs/best.yaml --lr-scale linear", "multi_gpu", "", "not measured yet"),
    ("several machines", "accelerate launch --config_file accelerate_configs/multi_node.yaml --machine_rank N "
     "train.py --config configs/best.yaml", "multi_node", "", "not measured yet"),
]


def _runs(n: int) -> str:
    return f"{n} run" + ("s" if n != 1 else "")


def quickstart_table(data: list[dict]) -> list[str]:
    out = ["| hardware | command | val accuracy % | whole launch | measured on |", "| --- | --- | --- | --- | --- |"]
    for label, command, subject, hardware, missing in QUICKSTART:
        groups = {k: m for k, m in grouped(data, ("time_to_accuracy",)).items()
                  if k[0].startswith(subject) and hardware in k[1] and "val_acc" in m}
        if not groups:
            out.append(f"| {label} | `{command}` | {missing} | | |")
            continue
        (subj, hw, torch), m = sorted(groups.items(), key=lambda kv: -len(kv[1]["val_acc"]))[0]
        whole = f"{statistics.fmean(m['process_s']) / 60:.0f} min" if m.get("process_s") else "-"
        out.append(f"| {label} | `{command}` | {_fmt(m['val_acc'], 2, True)} ({_runs(len(m['val_acc']))}) | {whole} | "
                   f"{hw}, torch {torch} |")
    return out


def mission_lines(data: list[dict]) -> list[str]:
    """How long the report's command takes, from the measured images/s of the report net's full step
    (bench/step_overhead.py at batch 256, the default) on each hardware."""
    out = []
    for (subject, hardware, torch), m in sorted(grouped(data, ("step_overhead",), "resnet_report_4m, batch 256").items()):
        rate = statistics.fmean(m["full_images_per_sec"])
        hours = 45_000 * 40 / rate / 3600
        took = f"{hours:.1f} hours" if hours >= 1 else f"{max(1, round(hours * 60))} min"
        precision = subject.split(", ")[2].split(" ")[0]  # "fp32" or "bf16", before any note
        out.append(f"- {hardware}: {rate:,.0f} images/s ({precision}), so about {took} for its 40 epochs "
                   f"(from the training step alone; `bench/step_overhead.py`, commit {commits(data, subject, hardware)})")
    return out or ["- not measured yet"]


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 600 else f"{seconds / 60:.1f} min"


def budget_table(data: list[dict]) -> list[str]:
    """bench/budget_recipes.py: each recipe at each budget on each CPU, beside the airbench runs it was timed
    against (the airbench rows of the same hardware on the bench's split, its --seed 1)."""
    out = ["| recipe | budget | runs | val accuracy % | whole launch (of the budget) | planned epochs | measured on |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for (subject, hardware, torch), m in sorted(grouped(data, ("budget_recipes",)).items(),
                                                key=lambda kv: (kv[0][1], statistics.fmean(kv[1]["budget_s"]))):
        if "val_acc" not in m:
            continue
        recipe, precision, label = subject.rsplit(", ", 2)
        budget = statistics.fmean(m["budget_s"])
        used = f"{_minutes(statistics.fmean(m['wall_s']))} ({_fmt(m['used_fraction'], 0, True)}%)"
        epochs = _fmt(m["planned_epochs"], 2) if m.get("planned_epochs") else "-"
        out.append(f"| {recipe} | {_minutes(budget)} ({label}) | {len(m['val_acc'])} | {_fmt(m['val_acc'], 2, True)} "
                   f"| {used} | {epochs} | {hardware}, {precision}, torch {torch} |")
    anchors = [r for r in data if r["bench"] == "airbench" and "--seed 1 " in r["command"] + " "
               and any(r["hardware"] == b["hardware"] for b in data if b["bench"] == "budget_recipes")]
    for (subject, hardware, torch), m in sorted(grouped(anchors, ("airbench",)).items()):
        if "val_acc" in m and m.get("process_s"):
            out.append(f"| {subject} | - | {len(m['val_acc'])} | {_fmt(m['val_acc'], 2, True)} | "
                       f"{_minutes(statistics.fmean(m['process_s']))} | - | {hardware}, torch {torch} |")
    return out if len(out) > 2 else out + ["| not measured yet | | | | | | |"]


TABLES = {
    "quickstart": quickstart_table,
    "budgets": budget_table,
    "mission": mission_lines,
    "train-flags": flags_table,
    "recipes": recipes_table,
    "fast": lambda d: runs_table(d, "fast"),
    "best": lambda d: runs_table(d, "best"),
    "report": lambda d: runs_table(d, "report"),
    "step-overhead": lambda d: metric_table(d, "step_overhead", {
        "bare_images_per_sec": ("bare step img/s", 0), "full_images_per_sec": ("full step img/s", 0),
        "overhead_pct": ("overhead %", 1)}),
    "host-ops": lambda d: metric_table(d, "host_ops", {
        "ops_per_step": ("tensor ops / step", 0), "readbacks_per_step": ("read-backs / step", 3)}),
    "precision": lambda d: metric_table(d, "precision", {"images_per_sec": ("img/s", 1), "speed_ratio": ("ratio", 2)}),
    "speed-vs-commit": lambda d: metric_table(d, "speed_vs_commit", {
        "images_per_sec": ("img/s", 1), "speed_ratio": ("ratio", 3)}),
}


def render(text: str, data: list[dict], source: Path) -> str:
    def table(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise SystemExit(f"error: {source}: unknown table {name!r}; known: {', '.join(TABLES)}")
        return match.group(1) + "\n".join(TABLES[name](data)) + "\n" + match.group(4)
    return MARK.sub(table, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table is stale")
    args = parser.parse_args(argv)
    data, stale = all_rows(), []
    for path in DOCS:
        text = path.read_text()
        new = render(text, data, path)
        if new != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"stale tables in {', '.join(map(str, stale))}: run python bench/tables.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
