"""`python -m resnet.grid`: the commands it builds, its errors, and skip/resume/restart of run folders."""
import dataclasses
import itertools
import json
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY_RUN, start_and_signal
from resnet import grid
from resnet.config import TrainConfig, parse_config, save_config

REPORT_GRID = ["--set", "activation=relu,gelu", "--set", "opt=sgd,adam", "--seeds", "0,1,2"]
HAS_OVERWRITE = "overwrite" in {f.name for f in dataclasses.fields(TrainConfig)}


def train_part(cmd: list[str]) -> list[str]:
    """The arguments after train.py in a launch command."""
    return cmd[cmd.index(str(grid.TRAIN_SCRIPT)) + 1:]


def dry_run(capsys, *args: str) -> list[list[str]]:
    assert grid.main([args[0], "--dry-run", *args[1:]]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def test_dry_run_lists_every_combination_x_seed_as_train_py_commands(tmp_path, capsys):
    exp = tmp_path / "exp dir"  # a space: commands must be shell-quoted
    config_file = str(ROOT / "accelerate_configs" / "cpu.yaml")
    cmds = dry_run(capsys, str(exp), *REPORT_GRID, "--config-file", config_file, "--",
                   "--epochs", "2", "--no-compile")
    assert len(cmds) == 12
    seen = set()
    for cmd in cmds:
        assert Path(cmd[0]).name == "accelerate" and cmd[1:4] == ["launch", "--config_file", config_file]
        assert grid.TRAIN_SCRIPT == ROOT / "train.py" and str(grid.TRAIN_SCRIPT) in cmd
        cfg = parse_config(TrainConfig, train_part(cmd))  # exactly what train.py will parse
        assert (cfg.epochs, cfg.compile) == (2, False)
        run = Path(cfg.run_dir)
        assert run.parent == exp and run.name == f"activation-{cfg.activation}_opt-{cfg.opt}_seed-{cfg.seed}"
        seen.add((cfg.activation, cfg.opt, cfg.seed))
    assert seen == set(itertools.product(["relu", "gelu"], ["sgd", "adam"], [0, 1, 2]))
    assert not exp.exists()  # a dry run creates nothing


def test_seeds_are_the_outer_loop_and_the_default_seed_is_0(tmp_path, capsys):
    names = [Path(parse_config(TrainConfig, train_part(c)).run_dir).name for c in dry_run(capsys, str(tmp_path), *REPORT_GRID)]
    assert names[:4] == ["activation-relu_opt-sgd_seed-0", "activation-relu_opt-adam_seed-0",
                         "activation-gelu_opt-sgd_seed-0", "activation-gelu_opt-adam_seed-0"]
    (cmd,) = dry_run(capsys, str(tmp_path), "--set", "lr=0.1")
    assert parse_config(TrainConfig, train_part(cmd)).seed == 0


def test_switches_dicts_and_dashed_keys(tmp_path, capsys):
    cmds = dry_run(capsys, str(tmp_path), "--set", "channels-last=true,False",
                   "--set", 'model_kwargs={"blocks": [1, 1, 1, 1]},{}')
    cfgs = [parse_config(TrainConfig, train_part(c)) for c in cmds]
    assert [(c.channels_last, c.model_kwargs) for c in cfgs] == [
        (True, {"blocks": [1, 1, 1, 1]}), (True, {}), (False, {"blocks": [1, 1, 1, 1]}), (False, {})]
    assert "--no-channels-last" in cmds[2] and "--channels-last" in cmds[0]
    names = [Path(c.run_dir).name for c in cfgs]
    assert len(set(names)) == 4 and names[0].startswith("channels-last-true_model-kwargs-blocks1111-")
    assert all(n.replace("-", "").replace("_", "").replace(".", "").isalnum() for n in names)


@pytest.mark.parametrize("args, expected", [
    (["--set", "activaton=relu,gelu"], ["activaton", "did you mean activation?"]),
    (["--set", "learning_rate=0.1"], ["learning_rate", "python train.py --help"]),
    (["--set", "opt=sgd,rmsprop"], ["'opt' must be one of", "rmsprop"]),
    (["--set", "epochs=3,many"], ["bad value 'many'", "epochs"]),
    (["--set", "compile=yes"], ["switch, give true/false"]),
    (["--set", "seed=1,2"], ["use --seeds"]),
    (["--set", "lr"], ["expected KEY=V1,V2"]),
    (["--set", "lr=0.1", "--set", "lr=0.2"], ["each key once"]),
    (["--set", "lr=0.1", "--seeds", "0,x"], ["--seeds"]),
    (["--set", "lr=0.1", "--", "--run-dir", "x"], ["--run-dir is set by the grid"]),
    (["--set", "lr=0.1", "--", "--lr", "0.3"], ["--lr is also in --set"]),
    (["--set", "lr=0.1", "--", "--epocs", "3"], ["train.py would reject", "--epocs"]),
    ([], ["at least one --set"]),
    (["--set", "lr=0.1", "--config-file", "no/such.yaml"], ["--config-file no/such.yaml: file not found"]),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, args, expected):
    assert grid.main([str(tmp_path / "exp"), "--dry-run", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1
    for text in expected:
        assert text in err


def write_run(run_dir: Path, state_epoch=None, summary=None, config_epochs=3, other_files=False):
    """A run folder in one of the states training leaves behind."""
    run_dir.mkdir(parents=True)
    save_config(TrainConfig(epochs=config_epochs, run_dir=str(run_dir)), run_dir / "config.yaml")
    if state_epoch is not None:
        (run_dir / "state").mkdir()
        (run_dir / "state" / "trainer.json").write_text(json.dumps({"epoch": state_epoch, "global_step": 1}))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    if other_files:
        (run_dir / "metrics.csv").write_text("epoch\n1\n")


def test_run_state_finished_resumable_stale_new(tmp_path):
    write_run(tmp_path / "done", state_epoch=3, summary={"finished": True, "epochs_done": 3})
    write_run(tmp_path / "half", state_epoch=1, summary={"finished": False, "epochs_done": 1})
    write_run(tmp_path / "legacy_done", state_epoch=3)  # from before summary.json: state reached the epochs
    write_run(tmp_path / "legacy_half", state_epoch=2)
    write_run(tmp_path / "summary_says_more", state_epoch=3, summary={"finished": False})  # summary wins
    write_run(tmp_path / "stale", other_files=True)  # crashed before its first saved state
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{not json")
    states = {p.name: grid.run_state(p) for p in sorted(tmp_path.iterdir())}
    states["missing"] = grid.run_state(tmp_path / "missing")
    assert states == {"done": "finished", "half": "resumable", "legacy_done": "finished", "legacy_half": "resumable",
                      "summary_says_more": "resumable", "stale": "stale", "empty": "new", "broken": "stale",
                      "missing": "new"}


def test_commands_for_each_state(tmp_path):
    (run,) = grid.plan_grid(tmp_path, ["opt=adam"], [1], ["--epochs", "3"])
    assert run.name == "opt-adam_seed-1" and run.run_dir == tmp_path / "opt-adam_seed-1"
    assert grid.train_args_for(run, "finished") is None
    fresh = grid.train_args_for(run, "new")
    assert fresh == ["--opt", "adam", "--seed", "1", "--run-dir", str(run.run_dir), "--epochs", "3"]

    resume = grid.train_args_for(run, "resumable")
    assert resume == [*fresh, "--resume", str(run.run_dir)]
    write_run(run.run_dir, state_epoch=1)
    cfg = parse_config(TrainConfig, resume)  # train.py reads the run's config.yaml, the same flags win
    assert (cfg.resume, cfg.opt, cfg.seed, cfg.epochs) == (str(run.run_dir), "adam", 1, 3)

    restart = grid.train_args_for(run, "stale")
    assert restart == [*fresh, "--overwrite"]
    if HAS_OVERWRITE:
        assert parse_config(TrainConfig, restart).overwrite is True
    # Until train.py has --overwrite, only the rest of the command can be checked against its parser.

    cmd = grid.launch_command(fresh, "cfg.yaml")
    assert cmd[1:] == ["launch", "--config_file", "cfg.yaml", str(ROOT / "train.py"), *fresh]
    assert cmd[0] == str(Path(sys.executable).with_name("accelerate"))


def test_dry_run_prints_only_what_is_left_to_do(tmp_path, capsys):
    exp = tmp_path / "exp"
    write_run(exp / "activation-relu_opt-sgd_seed-0", state_epoch=3, summary={"finished": True})
    write_run(exp / "activation-gelu_opt-sgd_seed-0", state_epoch=1)
    write_run(exp / "activation-relu_opt-adam_seed-1", other_files=True)
    assert grid.main([str(exp), *REPORT_GRID, "--dry-run"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 11 and "finished already, skipped" in err and "relu_opt-sgd_seed-0" in err
    assert sum("--resume" in line for line in lines) == 1 and sum("--overwrite" in line for line in lines) == 1
    assert any(line.endswith(f"--resume {exp}/activation-gelu_opt-sgd_seed-0") for line in lines)


def test_a_failure_is_reported_and_the_grid_goes_on(tmp_path, capsys, monkeypatch):
    """Launches faked: a run 'finishes' by writing summary.json; the lr=0.2 run exits 3."""
    launched = []

    def fake_run(cmd):
        args = train_part(cmd)
        launched.append(args)
        cfg = parse_config(TrainConfig, [a for a in args if a != "--overwrite"])
        if cfg.lr == 0.2:
            return subprocess.CompletedProcess(cmd, 3)
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "summary.json").write_text(json.dumps({"finished": True}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(grid, "run_to_the_end", lambda cmd: fake_run(cmd).returncode)
    args = [str(tmp_path), "--set", "lr=0.1,0.2,0.3"]
    assert grid.main(args) == 1
    out = capsys.readouterr().out
    assert len(launched) == 3  # the run after the failure still ran
    assert "lr-0.2_seed-0: failed (exit 3); going on" in out
    assert out.splitlines()[-2:] == ["2 finished, 0 skipped, 1 failed", "  failed: lr-0.2_seed-0 (exit 3)"]

    launched.clear()
    assert grid.main(args) == 1  # again: the finished two are skipped, the failed one is tried again
    assert [a[1] for a in launched] == ["0.2"]
    assert capsys.readouterr().out.splitlines()[-2] == "0 finished, 2 skipped, 1 failed"


def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "resnet.grid", str(tmp_path), "--set", "opt=sgd,adam", "--dry-run"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 2
    proc = subprocess.run([sys.executable, "-m", "resnet.grid", str(tmp_path), "--set", "optt=sgd"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == \
        "error: --set optt: unknown TrainConfig field 'optt'; did you mean opt?"


@pytest.mark.slow
def test_real_grid_goes_on_after_a_failing_run(cifar_dir, tmp_path):
    """Two tiny runs through the real `accelerate launch`: hflip=2.0 is rejected by train.py, 0.5 trains.

    Skipping on a re-run is not checked here: train.py does not write summary.json yet.
    """
    cmd = [sys.executable, "-m", "resnet.grid", str(tmp_path / "exp"), "--set", "hflip=2.0,0.5",
           "--config-file", str(ROOT / "accelerate_configs" / "cpu.yaml"), "--",
           *TINY_RUN, "--data-dir", str(cifar_dir), "--epochs", "1", "--wandb", "off", "--train-subset", "200"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    # train.py exits 2 on the bad value; accelerate launch reports its child's failure as 1.
    assert re.search(r"\[1/2\] hflip-2\.0_seed-0: failed \(exit [1-9]\d*\); going on", proc.stdout)
    assert "--hflip: is a probability in [0, 1], got 2.0" in proc.stderr
    assert "[2/2] hflip-0.5_seed-0: starting" in proc.stdout and "epoch 1/1" in proc.stdout
    assert lines[-2] == "1 finished, 0 skipped, 1 failed" and lines[-1].startswith("  failed: hflip-2.0_seed-0 (exit ")
    good = tmp_path / "exp" / "hflip-0.5_seed-0"
    assert (good / "metrics.csv").is_file() and (good / "state" / "trainer.json").is_file()
    # And the comparison reads a real run folder (params from the checkpoint's metadata, as no summary.json yet).
    from resnet import compare

    (record,) = [compare.load_run(p) for p in compare.find_runs([tmp_path / "exp"])]
    assert record.params and record.params > 1000 and 0 < record.best_val_acc <= 1 and record.best_epoch == 1


def processes_naming(text: str) -> list[str]:
    """Command lines of the live processes whose command line contains ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if text in cmdline and (proc / "stat").read_text().split(") ")[-1][0] != "Z":
                found.append(cmdline)
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").is_file(), reason="reads running processes from /proc")
def test_sigint_to_the_grid_stops_it_after_its_run_has_saved_and_exited(cifar_dir, tmp_path):
    """SIGINT to the grid alone while a run trains (`kill -INT <grid>`; a terminal's Ctrl-C also reaches the
    grid alone, the launch has its own process group): the run saves and exits, and only then does the grid;
    no process of the launch outlives it."""
    exp = tmp_path / "exp"
    cmd = [sys.executable, "-m", "resnet.grid", str(exp), "--set", "hflip=0.5",
           "--config-file", str(ROOT / "accelerate_configs" / "cpu.yaml"), "--",
           "--model", "resnet18_narrow_3m", "--batch-size", "2", "--val-split", "100", "--train-subset", "120",
           "--no-download", "--wandb", "off", "--epochs", "2", "--progress", "--data-dir", str(cifar_dir)]
    code, out, err = start_and_signal(cmd, signal.SIGINT, re.compile(r"epoch 1: +[1-4]\d%"), group=False)
    left = processes_naming(str(exp))
    assert not left, f"still running after the grid exited: {left}"
    assert code == 130, out + err[-2000:]
    assert "interrupted; run the same command again to continue where it stopped" in out
    assert re.search(r"stopped by SIGINT at epoch 1, step \d+/60; state saved", err)
    run_dir = exp / "hflip-0.5_seed-0"
    assert grid.run_state(run_dir) == "resumable"
    assert json.loads((run_dir / "state" / "trainer.json").read_text())["step_in_epoch"] > 0
