"""``python -m resnet.compare``: one table (mean ± std over seeds) and one PNG over many run folders.

    python -m resnet.compare runs/report                     # a folder of run folders (e.g. a grid)
    python -m resnet.compare runs/a runs/b --csv cmp.csv --png cmp.png

Runs are grouped by ``run_group`` (their config without seed, paths and logging), so the seeds of one
experiment are averaged and the table shows which differences are bigger than the seed noise. Reads
only the run folders' files (config.yaml, metrics.csv, summary.json, eval_test*.json): no torch, no
network.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import statistics
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from .identity import NON_EXPERIMENT_FIELDS, activation_of, canonical, run_group, run_name

# The highest TTA level present wins: it is the score a report would quote.
TEST_FILES = ("eval_test_tta2.json", "eval_test_tta1.json", "eval_test.json")
# Shown in their own columns, so not repeated among the distinguishing settings.
FIXED_SETTINGS = ("model", "activation", "opt")
NO_STD = "–"  # the std of a single run is undefined, not 0


class CompareError(ValueError):
    """No runs or unreadable input; main prints one ``error:`` line and exits 2."""


@dataclasses.dataclass
class RunRecord:
    path: Path
    config: dict
    group: str
    name: str
    params: int | None
    best_val_acc: float | None
    best_epoch: int | None
    test_acc: float | None
    train_time_s: float | None
    images_per_sec: float | None
    epochs_done: float  # a cut last epoch counts the share of its steps done
    epochs: float | None
    finished: bool  # the run reached its --epochs (summary.json; older runs: from the epochs done)
    curves: dict  # column -> [(epoch, value)], for val_acc and train_loss


def is_run_folder(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "metrics.csv").is_file()


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders given directly or found below the given folders (not inside run folders)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise CompareError(f"{p}: not found")
        if is_run_folder(p):
            found.append(p)
            continue
        for root, dirs, _ in os.walk(p):
            dirs.sort()
            if is_run_folder(Path(root)):
                found.append(Path(root))
                dirs.clear()  # a run's own subfolders (state/, wandb/) hold no runs
    return list(dict.fromkeys(found))


def _float(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def weights_param_count(run_dir: Path) -> int | None:
    """``num_params`` from a checkpoint's metadata, read from the safetensors header (no torch needed)."""
    for name in ("best.safetensors", "last.safetensors"):
        try:
            with (run_dir / name).open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            return int(json.loads(header["__metadata__"]["resnet"])["num_params"])
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            continue
    return None


def load_run(run_dir: Path) -> RunRecord:
    """Everything the comparison needs from one run folder; summary.json first, metrics.csv for the rest."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    if not isinstance(config, dict):
        raise CompareError(f"{run_dir / 'config.yaml'}: expected a mapping of field: value")
    with (run_dir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    curves = {key: [(int(float(r["epoch"])), v) for r in rows if (v := _float(r.get(key))) is not None]
              for key in ("val_acc", "train_loss")}
    summary = _read_json(run_dir / "summary.json") or {}

    val = curves["val_acc"]
    best = max(val, key=lambda point: point[1]) if val else None  # max() keeps the first (earliest) best
    times = [t for r in rows if (t := _float(r.get("images_per_sec"))) is not None]
    elapsed = [t for r in rows if (t := _float(r.get("elapsed"))) is not None]
    test = next((acc for name in TEST_FILES
                 if (acc := _float((_read_json(run_dir / name) or {}).get("accuracy"))) is not None), None)

    def pick(key: str, derived: Any) -> Any:
        return summary[key] if summary.get(key) is not None else derived

    epochs_done = float(pick("epochs_done", max((int(float(r["epoch"])) for r in rows), default=0)))
    epochs = pick("epochs", config.get("epochs"))

    return RunRecord(
        path=run_dir, config=config, group=run_group(config), name=run_name(config),
        params=pick("params", None) or weights_param_count(run_dir),
        best_val_acc=pick("best_val_acc", best[1] if best else None),
        best_epoch=pick("best_epoch", best[0] if best else None),
        test_acc=test,
        train_time_s=pick("train_time_s", elapsed[-1] if elapsed else None),
        images_per_sec=pick("images_per_sec", statistics.fmean(times) if times else None),
        epochs_done=epochs_done,
        epochs=epochs,
        finished=bool(pick("finished", epochs is None or epochs_done >= epochs)),
        curves=curves,
    )


def flat_settings(config: dict) -> dict[str, Any]:
    """The settings that define the experiment, as written in config.yaml, with model_kwargs spread out
    and the effective activation filled in."""
    settings = {str(k).replace("-", "_"): v for k, v in config.items()}
    settings = {k: v for k, v in settings.items() if k not in NON_EXPERIMENT_FIELDS}
    kwargs = settings.pop("model_kwargs", None) or {}
    settings.update({f"model_kwargs.{k}": v for k, v in kwargs.items() if k != "activation"})
    settings["activation"] = activation_of(config)
    return settings


def _positive(value: Any) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False


def _whitening(s: dict) -> bool:
    return "whiten" in (s.get("stem"), s.get("model_kwargs.stem")) or (
        s.get("stem") is None and "whiten" in str(s.get("model", "")))


# A technique's own settings mean something only in a run where it is on (muon_lr under --opt adam is a
# default nobody used): there they are shown and compared, elsewhere the cell is NOT_APPLICABLE.
APPLIES: dict[str, Callable[[dict], bool]] = {
    **dict.fromkeys(("muon_lr", "muon_momentum"), lambda s: s.get("opt") == "muon"),
    "momentum": lambda s: s.get("opt") not in ("adam", "adamw"),
    **dict.fromkeys(("lookahead_ema_decay", "lookahead_ema_power", "lookahead_ema_start"),
                    lambda s: _positive(s.get("lookahead_ema"))),
    "mix_prob": lambda s: _positive(s.get("mixup")) or _positive(s.get("cutmix")),
    "crop_ratio": lambda s: _positive(s.get("crop_scale")),
    "jitter_p": lambda s: _positive(s.get("color_jitter")) or _positive(s.get("hue")),
    "blur_p": lambda s: _positive(s.get("blur_sigma")),
    "cutout_p": lambda s: _positive(s.get("cutout")),
    "whiten_bias_epochs": _whitening,
    "compile_mode": lambda s: bool(s.get("compile")),
    "workers": lambda s: s.get("loader") == "workers",
}
# A technique's switch, where 0 means off: shown as "off".
SWITCHES = frozenset({"ema_decay", "mixup", "cutmix", "lookahead_ema", "clip_grad"})
NOT_APPLICABLE = "–"  # the cell of a setting whose technique is off in that group


def applies(settings: dict, key: str) -> bool:
    """Whether ``key`` means something in a run of these settings (its technique is on)."""
    return APPLIES.get(key, lambda s: True)(settings)


def setting_value(settings: dict, key: str) -> Any:
    """The value a group's table cell shows: NOT_APPLICABLE where its technique is off, "off" for a 0 switch."""
    if not applies(settings, key):
        return NOT_APPLICABLE
    value = settings.get(key)
    if key in SWITCHES and isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return "off"
    return value


def distinguishing_keys(groups: dict[str, list[RunRecord]]) -> list[str]:
    """Settings whose value is not the same in every group where they apply: what a reader needs to tell groups
    apart. A technique's setting in groups where that technique is off is left out of the comparison."""
    settings = [flat_settings(runs[0].config) for runs in groups.values()]
    keys = list(dict.fromkeys(k for s in settings for k in s))
    return [k for k in keys
            if len({json.dumps(canonical(s.get(k)), sort_keys=True) for s in settings if applies(s, k)}) > 1]


def show(value: Any) -> str:
    """A setting as a table cell: null is the field's default (e.g. lr: the optimizer's own)."""
    if value is None:
        return "default"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarise(runs: Sequence[RunRecord]) -> tuple[list[dict], list[str]]:
    """One row per group (sorted by mean best val acc, best first) and the distinguishing setting keys."""
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    keys = distinguishing_keys(groups)
    rows = []
    for group, members in groups.items():
        members.sort(key=lambda r: (r.config.get("seed", 0), str(r.path)))
        settings = flat_settings(members[0].config)
        accs = [r.best_val_acc for r in members if r.best_val_acc is not None]
        tests = [r.test_acc for r in members if r.test_acc is not None]
        epochs = members[0].epochs
        rows.append({
            "group": group,
            "n": len(members),
            "model": settings.get("model"),
            "params": next((r.params for r in members if r.params is not None), None),
            "activation": settings["activation"],
            "opt": settings.get("opt"),
            **{k: setting_value(settings, k) for k in keys if k not in FIXED_SETTINGS},
            "best_val_acc_mean": _mean(accs),
            "best_val_acc_std": statistics.stdev(accs) if len(accs) > 1 else None,  # sample std (ddof=1)
            "best_epoch_mean": _mean([r.best_epoch for r in members]),
            "test_acc_mean": _mean(tests),
            "test_acc_n": len(tests),
            "train_time_s_mean": _mean([r.train_time_s for r in members]),
            "images_per_sec_mean": _mean([r.images_per_sec for r in members]),
            "epochs": epochs,
            "epochs_done_min": min(r.epochs_done for r in members),
            "finished": all(r.finished for r in members),
            "seeds": " ".join(str(r.config.get("seed", "")) for r in members),
            "runs": " ".join(str(r.path) for r in members),
            "label": group_label(group, settings, keys, len(members), _mean(accs), statistics.stdev(accs) if len(accs) > 1 else None),
            "members": members,
        })
    rows.sort(key=lambda r: (r["best_val_acc_mean"] is None, -(r["best_val_acc_mean"] or 0.0)))
    return rows, keys


def group_label(group: str, settings: dict, keys: list[str], n: int, mean: float | None, std: float | None) -> str:
    """Legend text: the group id, what sets it apart (or model/activation/opt when nothing does) and its score."""
    shown = keys or list(FIXED_SETTINGS)
    score = "" if mean is None else f"best val {mean:.4f}" + ("" if std is None else f" ± {std:.4f}") + ", "
    return f"{group}  " + " ".join(f"{k}={show(setting_value(settings, k))}" for k in shown
                                   if applies(settings, k)) + f"  ({score}n={n})"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def table_cells(row: dict, keys: list[str]) -> dict[str, str]:
    mean, std = row["best_val_acc_mean"], row["best_val_acc_std"]
    acc = "–" if mean is None else f"{mean:.4f} ± {NO_STD if std is None else f'{std:.4f}'}"
    test = "–"
    if row["test_acc_mean"] is not None:
        test = f"{row['test_acc_mean']:.4f}" + ("" if row["test_acc_n"] == row["n"] else f" ({row['test_acc_n']}/{row['n']})")
    epochs = show(row["epochs"])
    if not row["finished"]:
        epochs = f"{row['epochs_done_min']:.3g}/{show(row['epochs'])} (unfinished)"
    cells = {"group": row["group"], "model": show(row["model"]),
             "params": "" if row["params"] is None else f"{row['params']:,}",
             "activation": show(row["activation"]), "optimizer": show(row["opt"])}
    cells.update({k: show(row.get(k)) for k in keys if k not in FIXED_SETTINGS})
    cells.update({"n": str(row["n"]), "best val acc": acc,
                  "epoch": "–" if row["best_epoch_mean"] is None else f"{row['best_epoch_mean']:.1f}",
                  "test acc": test, "epochs": epochs, "wall time": _duration(row["train_time_s_mean"]),
                  "images/s": "–" if row["images_per_sec_mean"] is None else f"{row['images_per_sec_mean']:.0f}"})
    return cells


def markdown_table(rows: list[dict], keys: list[str]) -> str:
    cells = [table_cells(r, keys) for r in rows]
    header = list(cells[0])
    width = {h: max(len(h), *(len(c[h]) for c in cells)) for h in header}
    right = {"params", "n", "best val acc", "epoch", "test acc", "wall time", "images/s"}

    def line(values: dict) -> str:
        return "| " + " | ".join(values[h].rjust(width[h]) if h in right else values[h].ljust(width[h])
                                 for h in header) + " |"

    rule = "|" + "|".join(("-" * (width[h] + 1) + ":") if h in right else ("-" * (width[h] + 2)) for h in header) + "|"
    return "\n".join([line({h: h for h in header}), rule, *map(line, cells)])


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def csv_columns(keys: list[str]) -> list[str]:
    extra = [k for k in keys if k not in FIXED_SETTINGS]
    return ["group", "n", "best_val_acc_mean", "best_val_acc_std", "best_epoch_mean", "test_acc_mean", "test_acc_n",
            "train_time_s_mean", "images_per_sec_mean", "model", "params", "activation", "opt", *extra,
            "epochs", "epochs_done_min", "seeds", "runs"]


def write_csv(rows: list[dict], keys: list[str], path: Path) -> None:
    """One row per group: raw numbers (empty when unknown), settings as in the table."""
    columns = csv_columns(keys)
    settings = {"model", "activation", "opt", "epochs", *keys}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: ("" if row.get(c) == NOT_APPLICABLE else show(row.get(c))) if c in settings
                         else ("" if row.get(c) is None else row[c]) for c in columns})
    atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue()))


def _colours(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    by_epoch: dict[int, list[float]] = {}
    for curve in curves:
        for epoch, value in curve:
            by_epoch.setdefault(epoch, []).append(value)
    return [(e, statistics.fmean(v)) for e, v in sorted(by_epoch.items())]


def plot(rows: list[dict], path: Path) -> None:
    """Validation accuracy and train loss per epoch: one colour per group, a thin line per seed, a thick mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = [row["label"] for row in rows]
    ncol = 2 if len(labels) <= 8 and max(map(len, labels)) <= 80 else 1
    legend_in = 0.25 + 0.2 * math.ceil(len(labels) / ncol)  # the legend gets its own strip below the axes
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6 + legend_in))
    panels = (("val_acc", "validation accuracy", "accuracy"), ("train_loss", "train loss", "loss"))
    for row, colour in zip(rows, _colours(len(rows))):
        members = row["members"]
        for ax, (key, _, _) in zip(axes, panels):
            curves = [r.curves[key] for r in members if r.curves[key]]
            if len(curves) > 1:
                for curve in curves:
                    ax.plot(*zip(*curve), color=colour, linewidth=0.8, alpha=0.35)
            mean = _mean_curve(curves)
            if mean:
                ax.plot(*zip(*mean), color=colour, linewidth=2.2, marker="o" if len(mean) <= 20 else None,
                        markersize=3.5, label=row["label"] if key == "val_acc" else None)
    for ax, (_, title, ylabel) in zip(axes, panels):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    n_runs = sum(r["n"] for r in rows)
    how = "thick line = mean over seeds, thin lines = single seeds" if n_runs > len(rows) else "one run per group"
    plural = lambda n, word: f"{n} {word}{'s' if n != 1 else ''}"  # noqa: E731
    fig.suptitle(f"{plural(n_runs, 'run')} in {plural(len(rows), 'group')}: {how}")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, legend_in / fig.get_figheight(), 1, 0.95))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m resnet.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Table: one row per group, best first. 'best val acc' is the mean over the group's runs of each run's best "
               "validation accuracy ± the sample standard deviation (ddof=1); a group of one run shows '± –' (no "
               "spread from one run). 'epoch' is the mean epoch of those bests, 'test acc' the mean over runs that "
               "were evaluated on the test set (eval_test*.json, highest TTA level; '(k/n)' when only k were), "
               "'wall time' the mean training time, 'images/s' the mean training throughput. Extra columns are the "
               "settings that differ between groups.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="a run folder, or a folder of run folders (searched below)")
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV, one row per group, raw numbers")
    p.add_argument("--png", metavar="FILE", help="curves figure (default: compare.png in the first PATH)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        folders = find_runs(args.paths)
        if not folders:
            raise CompareError(f"no run folders (config.yaml + metrics.csv) in {', '.join(args.paths)}")
        runs = []
        for folder in folders:
            try:
                runs.append(load_run(folder))
            except (OSError, ValueError, KeyError, yaml.YAMLError) as e:
                print(f"warning: {folder}: skipped, unreadable ({e})", file=sys.stderr)
        if not runs:
            raise CompareError(f"no readable run folders in {', '.join(args.paths)}")
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, keys = summarise(runs)
    print(markdown_table(rows, keys))
    png = Path(args.png) if args.png else Path(args.paths[0]) / "compare.png"
    plot(rows, png)
    print(f"\ncurves: {png}")
    if args.csv:
        write_csv(rows, keys, Path(args.csv))
        print(f"table: {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
