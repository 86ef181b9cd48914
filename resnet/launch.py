"""How this process was launched: the command that repeats the launch (for the resume line), and a watch
that stops the run with a save when its launcher dies.

Linux reads the launcher's command line from /proc; elsewhere, or when no launcher is found there, the
environment ``accelerate launch`` sets for its children stands in for it.
"""
from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path

from .interrupt import StopRequest

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Launchers run as `<name> [options] script args` (accelerate: `accelerate launch [options] ...`).
LAUNCHER_SCRIPTS = ("accelerate-launch", "torchrun")
LAUNCHER_MODULES = ("accelerate.commands.launch", "torch.distributed.run", "torch.distributed.launch")


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [os.fsdecode(word) for word in raw.split(b"\0")[:-1]] or None


def _parent(pid: int) -> int:
    try:  # the fields after the command name, which may hold spaces or ')': state, ppid, ...
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _ancestors() -> list[tuple[int, list[str]]]:
    """(pid, command line) of the parent, its parent, ... up to init: [] without /proc."""
    found, pid = [], os.getppid()
    while pid > 1 and len(found) < 32:
        argv = _cmdline(pid)
        if argv is None:
            break
        found.append((pid, argv))
        pid = _parent(pid)
    return found


# Read at start: once a launcher is killed, its /proc entry is gone, yet the resume line still needs it.
_ANCESTORS = _ancestors() if sys.platform.startswith("linux") else []


def _shown(path: str) -> str:
    """``path`` as the user would type it: the bare name when PATH finds this very file."""
    name = os.path.basename(path)
    found = shutil.which(name)
    try:
        return name if found and os.path.samefile(found, path) else path
    except OSError:
        return path


def _launcher_words(argv: list[str]) -> list[str] | None:
    """The launcher and its options in a launcher's command line ending in this script's argv, else None."""
    n = len(sys.argv)
    if len(argv) <= n or argv[-n:] != sys.argv:
        return None
    head = argv[:-n]
    for i, word in enumerate(head):
        name = os.path.basename(word)
        if name in LAUNCHER_SCRIPTS or name == "accelerate" and head[i + 1:i + 2] == ["launch"]:
            return [_shown(word), *head[i + 1:]]
        if word == "-m" and head[i + 1:i + 2] and head[i + 1] in LAUNCHER_MODULES:
            return head
    return None


def _env_launcher() -> list[str] | None:
    """``accelerate launch`` (or ``torchrun``) with the options its children's environment reveals, else None."""
    env = os.environ
    world, local = int(env.get("WORLD_SIZE") or 1), int(env.get("LOCAL_WORLD_SIZE") or 0)
    precision = env.get("ACCELERATE_MIXED_PRECISION")
    if precision is None:
        if "TORCHELASTIC_RUN_ID" not in env:
            return None
        words = ["torchrun", "--nproc_per_node", str(local or world)]
        return words + (["--nnodes", str(world // local)] if local and local < world else [])
    words = ["accelerate", "launch"]
    if world > 1:  # MULTI_GPU: the launcher that starts a process group, also on a CPU (see cpu_ddp.yaml)
        words += ["--multi_gpu", "--num_processes", str(world)]
        if local and local < world:
            words += ["--num_machines", str(world // local)]
    elif env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        words.append("--cpu")
    return words + (["--mixed_precision", precision] if precision != "no" else [])


def _python_words() -> list[str]:
    """The interpreter and its options as this process was started (``python``, ``python -u``)."""
    orig, n = list(getattr(sys, "orig_argv", [])), len(sys.argv)
    if len(orig) > n and orig[-n:] == sys.argv:
        return orig[:-n]
    return [sys.executable]


def launch_command(script_args_tail: list[str]) -> str:
    """The command that launches this script again as it was launched, with ``script_args_tail`` as its
    arguments: ``accelerate launch --config_file c.yaml train.py --resume R`` for a run started that way,
    ``python train.py --resume R`` for one started with python. Paths stay as the user gave them."""
    for _, argv in _ANCESTORS:
        words = _launcher_words(argv)
        if words is not None:
            break
    else:
        words = _env_launcher() or _python_words()
    return shlex.join([*words, sys.argv[0], *script_args_tail])


def launcher_pid() -> int | None:
    """The process id of the launcher that started this script (accelerate launch, torchrun), else None."""
    return next((pid for pid, argv in _ANCESTORS if _launcher_words(argv) is not None), None)


def watch_launcher(stop: StopRequest) -> bool:
    """When this process's parent is a launcher, have the kernel send SIGTERM when it dies (Linux), so the
    run saves and stops instead of training on as an orphan. True when the watch is set.

    Only under a launcher: a shell's child (``nohup python train.py &``) must outlive the shell. ``accelerate
    launch`` of one process dies on SIGTERM without passing it on; torchrun passes it on, and this covers
    a launcher killed by SIGKILL too. The signal follows the thread that started this process: the main
    thread in both launchers.
    """
    if not _ANCESTORS or _launcher_words(_ANCESTORS[0][1]) is None:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != _ANCESTORS[0][0]:  # it died before the watch was set: no signal will come
        stop.request(signal.SIGTERM)
    return True
