"""Run identity and `python -m resnet.compare` on synthetic run folders with known numbers."""
import csv
import json
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import yaml

from conftest import ROOT
from resnet import compare
from resnet.config import TrainConfig, config_to_dict
from resnet.identity import run_group, run_name

METRIC_COLUMNS = ["epoch", "step", "train_loss", "train_acc", "lr", "images_per_sec", "epoch_time", "val_loss",
                  "val_acc", "best_val_acc", "elapsed"]


def make_run(folder, *, val_accs, seed=0, summary=True, train_losses=None, eval_every=1, test=None, **settings):
    """A run folder as training writes it: config.yaml, metrics.csv, summary.json (optional), eval_test*.json."""
    folder.mkdir(parents=True)
    cfg = config_to_dict(TrainConfig(seed=seed, epochs=len(val_accs), run_dir=str(folder), **settings))
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    train_losses = train_losses or [2.0 / (e + 1) + 0.01 * seed for e in range(len(val_accs))]
    best, rows = -1.0, []
    for i, (acc, loss) in enumerate(zip(val_accs, train_losses)):
        validated = (i + 1) % eval_every == 0 or i + 1 == len(val_accs)
        best = max(best, acc) if validated else best
        rows.append({"epoch": i + 1, "step": 10 * (i + 1), "train_loss": loss, "train_acc": 0.5, "lr": 0.1,
                     "images_per_sec": 1000.0 + 100 * i, "epoch_time": 5.0,
                     "val_loss": 1.0 if validated else "", "val_acc": acc if validated else "",
                     "best_val_acc": best if best >= 0 else "", "elapsed": 6.0 * (i + 1)})
    with (folder / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if summary:
        accs = [float(r["val_acc"]) if r["val_acc"] != "" else -1 for r in rows]
        (folder / "summary.json").write_text(json.dumps({
            "finished": True, "epochs_done": len(rows), "epochs": len(rows), "params": 4_587_690,
            "best_val_acc": max(accs), "best_epoch": accs.index(max(accs)) + 1, "train_time_s": 600.0 + seed,
            "images_per_sec": 1234.0, "started_at": "2025-01-01T00:00:00", "group": run_group(cfg),
            "name": run_name(cfg)}))
    for name, acc in (test or {}).items():
        (folder / name).write_text(json.dumps({"accuracy": acc, "n": 10000}))
    return folder


@pytest.fixture
def experiment(tmp_path):
    """Group A (relu, sgd): best 0.90 / 0.92 / 0.94 over 3 seeds; group B (gelu, adam, lr 0.01): one run, best 0.95."""
    root = tmp_path / "exp"
    for seed, best in enumerate([0.90, 0.92, 0.94]):
        make_run(root / f"relu-sgd-{seed}", val_accs=[0.5, best, best - 0.01], seed=seed, activation="relu", opt="sgd",
                 test={"eval_test.json": 0.80 + seed / 100})
    make_run(root / "gelu-adam-0", val_accs=[0.6, 0.95, 0.93], activation="gelu", opt="adam", lr=0.01)
    return root


# --- identity

def test_run_group_ignores_seed_paths_and_logging_but_not_settings():
    base = config_to_dict(TrainConfig(activation="gelu", opt="adam", lr=0.01))
    same = {**base, "seed": 7, "run_dir": "elsewhere", "resume": "x", "wandb": "off", "wandb_tags": ["a"],
            "data_dir": "/data", "download": False, "progress": False, "overwrite": True, "wandb_group": "g"}
    assert run_group(same) == run_group(base)
    assert len(run_group(base)) == 8 and int(run_group(base), 16) >= 0
    assert run_group({**base, "lr": 0.02}) != run_group(base)
    assert run_group({**base, "activation": "relu"}) != run_group(base)
    assert run_group({**base, "model_kwargs": {"blocks": [2, 2, 2, 2]}}) != run_group(base)


def test_run_group_is_stable_across_int_float_key_order_and_yaml():
    cfg = config_to_dict(TrainConfig(lr=1.0, epochs=3))
    assert run_group({**cfg, "lr": 1}) == run_group(cfg)  # a recipe's `lr: 1` is the same experiment
    assert run_group(dict(reversed(list(cfg.items())))) == run_group(cfg)
    assert run_group(yaml.safe_load(yaml.safe_dump(cfg))) == run_group(cfg)
    assert run_group({"lr": 0.1, "epochs": 3}) == run_group({"epochs": 3.0, "lr": 0.1})
    assert run_group({"compile": True}) != run_group({"compile": 1})  # a switch is not a number
    script = "from resnet.identity import run_group; print(run_group({'lr': 0.1, 'opt': 'adam', 'seed': 3}))"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == run_group({"opt": "adam", "lr": 0.1})  # the same in another process


def test_run_name_is_readable():
    assert run_name(config_to_dict(TrainConfig(activation="gelu", opt="adam", seed=2))) == "resnet_report_4m-gelu-adam-seed2"
    assert run_name({"model": "m", "model_kwargs": {"activation": "silu"}, "opt": "sgd", "seed": 0}) == "m-silu-sgd-seed0"
    assert run_name({"model": "m", "activation": None, "model_kwargs": {}, "opt": "sgd", "seed": 1}) == "m-default-sgd-seed1"


# --- compare

def table_rows(out: str) -> list[dict]:
    """The Markdown table printed by compare, as dicts keyed by the header."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1]) <= set("|-:")
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_table_has_mean_and_sample_std_per_group_best_first(experiment, capsys):
    assert compare.main([str(experiment)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 2
    gelu, relu = rows  # 0.95 > 0.92: the single gelu run comes first
    assert (gelu["activation"], gelu["optimizer"], gelu["n"], gelu["best val acc"]) == ("gelu", "adam", "1", "0.9500 ± –")
    assert (relu["activation"], relu["optimizer"], relu["n"]) == ("relu", "sgd", "3")
    assert relu["best val acc"] == "0.9200 ± 0.0200"  # sample std of 0.90, 0.92, 0.94
    assert relu["epoch"] == "2.0" and relu["params"] == "4,587,690" and relu["wall time"] == "10.0 min"
    assert relu["test acc"] == "0.8100" and gelu["test acc"] == "–"
    assert relu["images/s"] == "1234" and relu["group"] != gelu["group"]
    assert (relu["lr"], gelu["lr"]) == ("default", "0.01")  # differs between groups: shown


def test_groups_are_formed_by_settings_not_by_seed(tmp_path):
    for seed in range(3):
        make_run(tmp_path / f"a{seed}", val_accs=[0.5], seed=seed, lr=0.1, wandb="off")
    make_run(tmp_path / "b0", val_accs=[0.6], seed=0, lr=0.05)
    rows, keys = compare.summarise([compare.load_run(p) for p in compare.find_runs([tmp_path])])
    assert sorted(r["n"] for r in rows) == [1, 3]
    assert keys == ["lr"]  # the only setting that tells the groups apart
    assert {r["lr"] for r in rows} == {0.1, 0.05}
    three = next(r for r in rows if r["n"] == 3)
    assert three["best_val_acc_mean"] == pytest.approx(0.5) and three["best_val_acc_std"] == pytest.approx(0.0)
    assert three["seeds"] == "0 1 2"


def test_metrics_csv_is_enough_without_summary(tmp_path, capsys):
    # Validation every 2nd epoch: empty val cells must not count; the best is 0.7 at epoch 4.
    run = make_run(tmp_path / "r", val_accs=[0.1, 0.6, 0.2, 0.7, 0.9, 0.65], eval_every=2, summary=False,
                   test={"eval_test.json": 0.5, "eval_test_tta1.json": 0.55, "eval_test_tta2.json": 0.56})
    record = compare.load_run(run)
    assert record.best_val_acc == pytest.approx(0.7) and record.best_epoch == 4
    assert record.curves["val_acc"] == [(2, 0.6), (4, 0.7), (6, 0.65)]
    assert record.images_per_sec == pytest.approx(1250.0) and record.train_time_s == pytest.approx(36.0)
    assert record.params is None and record.test_acc == pytest.approx(0.56)  # highest TTA level wins
    assert compare.main([str(run), "--png", str(tmp_path / "c.png")]) == 0
    (row,) = table_rows(capsys.readouterr().out)
    assert (row["best val acc"], row["epoch"], row["test acc"], row["params"]) == ("0.7000 ± –", "4.0", "0.5600", "")


def test_a_fractional_epochs_run_is_finished_when_its_summary_says_so(tmp_path, capsys):
    # --epochs 7.2 at 7 steps an epoch trains 50 steps: 7.14 epochs done, the run complete.
    for name, done, finished in (("done", 50 / 7, True), ("cut", 3.0, False)):
        run = make_run(tmp_path / name, val_accs=[0.5, 0.6, 0.7], seed=int(finished), lr=0.1 if finished else 0.2)
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "epochs": 7.2, "epochs_done": done,
                                                      "finished": finished}))
    assert compare.main([str(tmp_path)]) == 0
    epochs = {row["lr"]: row["epochs"] for row in table_rows(capsys.readouterr().out)}
    assert epochs == {"0.1": "7.2", "0.2": "3/7.2 (unfinished)"}


def test_param_count_falls_back_to_checkpoint_metadata(tmp_path):
    from safetensors.numpy import save_file

    run = make_run(tmp_path / "r", val_accs=[0.5], summary=False)
    save_file({"w": np.zeros(3, np.float32)}, str(run / "best.safetensors"),
              metadata={"resnet": json.dumps({"model": "m", "num_params": 12345})})
    assert compare.load_run(run).params == 12345


def test_csv_has_group_stats_and_the_distinguishing_settings(experiment, tmp_path):
    out = tmp_path / "sub" / "cmp.csv"
    assert compare.main([str(experiment), "--csv", str(out), "--png", str(tmp_path / "c.png")]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["n"] for r in rows] == ["1", "3"]
    columns = list(rows[0])
    assert columns[:4] == ["group", "n", "best_val_acc_mean", "best_val_acc_std"]
    assert {"activation", "opt", "lr", "test_acc_mean", "train_time_s_mean", "images_per_sec_mean",
            "params", "model", "runs"} <= set(columns)
    assert "momentum" not in columns and "weight_decay" not in columns  # the same in every group
    relu = rows[1]
    assert float(relu["best_val_acc_mean"]) == pytest.approx(0.92) and float(relu["best_val_acc_std"]) == pytest.approx(0.02)
    assert rows[0]["best_val_acc_std"] == "" and relu["activation"] == "relu" and relu["lr"] == "default"
    assert relu["test_acc_mean"] != "" and rows[0]["test_acc_mean"] == ""
    assert not list(out.parent.glob("*.tmp"))


def test_png_shows_every_group_in_its_own_colour(experiment):
    assert compare.main([str(experiment)]) == 0
    png = experiment / "compare.png"  # default: in the first PATH
    assert png.stat().st_size > 20_000
    image = matplotlib.image.imread(str(png))[..., :3]
    assert image.shape[0] >= 400 and image.shape[1] >= 1000
    colours = {tuple(c) for c in (image.reshape(-1, 3) * 255).round().astype(int)}
    assert len(colours) > 20
    for tab_blue_or_orange in ((31, 119, 180), (255, 127, 14)):  # tab10's first two: one per group
        assert tab_blue_or_orange in colours
    assert not list(experiment.glob("*.tmp"))


@pytest.mark.parametrize("make", ["empty", "missing", "only_other_files"])
def test_no_runs_is_one_line_error(tmp_path, capsys, make):
    path = tmp_path / "nothing"
    if make != "missing":
        path.mkdir()
    if make == "only_other_files":
        (path / "config.yaml").write_text("epochs: 1\n")  # no metrics.csv: not a run
    assert compare.main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(path) in err and "\n" not in err


def test_command_line_entry_point(experiment):
    proc = subprocess.run([sys.executable, "-m", "resnet.compare", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "sample standard deviation" in proc.stdout and "'± –'" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "resnet.compare", str(experiment)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "0.9200 ± 0.0200" in proc.stdout


def test_a_techniques_settings_show_only_where_it_is_on(tmp_path, capsys):
    """Issue 26: the table showed muon_lr 0.24 for Adam runs. muon_* only under --opt muon, lookahead_ema_* only
    with lookahead_ema > 0, mix_prob only with mixup/cutmix on, and a 0 switch (ema_decay, mixup) as "off"."""
    root = tmp_path / "exp"
    make_run(root / "adam", val_accs=[0.5, 0.90], opt="adam", muon_lr=0.24)
    make_run(root / "adam-mix", val_accs=[0.5, 0.89], opt="adam", mixup=0.2, mix_prob=0.5, ema_decay=0.99)
    make_run(root / "muon-a", val_accs=[0.5, 0.92], opt="muon", muon_lr=0.24, lookahead_ema=5,
             lookahead_ema_decay=0.9, mix_prob=0.3)
    make_run(root / "muon-b", val_accs=[0.5, 0.91], opt="muon", muon_lr=0.3, lookahead_ema=5,
             lookahead_ema_decay=0.95, mix_prob=0.7)
    csv_path = tmp_path / "cmp.csv"
    assert compare.main([str(root), "--png", str(tmp_path / "c.png"), "--csv", str(csv_path)]) == 0
    rows = {(r["optimizer"], r["best val acc"][:4]): r for r in table_rows(capsys.readouterr().out)}
    adam, adam_mix, muon_a, muon_b = (rows[("adam", "0.90")], rows[("adam", "0.89")], rows[("muon", "0.92")],
                                      rows[("muon", "0.91")])
    assert (adam["muon_lr"], adam_mix["muon_lr"], muon_a["muon_lr"], muon_b["muon_lr"]) == ("–", "–", "0.24", "0.3")
    assert (adam["lookahead_ema_decay"], muon_a["lookahead_ema_decay"]) == ("–", "0.9")
    assert (adam["lookahead_ema"], muon_a["lookahead_ema"]) == ("off", "5")
    assert "mix_prob" not in adam  # 0.3/0.7 only in runs without mixing, 0.5 in the one mixing run: one value
    assert (adam["mixup"], adam_mix["mixup"]) == ("off", "0.2")
    assert (adam["ema_decay"], adam_mix["ema_decay"]) == ("off", "0.99")
    assert "momentum" not in adam  # Adam has none; the SGD/Muon runs all have 0.9
    by_opt = {(r["opt"], r["best_val_acc_mean"][:4]): r for r in csv.DictReader(csv_path.open())}
    assert by_opt[("adam", "0.9")]["muon_lr"] == "" and by_opt[("muon", "0.92")]["muon_lr"] == "0.24"
