"""Stop a run cleanly on SIGTERM/SIGINT (preemption, Ctrl-C): finish the step, save, say how to resume."""
from __future__ import annotations

import signal
from typing import Any


class Stopped(Exception):
    """A run that stopped on purpose (a signal, a non-finite loss): the message for the user, then ``exit_code``."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopRequest:
    """While active, SIGTERM and SIGINT only set ``signum``; the loop checks it between steps.

    A second SIGINT while a stop is pending raises KeyboardInterrupt at once, for a user who will not wait
    for the step to finish (state then stays at the last save).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        # The first signal names the stop: a launcher that dies on Ctrl-C sends SIGTERM after it (launch.py).
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> "StopRequest":
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def request(self, signum: int) -> None:
        """Ask for a stop as if ``signum`` had arrived (for a signal that was due but cannot come)."""
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
