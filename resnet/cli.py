"""Shared entry point for the scripts: parse the config, run, and turn known errors into one line."""
from __future__ import annotations

import sys
from typing import Callable, Sequence, TypeVar

from .checkpoint import CheckpointError
from .config import ConfigError, parse_config
from .data import DataError

T = TypeVar("T")
# Errors whose message already says what is wrong and where: no traceback for these.
USER_ERRORS = (ConfigError, DataError, CheckpointError)


def run_script(cls: type[T], main: Callable[[T], object], description: str, argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(cls, argv, description)
    try:
        main(cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
