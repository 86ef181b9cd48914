"""Shared entry point for the scripts: parse the config, run, and turn known errors into one line."""
from __future__ import annotations

import sys
import traceback
from typing import Callable, Sequence, TypeVar

from .checkpoint import CheckpointError
from .config import ConfigError, parse_args
from .data import DataError
from .distributed import end_process_group
from .interrupt import Stopped

T = TypeVar("T")
# Errors whose message already says what is wrong and where: no traceback for these.
USER_ERRORS = (ConfigError, DataError, CheckpointError)


def run_script(cls: type[T], main: Callable[[T], object], description: str, argv: Sequence[str] | None = None) -> None:
    cfg, debug = parse_args(cls, argv, description)
    try:
        main(cfg)
    except USER_ERRORS as e:
        _fail(f"error: {e}", 2, debug)
    except Stopped as e:
        _fail(str(e), e.exit_code, debug)
    except OSError as e:  # a folder that is missing, read-only or full: the user's to fix, not a bug
        where = f"{e.filename}: " if e.filename else ""
        _fail(f"error: {where}{e.strerror or e}", 2, debug)
    except KeyboardInterrupt:
        _fail("interrupted", 130, debug)
    finally:
        end_process_group()  # evaluate.py and predict.py under accelerate launch; train's end_training did it


def _fail(line: str, code: int, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    # One line even when the message quotes a library's multi-line text (pickle, YAML, torch errors).
    line = " ".join(part.strip() for part in line.splitlines() if part.strip())
    # Flushed before exiting, so it comes before the CalledProcessError traceback accelerate launch adds.
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)
