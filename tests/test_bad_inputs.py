"""Bad input through the real command line: one ``error:`` line, no traceback, nothing written.

Every case runs ``python SCRIPT ...`` in its own empty folder and checks that the script
  - exits non-zero without printing a traceback,
  - ends stderr with one line starting ``error:`` that names the file or flag and what was expected,
  - prints no other ``error:`` line,
  - leaves no new file or folder behind and changes no existing one (its folder and the shared data).

The processes take seconds each (mostly imports), so the selected cases run in a pool of two
threads when the first one is asked for; each test then checks its own finished outcome.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml

from conftest import ROOT, TINY_RUN, run_cli, synthetic_images, write_custom_pickle, write_official_batch
from resnet.config import TrainConfig, parse_config

pytestmark = pytest.mark.slow

BATCHES = "cifar-10-batches-py"
MARKER = "pwned_by_pickle"  # the file a code-running pickle would create in its working folder
TRAIN = [*TINY_RUN, "--epochs", "1", "--wandb", "off"]  # every train case: tiny, offline, never downloads
RUN = "run"  # a case's private copy of the session's trained run folder


# ------------------------------------------------------------------------------------------------
# Input makers: each writes into the case's folder, before the snapshot is taken.
def data_copy(mutate: Callable[[Path], None] | None = None) -> Callable[[Path, Path], None]:
    """A copy of the synthetic CIFAR folder as ./data, with ``mutate`` applied to its cifar-10-batches-py/."""
    def setup(tmp: Path, cifar: Path) -> None:
        shutil.copytree(cifar, tmp / "data")
        if mutate:
            mutate(tmp / "data" / BATCHES)
    return setup


def batch_with(name: str = "data_batch_1", rows=None, labels=None) -> Callable[[Path], None]:
    """Replace one batch file by a well-formed pickle whose data or labels are wrong."""
    def mutate(folder: Path) -> None:
        good_rows, good_labels = synthetic_images(80, seed=1)
        write_official_batch(folder / name, good_rows if rows is None else rows(good_rows),
                             good_labels if labels is None else labels(good_labels), bytes_keys=False)
    return mutate


def cut_in_half(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def write_pickle(name: str, obj) -> Callable[[Path, Path], None]:
    return lambda tmp, cifar: (tmp / name).write_bytes(pickle.dumps(obj))


def custom(name: str = "test.pkl", **kw) -> Callable[[Path, Path], None]:
    return lambda tmp, cifar: write_custom_pickle(tmp / name, "rows", n=12, **kw)


def write_text(name: str, text: str) -> Callable[[Path, Path], None]:
    return lambda tmp, cifar: (tmp / name).write_text(text)


def png(name: str) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, cifar: Path) -> None:
        from PIL import Image

        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp / name)
    return setup


def safetensors_not_ours(tmp: Path, cifar: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"weight": torch.randn(4, 4)}, str(tmp / "random.safetensors"))


def checkpoint_of_another_net(tmp: Path, cifar: Path) -> None:
    """Our metadata says resnet_tiny_20k with its own widths; the tensors are of a net twice as wide."""
    from resnet.checkpoint import save_weights
    from resnet.data import CLASSES, MEAN, STD
    from resnet.models import create_model

    meta = {"model": "resnet_tiny_20k", "model_kwargs": {}, "classes": list(CLASSES), "mean": list(MEAN),
            "std": list(STD), "val_split": 100, "seed": 0, "tta": 0}
    save_weights(tmp / "other.safetensors", create_model("resnet_tiny_20k", widths=[16, 32, 64]), meta)


class _RunsCode:
    """Unpickling this runs ``touch pwned_by_pickle`` (with a plain pickle.load)."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def _custom_dict(n: int = 12, ids=None, **extra) -> dict:
    rows, _ = synthetic_images(n, seed=3)
    return {"data": rows, "ids": np.arange(n) if ids is None else ids, **extra}


def in_tmp(*setups: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    """Several setups in order."""
    def setup(tmp: Path, cifar: Path) -> None:
        for s in setups:
            s(tmp, cifar)
    return setup


def mkdir(name: str) -> Callable[[Path, Path], None]:
    return lambda tmp, cifar: (tmp / name).mkdir(parents=True)


# ------------------------------------------------------------------------------------------------
# The table
@dataclass(frozen=True)
class Case:
    id: str
    script: str  # train | evaluate | predict
    args: tuple[str, ...]  # {data}: the shared synthetic CIFAR folder
    expect: tuple[str, ...]  # fragments of the error line: what is named, and what was expected or found
    setup: Callable[[Path, Path], None] | None = None
    needs_run: bool = False  # gets ./run, a private copy of the session's trained run folder
    env: dict = field(default_factory=dict)
    xfail: str | None = None  # reason, for a known gap (strict: it fails once fixed)
    debug: bool = False


def T(id, args, expect, **kw) -> Case:
    return Case(id, "train", tuple(TRAIN) + tuple(args), tuple(expect), **kw)


def E(id, args, expect, **kw) -> Case:
    return Case(id, "evaluate", tuple(args), tuple(expect), **kw)


def P(id, args, expect, **kw) -> Case:
    return Case(id, "predict", tuple(args), tuple(expect), **kw)


DATA = ("--data-dir", "data")  # the case's own copy of the data (made by data_copy)
SHARED = ("--data-dir", "{data}")
CKPT = ("--checkpoint", RUN)
# evaluate.py --split val reads the same training batches as train.py, at half its start-up cost
VAL = ("--split", "val", *CKPT, *DATA)
CASES = [
    # --- CIFAR-10 training batches (data_batch_N in a copy of the synthetic folder)
    T("train-data-folder-missing", ("--data-dir", "nowhere"),
      ("nowhere/cifar-10-batches-py", "not found", "data_batch_1")),
    T("train-data-folder-empty", DATA, ("data/cifar-10-batches-py", "not found", "data_batch_1"),
      setup=mkdir(f"data/{BATCHES}")),
    T("train-batch-truncated", DATA, ("data_batch_1", "truncated or corrupt pickle", "expected a complete Python pickle"),
      setup=data_copy(lambda f: cut_in_half(f / "data_batch_1"))),
    T("train-batch-wrong-dtype", DATA, ("data_batch_1", "'data'", "uint8", "float32"),
      setup=data_copy(batch_with(rows=lambda r: r.astype(np.float32)))),
    E("evaluate-val-batch-empty", VAL, ("data_batch_2", "empty file (0 bytes)", "expected a Python pickle"), needs_run=True,
      setup=data_copy(lambda f: (f / "data_batch_2").write_bytes(b""))),
    E("evaluate-val-batch-corrupt", VAL, ("data_batch_3", "not a pickle file", "expected a Python pickle", "found binary data"), needs_run=True,
      setup=data_copy(lambda f: (f / "data_batch_3").write_bytes(np.random.default_rng(0).bytes(5000)))),
    E("evaluate-val-batch-wrong-shape", VAL, ("data_batch_1", "'data'", "(N, 3072) or (N, 32, 32, 3)", "(80, 1024)"),
      needs_run=True, setup=data_copy(batch_with(rows=lambda r: r[:, :1024].copy()))),
    E("evaluate-val-labels-out-of-range", VAL, ("data_batch_4", "'labels'", "0-9"), needs_run=True,
      setup=data_copy(batch_with("data_batch_4", labels=lambda y: y + 1))),
    # --- model
    T("train-unknown-model", ("--model", "resnet_tiny_2k", *SHARED),
      ("--model", "unknown model 'resnet_tiny_2k'", "did you mean resnet_tiny_20k")),
    T("train-model-kwargs-bad-key", ("--model-kwargs", '{"depth": 3}', *SHARED),
      ("--model-kwargs", "resnet_tiny_20k", "unexpected keyword argument 'depth'")),
    T("train-model-kwargs-bad-value", ("--model-kwargs", '{"blocks": [1, 2], "widths": [8, 16, 32, 64]}', *SHARED),
      ("--model-kwargs", "blocks [1, 2] and widths [8, 16, 32, 64] must have the same length")),
    T("train-model-kwargs-malformed", ("--model-kwargs", "{blocks: [1, 2", *SHARED),
      ("--model-kwargs", "expected a JSON/YAML mapping", "{blocks: [1, 2")),
    # --- flags and recipes (one parser for all three scripts)
    P("predict-unknown-flag", ("--data", "test.pkl", "--output", "sub.csv"),
      ("unrecognized arguments: --output", "did you mean --out"), setup=custom()),
    P("predict-config-invalid-yaml", ("--config", "recipe.yaml"),
      ("recipe.yaml", "not valid YAML", "line 2", "mapping values are not allowed"),
      setup=write_text("recipe.yaml", "tta: 1\n  batch_size: 100\n")),
    E("evaluate-config-unknown-key", ("--config", "recipe.yaml"),
      ("recipe.yaml", "unknown field 'batch_sise'", "did you mean 'batch_size'"),
      setup=write_text("recipe.yaml", "batch_sise: 100\n")),
    T("train-config-not-a-number", ("--config", "recipe.yaml", *SHARED),
      ("recipe.yaml", "field 'lr' expects a number", "'abc'"), setup=write_text("recipe.yaml", "lr: abc\n")),
    T("train-epochs-zero", ("--epochs", "0", *SHARED), ("--epochs", "must be positive", "got 0.0")),
    T("train-batch-size-negative", ("--batch-size", "-8", *SHARED), ("--batch-size", "at least 1", "got -8")),
    T("train-val-split-negative", ("--val-split", "-5", *SHARED), ("--val-split", "must not be negative", "got -5")),
    T("train-hflip-above-one", ("--hflip", "1.5", *SHARED), ("--hflip", "probability in [0, 1]", "got 1.5")),
    T("train-mix-prob-negative", ("--mix-prob", "-0.1", "--mixup", "0.2", *SHARED),
      ("--mix-prob", "probability in [0, 1]", "got -0.1")),
    T("train-batch-larger-than-data", ("--batch-size", "512", *SHARED),
      ("--batch-size", "300 training images cannot fill one batch of 512", "lower --batch-size")),
    T("train-wandb-online-without-login", ("--wandb", "online", *SHARED),
      ("--wandb online", "no W&B credentials"),
      env={"WANDB_API_KEY": "", "WANDB_MODE": "", "HOME": "."}),
    # --- run folders
    T("train-run-dir-holds-a-run", ("--run-dir", RUN, *SHARED),
      ("--run-dir run", "already holds a run", "--resume run", "--overwrite"), needs_run=True),
    T("train-resume-not-a-run", ("--resume", "notes", *SHARED),
      ("--resume notes", "no config.yaml", "run folder"), setup=in_tmp(mkdir("notes"), write_text("notes/a.txt", "x"))),
    T("train-resume-with-another-architecture",
      ("--resume", RUN, "--epochs", "2", "--model-kwargs", '{"widths": [16, 32, 64]}'),
      ("--resume run", "--model-kwargs {'widths': [16, 32, 64]} (the run's: {})", "start a new run"),
      needs_run=True),
    # --- custom pickles
    P("predict-data-not-a-dict", ("--data", "list.pkl"), ("list.pkl", "expected a dict", "found a list of 3 items"),
      setup=write_pickle("list.pkl", [1, 2, 3])),
    P("predict-data-lacks-data", ("--data", "nodata.pkl"), ("nodata.pkl", "missing key 'data'", "'ids'"),
      setup=write_pickle("nodata.pkl", {"ids": np.arange(12)})),
    P("predict-data-lacks-ids", ("--data", "noids.pkl"), ("noids.pkl", "missing key 'ids'", "'data'"),
      setup=write_pickle("noids.pkl", {"data": _custom_dict()["data"]})),
    P("predict-data-duplicated-ids", ("--data", "dup.pkl", *CKPT), ("dup.pkl", "'ids'", "expected a unique id per image", "found id 3 2 times"),
      setup=write_pickle("dup.pkl", _custom_dict(ids=np.array([1, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11]))),
      needs_run=True),
    P("predict-data-ids-length-mismatch", ("--data", "short.pkl"),
      ("short.pkl", "'ids'", "one id per image (12)", "found 11 ids"),
      setup=write_pickle("short.pkl", _custom_dict(ids=np.arange(11)))),
    P("predict-data-runs-code", ("--data", "evil.pkl"), ("evil.pkl", "refused to load", "only numpy arrays"),
      setup=write_pickle("evil.pkl", _RunsCode())),
    P("predict-data-runs-code-nested", ("--data", "evil.pkl"), ("evil.pkl", "refused to load", "only numpy arrays"),
      setup=write_pickle("evil.pkl", _custom_dict(ids=_RunsCode()))),
    P("predict-data-is-png", ("--data", "image.png"), ("image.png", "not a pickle file", "found a PNG image"), setup=png("image.png")),
    P("predict-data-is-text", ("--data", "notes.txt"), ("notes.txt", "not a pickle file", "found text"),
      setup=write_text("notes.txt", "id,label\n1,cat\n2,dog\n")),
    E("evaluate-data-lacks-labels", ("--data", "test.pkl", *CKPT), ("test.pkl", "missing key 'labels'"),
      setup=custom(), needs_run=True),
    # --- checkpoints
    E("evaluate-checkpoint-missing", ("--checkpoint", "gone.safetensors", *SHARED), ("gone.safetensors", "not found")),
    E("evaluate-checkpoint-folder-without-weights", ("--checkpoint", "empty", *SHARED),
      ("empty", "no best.safetensors or last.safetensors"), setup=mkdir("empty")),
    E("evaluate-checkpoint-truncated", ("--checkpoint", "run/best.safetensors", *SHARED),
      ("run/best.safetensors", "not a readable .safetensors checkpoint"), needs_run=True,
      setup=lambda tmp, cifar: cut_in_half(tmp / RUN / "best.safetensors")),
    P("predict-checkpoint-not-ours", ("--data", "test.pkl", "--checkpoint", "random.safetensors"),
      ("random.safetensors", "no 'resnet' metadata", "not a checkpoint written by this suite"),
      setup=in_tmp(custom(), safetensors_not_ours)),
    E("evaluate-checkpoint-of-another-net", ("--checkpoint", "other.safetensors", *SHARED),
      ("other.safetensors", "weights do not fit the model", "size mismatch", "another --model"),
      setup=checkpoint_of_another_net),
    P("predict-no-run-to-default-to", ("--data", "test.pkl"), ("no trained run found in runs", "--checkpoint"),
      setup=custom()),
    # --- outputs
    P("predict-out-folder-missing", ("--data", "test.pkl", "--out", "subs/sub.csv", *CKPT),
      ("--out subs/sub.csv", "subs does not exist"), setup=custom(), needs_run=True),
    P("predict-out-parent-is-a-file", ("--data", "test.pkl", "--out", "test.pkl/sub.csv", *CKPT),
      ("--out test.pkl/sub.csv", "test.pkl is a file, not a folder"), setup=custom(), needs_run=True),
    P("predict-out-read-only", ("--data", "test.pkl", "--out", "/proc/sub.csv", *CKPT),
      ("--out /proc/sub.csv", "cannot write in /proc"), setup=custom(), needs_run=True),
    E("evaluate-out-read-only", ("--out", "/proc/eval.json", *CKPT, *SHARED),
      ("--out /proc/eval.json", "cannot write in /proc"), needs_run=True),
    # --- inference flags
    E("evaluate-batch-size-zero", ("--batch-size", "0", *CKPT, *SHARED), ("--batch-size", "at least 1", "got 0"),
      needs_run=True),
    P("predict-batch-size-negative", ("--data", "test.pkl", "--batch-size", "-1", *CKPT),
      ("--batch-size", "at least 1", "got -1"), setup=custom(), needs_run=True),
]
# Same failure as a missing file, with --debug: the traceback is shown, and the error line still ends it.
DEBUG_CASE = P("predict-data-missing-debug", ("--data", "missing.pkl"), ("missing.pkl", "file not found"), debug=True)
BY_ID = {c.id: c for c in [*CASES, DEBUG_CASE]}
assert len(BY_ID) == len(CASES) + 1, "case ids must be unique"


# ------------------------------------------------------------------------------------------------
# Running
@dataclass
class Outcome:
    proc: subprocess.CompletedProcess
    new: list[str]  # paths that appeared
    changed: list[str]  # paths whose bytes changed or that disappeared
    tmp: Path
    seconds: float


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file (its sha256) and folder under ``roots``."""
    snap = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            snap[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
    return snap


def train_tiny_run(cifar: Path, root: Path) -> Path:
    """One epoch of the tiny net from a recipe that writes its lr as ``1e-3`` (which PyYAML reads as a string)."""
    (root / "recipe.yaml").write_text("opt: adam\nlr: 1e-3\n")
    proc = run_cli(str(ROOT / "train.py"), "--config", "recipe.yaml", *TRAIN, "--data-dir", str(cifar),
                   "--run-dir", "tiny", config=None, cwd=root, timeout=300)
    assert "lr 0.001 |" in proc.stdout, proc.stdout
    return root / "tiny"


def run_case(case: Case, tmp: Path, cifar: Path, trained: Future | None) -> Outcome:
    if case.needs_run:
        shutil.copytree(trained.result(), tmp / RUN)
    if case.setup:
        case.setup(tmp, cifar)
    args = [a.replace("{data}", str(cifar)) for a in case.args] + (["--debug"] if case.debug else [])
    env = {k: (str(tmp / v) if k == "HOME" else v) for k, v in case.env.items()}
    before = snapshot(tmp, cifar)
    started = time.perf_counter()
    proc = run_cli(str(ROOT / f"{case.script}.py"), *args, config=None, check=False, cwd=tmp, env=env, timeout=180)
    seconds = time.perf_counter() - started
    after = snapshot(tmp, cifar)
    return Outcome(proc, sorted(set(after) - set(before)), sorted(k for k in before if after.get(k) != before[k]), tmp,
                   seconds)


def _selected(request) -> tuple[list[Case], bool]:
    """The cases this session's selected tests ask for (all unless -k narrows it), and whether a trained run is."""
    ids, trained = set(), False
    for item in request.session.items:
        if item.module is not request.module:
            continue
        if item.originalname == "test_debug_shows_the_traceback":
            ids.add(DEBUG_CASE.id)
        elif item.originalname == "test_recipe_lr_in_exponent_form_is_a_number":
            trained = True
        elif hasattr(item, "callspec") and "case" in item.callspec.params:
            ids.add(item.callspec.params["case"].id)
    cases = [BY_ID[i] for i in BY_ID if i in ids]
    return cases, trained or any(c.needs_run for c in cases)


@pytest.fixture(scope="module")
def pool(request, cifar_dir, tmp_path_factory):
    """Start the trained run and every selected case in two threads; yield (trained run future, case futures)."""
    cases, need_run = _selected(request)
    # Cases without a checkpoint go first, so they run while the other thread trains.
    cases.sort(key=lambda c: c.needs_run)
    with ThreadPoolExecutor(2) as ex:
        trained = ex.submit(train_tiny_run, cifar_dir, tmp_path_factory.mktemp("trained")) if need_run else None
        futures = {c.id: ex.submit(run_case, c, tmp_path_factory.mktemp(c.id), cifar_dir, trained) for c in cases}
        yield trained, futures
        for f in futures.values():
            f.cancel()  # after a KeyboardInterrupt or -x, do not start the rest


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]


def _report(out: Outcome) -> str:
    return (f"exit {out.proc.returncode} after {out.seconds:.1f}s\n--- stdout\n{out.proc.stdout[-2000:]}\n"
            f"--- stderr\n{out.proc.stderr[-4000:]}")


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.xfail, strict=True)] if c.xfail else [])
    for c in CASES
])
def test_bad_input_fails_with_one_clear_line(case, pool):
    out: Outcome = pool[1][case.id].result()
    proc = out.proc
    assert proc.returncode == 2, _report(out)  # run_script's and argparse's code for a user error
    assert "Traceback" not in proc.stderr, _report(out)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), _report(out)
    for fragment in case.expect:
        assert fragment in lines[-1], f"{fragment!r} not in {lines[-1]!r}"
    assert error_lines(proc) == [lines[-1]], _report(out)
    assert out.new == [], f"left behind: {out.new}"
    assert out.changed == [], f"changed: {out.changed}"
    assert not (out.tmp / MARKER).exists()


def test_debug_shows_the_traceback(pool):
    out: Outcome = pool[1][DEBUG_CASE.id].result()
    assert out.proc.returncode == 2
    assert "Traceback (most recent call last)" in out.proc.stderr
    assert "resnet.data.DataError: missing.pkl: file not found; expected a pickle file" in out.proc.stderr
    last = [line for line in out.proc.stderr.splitlines() if line.strip()][-1]
    assert last == "error: missing.pkl: file not found; expected a pickle file"
    assert error_lines(out.proc) == [last]
    assert out.new == [] and out.changed == []


def test_recipe_lr_in_exponent_form_is_a_number(pool, tmp_path):
    run = pool[0].result()  # trained from `lr: 1e-3`; it printed "lr 0.001" as it started
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lr"] == 0.001 and isinstance(saved["lr"], float)
    (tmp_path / "r.yaml").write_text("lr: 1e-3\nweight_decay: 5E-4\nepochs: 1e1\n")
    cfg = parse_config(TrainConfig, ["--config", str(tmp_path / "r.yaml")])
    assert (cfg.lr, cfg.weight_decay, cfg.epochs) == (0.001, 0.0005, 10)


def test_resume_ignores_how_the_run_was_started(tmp_path):
    """A run's config.yaml records --run-dir and --overwrite; resuming it (moved, copied, or started with
    --overwrite) must not read them back as if given now."""
    from resnet.config import save_config
    from resnet.training import check_config

    moved = tmp_path / "moved"
    moved.mkdir()
    save_config(TrainConfig(run_dir="runs/original", overwrite=True, epochs=3), moved / "config.yaml")
    cfg = parse_config(TrainConfig, ["--resume", str(moved), "--epochs", "5"])
    assert (cfg.resume, cfg.run_dir, cfg.overwrite, cfg.epochs) == (str(moved), None, False, 5)
    check_config(cfg)
