"""What stops a run: non-finite numbers, signals, and the exceptions that say which.

The Trainer applies ``on_nan`` (stop, skip or
rollback, see :class:`ace.Trainer`) to what :class:`ace.PrimalDual` reports as a step's ``problem``; SIGINT
and SIGTERM set a flag that the loop reads after each step, so a run stops between steps with a checkpoint.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["NAN_POLICIES", "NonFiniteError", "Interrupted", "RolledBack", "catch_signals"]

NAN_POLICIES = ("stop", "skip", "rollback")


class NonFiniteError(RuntimeError):
    """A NaN or Inf in the loss, a constraint value, a gradient or a multiplier."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; a checkpoint was saved after the step in progress."""


class RolledBack(Exception):
    """Internal: the state was restored from a checkpoint; the epoch loop starts over from there."""


def catch_signals(on_signal: Callable[[int], None]) -> Callable[[], None]:
    """Route SIGINT/SIGTERM to ``on_signal(signum)`` once (a second signal acts as usual); returns the
    function that restores the previous handlers. Outside the main thread nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous: dict[signal.Signals, Any] = {}  # what signal.signal returns: a handler, a constant or None

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def handler(signum: int, frame: Any) -> None:
        on_signal(signum)
        restore()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    return restore
