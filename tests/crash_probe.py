"""Launched by test_reliability.py: train.py in this process, killed (os._exit: no clean-up, as SIGKILL or a
power cut) at one point of one save of the resumable state.

Usage: crash_probe.py POINT SAVE [train.py flags]. SAVE counts the saves of state/ from 1. POINT:
  tmp-incomplete   every rank's files are in state.tmp/, its trainer.json (the mark of a complete folder) not yet
  before-swap      state.tmp/ complete, before state/ is renamed to state.old/
  between-renames  after state/ -> state.old/, before state.tmp/ -> state/
  before-cleanup   after state.tmp/ -> state/, before state.old/ is deleted
  mid-cleanup      state.old/'s trainer.json deleted, the rest of it not yet
"""
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resnet.cli import run_script  # noqa: E402
from resnet.config import TrainConfig  # noqa: E402
from resnet.training import train  # noqa: E402

KILLED = 137
point, save = sys.argv[1], int(sys.argv[2])
real_replace, real_rmtree = os.replace, shutil.rmtree
saves = 0


def kill_if(here: str) -> None:
    if here == point and saves == save:
        os._exit(KILLED)


def replace(src, dst):
    global saves
    src, dst = Path(src), Path(dst)
    if dst.parent.name == "state.tmp" and dst.name == "trainer.json":
        saves += 1
        kill_if("tmp-incomplete")
    elif (src.name, dst.name) == ("state", "state.old"):
        kill_if("before-swap")
    elif (src.name, dst.name) == ("state.tmp", "state"):
        kill_if("between-renames")
    real_replace(src, dst)
    if (src.name, dst.name) == ("state.tmp", "state"):
        kill_if("before-cleanup")


def rmtree(path, *args, **kwargs):
    if Path(path).name == "state.old" and Path(path).exists():
        kill_if("mid-cleanup")
    real_rmtree(path, *args, **kwargs)


os.replace, shutil.rmtree = replace, rmtree
run_script(TrainConfig, train, "", sys.argv[3:])
