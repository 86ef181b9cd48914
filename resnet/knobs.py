"""What every config field is made of: ``knob`` (a dataclass field with its help) and ``ConfigError``.

A module of its own so that config.py and the technique modules (which declare their own fields) can
both use it without importing each other.
"""
from __future__ import annotations

from dataclasses import field
from typing import Any, Sequence


class ConfigError(ValueError):
    """A bad value in a recipe file or flag; the message names the source and the field."""


def knob(default: Any, help: str, choices: Sequence[str] | None = None, **kw) -> Any:
    """A config field with its help text (unit or effect) and optional choices."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "choices": choices})
    return field(default=default, metadata={"help": help, "choices": choices, **kw})
