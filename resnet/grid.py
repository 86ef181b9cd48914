"""``python -m resnet.grid``: run (or print) every combination of some settings x seeds, one after another.

    python -m resnet.grid runs/report --set activation=relu,gelu --set opt=sgd,adam --seeds 0,1,2 \\
        --config-file accelerate_configs/single_gpu.yaml -- --epochs 40 --wandb-tags report

Each run is ``accelerate launch [--config_file F] train.py <settings> --seed S --run-dir DIR/<name> [flags
after --]`` in a folder named by its settings (``activation-gelu_opt-adam_seed-0``). The grid is safe
to re-run after an interruption or a failure: a finished run (summary.json says so) is skipped, one
with saved state is continued with ``--resume``, and a folder left without state is started over
with ``--overwrite``. A failed run is reported and the grid goes on; the exit code is 1 if any failed.
Then ``python -m resnet.compare DIR`` tabulates the groups.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import yaml

from .state_folder import newest_complete_state
from .config import TrainConfig, build_parser, parse_config
from .progress import grid_estimate

# Located from this file, not from `resnet.__file__`: the package has no __init__.py (namespace package).
TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"
# Flags the grid sets itself for every run; setting them by hand would break naming, skipping or resuming.
GRID_OWNED = {"seed": "use --seeds", "run_dir": "runs go to EXPERIMENT_DIR/<name>",
              "resume": "the grid resumes unfinished runs itself", "overwrite": "the grid restarts stale folders itself"}
BOOL_VALUES = {"true": True, "false": False}


class GridError(ValueError):
    """Bad grid input; main prints the message as one ``error:`` line and exits 2."""


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    name: str            # folder name, readable and unique in the grid, e.g. activation-gelu_opt-adam_seed-0
    run_dir: Path        # EXPERIMENT_DIR / name
    train_args: list     # train.py flags of a fresh start: settings, --seed, --run-dir, extra flags


def train_parser() -> argparse.ArgumentParser:
    """train.py's own parser, raising GridError instead of printing usage and exiting."""
    parser = build_parser(TrainConfig, "")

    def error(message: str):
        raise GridError(f"train.py would reject: {message}")

    parser.error = error  # type: ignore[method-assign]
    return parser


def field_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """TrainConfig field name -> its argparse action (type, choices, boolean or not)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return {a.dest: a for a in parser._actions if a.dest in fields}


def split_values(text: str) -> list[str]:
    """Split on commas outside brackets and quotes, so dict values like {"blocks": [2,2]} stay whole."""
    values, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    values.append(text[start:].strip())
    return values


def parse_set(text: str, actions: dict[str, argparse.Action]) -> tuple[str, list[str]]:
    """``KEY=V1,V2`` -> (field name, [values]); the key is checked against TrainConfig, each value
    against the field's type and choices, so a typo fails before the first run and not after an hour."""
    key, sep, rest = text.partition("=")
    name = key.strip().lstrip("-").replace("-", "_")
    if not sep or not name:
        raise GridError(f"--set {text!r}: expected KEY=V1,V2,...")
    if name not in actions:
        near = difflib.get_close_matches(name, sorted(actions), n=4, cutoff=0.6)
        hint = f"did you mean {', '.join(near)}?" if near else "see `python train.py --help` for the fields"
        raise GridError(f"--set {key}: unknown TrainConfig field '{name}'; {hint}")
    if name in GRID_OWNED:
        raise GridError(f"--set {key}: {GRID_OWNED[name]}")
    values = list(dict.fromkeys(split_values(rest)))  # drop repeats, keep order
    if any(v == "" for v in values):
        raise GridError(f"--set {text!r}: empty value")
    action = actions[name]
    for value in values:
        if isinstance(action, argparse.BooleanOptionalAction):
            if value.lower() not in BOOL_VALUES:
                raise GridError(f"--set {key}: '{name}' is a switch, give true/false, got {value!r}")
            continue
        try:
            converted = action.type(value) if action.type else value
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise GridError(f"--set {key}: bad value {value!r} for '{name}' ({e})") from None
        if action.choices and converted not in action.choices:
            raise GridError(f"--set {key}: '{name}' must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return name, values


def setting_flags(name: str, value: str, actions: dict[str, argparse.Action]) -> list[str]:
    """train.py flags for one setting: switches become --flag / --no-flag."""
    flag = "--" + name.replace("_", "-")
    if isinstance(actions[name], argparse.BooleanOptionalAction):
        return [flag] if BOOL_VALUES[value.lower()] else ["--no-" + flag[2:]]
    return [flag, value]


def _slug(value: str) -> str:
    """A folder-safe form of a value; a value that had to be changed gets a short hash so names stay unique."""
    text = value.lower() if value.lower() in BOOL_VALUES else value
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "", text)[:40]
    if slug != text:
        digest = hashlib.sha1(value.encode()).hexdigest()[:6]
        slug = f"{slug}-{digest}" if slug else digest
    return slug


def run_folder_name(settings: Sequence[tuple[str, str]], seed: int) -> str:
    """``activation-gelu_opt-adam_seed-0``: the settings in --set order, then the seed."""
    parts = [f"{name.replace('_', '-')}-{_slug(value)}" for name, value in settings]
    return "_".join(parts + [f"seed-{seed}"])


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in split_values(text)]
    except ValueError:
        raise GridError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    return list(dict.fromkeys(seeds))


def plan_grid(experiment_dir: str | Path, sets: Sequence[str], seeds: Sequence[int],
              extra: Sequence[str] = ()) -> list[PlannedRun]:
    """Every combination of the ``--set`` values x seeds, as fresh-start train.py arguments.

    Seeds are the outer loop: after the first pass every group has one run, so an interrupted grid
    can already be compared.
    """
    parser = train_parser()
    actions = field_actions(parser)
    parsed = [parse_set(text, actions) for text in sets]
    names = [name for name, _ in parsed]
    if len(set(names)) != len(names):
        raise GridError(f"--set: each key once, got {', '.join(names)}")
    given = vars(parser.parse_args(list(extra)))  # only flags actually given (defaults are SUPPRESS)
    for name in given:
        if name in GRID_OWNED:
            raise GridError(f"flag after --: --{name.replace('_', '-')} is set by the grid ({GRID_OWNED[name]})")
        if name in names:
            raise GridError(f"flag after --: --{name.replace('_', '-')} is also in --set; give it in one place")
    root = Path(experiment_dir)
    runs = []
    for seed in seeds:
        for combo in itertools.product(*[[(name, v) for v in values] for name, values in parsed]):
            name = run_folder_name(combo, seed)
            args = [flag for setting in combo for flag in setting_flags(*setting, actions)]
            args += ["--seed", str(seed), "--run-dir", str(root / name), *extra]
            runs.append(PlannedRun(name, root / name, args))
    if runs:
        parser.parse_args(runs[0].train_args)  # the whole command line, once, as train.py will see it
    assert len({r.name for r in runs}) == len(runs), "run folder names must be unique"
    return runs


def run_state(run_dir: Path) -> str:
    """'finished', 'resumable' (saved state, not finished), 'stale' (files but no state) or 'new'."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            if json.loads(summary.read_text()).get("finished") is True:
                return "finished"
        except (ValueError, OSError, AttributeError):
            pass  # unreadable: let the state decide
    state = newest_complete_state(run_dir)  # state/, or what a kill in the middle of a save left
    if state is not None:
        if not summary.exists() and _state_reached_epochs(run_dir, state):
            return "finished"
        return "resumable"
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return "stale"
    return "new"


def _state_reached_epochs(run_dir: Path, state: Path) -> bool:
    """Runs from before summary.json existed: finished when the saved state reached the configured epochs."""
    try:
        done = json.loads((state / "trainer.json").read_text())["epoch"]
        return int(done) >= int(yaml.safe_load((run_dir / "config.yaml").read_text())["epochs"])
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return False


def train_args_for(run: PlannedRun, state: str) -> list[str] | None:
    """train.py arguments for the run's current state; None when there is nothing to do."""
    if state == "finished":
        return None
    if state == "resumable":
        return [*run.train_args, "--resume", str(run.run_dir)]
    if state == "stale":
        return [*run.train_args, "--overwrite"]
    return list(run.train_args)


def epochs_left(run: PlannedRun, state: str) -> float:
    """Epochs a launch has left to train (for a dry run's estimate): its --epochs (a recipe's included), less
    what its summary.json says was done when it continues a saved state."""
    try:
        epochs = float(parse_config(TrainConfig, run.train_args).epochs)
    except (SystemExit, ValueError, TypeError, OSError):
        return 0.0
    if state == "resumable":
        try:
            epochs -= float(json.loads((run.run_dir / "summary.json").read_text()).get("epochs_done") or 0)
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    return max(epochs, 0.0)


def accelerate_executable() -> str:
    """The `accelerate` of this interpreter's environment (a venv need not be activated), else PATH's."""
    beside = Path(sys.executable).with_name("accelerate")
    return str(beside) if beside.is_file() else (shutil.which("accelerate") or "accelerate")


def launch_command(train_args: Sequence[str], config_file: str | None = None) -> list[str]:
    cmd = [accelerate_executable(), "launch"]
    if config_file:
        cmd += ["--config_file", str(config_file)]
    return [*cmd, str(TRAIN_SCRIPT), *train_args]


class ChildStop:
    """While a launch runs, SIGINT and SIGTERM to the grid go to the launch's own process group, in order:
    the first asks the run to save and stop (train.py does so after its step), the second to stop at once
    (train.py's second Ctrl-C), any later one kills the group. Between launches Python's own handling
    stops the grid.

    The launch has a process group of its own so that a terminal's Ctrl-C reaches train.py once, through
    the grid, and so that the whole launch (accelerate and its train.py processes) can be signalled and
    waited for: ``accelerate launch`` neither passes a signal on to its single child nor waits for it
    once it is interrupted itself.
    """

    def __init__(self) -> None:
        self.group: int | None = None
        self.count = 0

    def __call__(self, signum: int, frame) -> None:
        self.count += 1
        if self.group is None:
            return  # the launch is starting: run_to_the_end passes the stop on once it has a group
        if self.count == 1:
            print(f"\n{signal.Signals(signum).name}: asking the run to save and stop (again to stop it at once)",
                  flush=True)
        _signal_group(self.group, signum if self.count <= 2 else signal.SIGKILL)


def _signal_group(group: int, signum: int) -> bool:
    """Send ``signum`` to a process group; False once no process of it is left."""
    try:
        os.killpg(group, signum)
        return True
    except ProcessLookupError:
        return False


def run_to_the_end(cmd: list[str], stop: ChildStop | None = None) -> int:
    """Run one launch in a process group of its own and wait until every process of it has exited.

    Raises KeyboardInterrupt after the launch has ended when a signal asked the grid to stop.
    """
    stop = stop or ChildStop()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        child = subprocess.Popen(cmd, start_new_session=True)
        stop.group = child.pid
        if stop.count:  # a signal came while the launch was starting
            _signal_group(child.pid, signal.SIGINT)
        code = child.wait()
        while _signal_group(child.pid, 0):  # train.py may outlive accelerate launch: wait for it too
            time.sleep(0.1)
    finally:
        stop.group = None
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stop.count:
        raise KeyboardInterrupt
    return code


def build_parser_grid() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m resnet.grid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s EXPERIMENT_DIR --set KEY=V1,V2 [--set ...] [--seeds 0,1,2] [--config-file ACCELERATE_YAML] "
              "[--dry-run] [-- more train.py flags]")
    p.add_argument("experiment_dir", metavar="EXPERIMENT_DIR", help="folder that receives one run folder per combination x seed")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=V1,V2",
                   help="a TrainConfig field (dashed or underscored) and its values; switches take true/false; repeat for more keys")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, each combination runs once per seed (default: 0)")
    p.add_argument("--config-file", help="accelerate config passed to `accelerate launch --config_file`")
    p.add_argument("--dry-run", action="store_true", help="print the launch commands, one per line, and run nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:  # everything after -- goes to train.py untouched
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser_grid().parse_args(argv)
    try:
        if not args.sets:
            raise GridError("give at least one --set KEY=V1,V2")
        if args.config_file and not Path(args.config_file).is_file():
            raise GridError(f"--config-file {args.config_file}: file not found")
        if Path(args.experiment_dir).exists() and not Path(args.experiment_dir).is_dir():
            raise GridError(f"{args.experiment_dir}: exists and is not a folder")
        runs = plan_grid(args.experiment_dir, args.sets, parse_seeds(args.seeds), extra)
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    finished, skipped, failed, interrupted, planned = 0, 0, [], False, []
    notes = {"resumable": "continuing from its saved state", "stale": "folder has no saved state, starting over",
             "new": "starting"}
    log = sys.stderr if args.dry_run else sys.stdout  # a dry run's stdout is only commands
    try:
        for i, run in enumerate(runs, 1):
            state = run_state(run.run_dir)
            train_args = train_args_for(run, state)
            if train_args is None:
                skipped += 1
                print(f"[{i}/{len(runs)}] {run.name}: finished already, skipped", file=log, flush=True)
                continue
            cmd = launch_command(train_args, args.config_file)
            if args.dry_run:
                print(shlex.join(cmd), flush=True)
                planned.append(epochs_left(run, state))
                continue
            print(f"[{i}/{len(runs)}] {run.name}: {notes[state]}\n  {shlex.join(cmd)}", flush=True)
            code = run_to_the_end(cmd)
            if code == 0:
                finished += 1
            else:
                failed.append((run.name, code))
                print(f"[{i}/{len(runs)}] {run.name}: failed (exit {code}); going on", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to continue where it stopped", flush=True)
        interrupted = True
    if args.dry_run:
        print(grid_estimate(Path(args.experiment_dir), planned), file=log, flush=True)
        return 0
    print(f"{finished} finished, {skipped} skipped, {len(failed)} failed"
          + "".join(f"\n  failed: {name} (exit {code})" for name, code in failed), flush=True)
    return 130 if interrupted else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
