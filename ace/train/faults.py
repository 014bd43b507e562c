"""What stops a run: non-finite numbers, signals, and the exceptions that say which.

The Trainer asks :class:`NanPolicy` (``on_nan``: stop, skip or rollback, see :class:`ace.Trainer`) what to do
with what :class:`ace.PrimalDual` reports as a step's ``problem``; :class:`StopSignals` turns SIGINT and
SIGTERM into a flag that the loop reads after each step, so a run stops between steps with a checkpoint.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["NAN_POLICIES", "NonFiniteError", "Interrupted", "NanPolicy", "StopSignals", "catch_signals"]

NAN_POLICIES = ("stop", "skip", "rollback")


class NonFiniteError(RuntimeError):
    """A NaN or Inf in the loss, a constraint value, a gradient or a multiplier."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; a checkpoint was saved after the step in progress."""


@dataclass(frozen=True)
class NanPolicy:
    """What a non-finite number does to a run (``on_nan``): ``"stop"``, ``"skip"`` the step's update, or
    ``"rollback"`` to the last checkpoint with the primal learning rates scaled by ``factor`` per rollback, at
    most ``max_rollbacks`` times. At the end of a run (``final``) every policy stops: a run that ends
    non-finite is not finished."""

    on_nan: str = "stop"
    max_rollbacks: int = 3
    factor: float = 0.5

    def __post_init__(self) -> None:
        if self.on_nan not in NAN_POLICIES:
            raise ValueError(f"on_nan must be one of {NAN_POLICIES}, got {self.on_nan!r}")

    def decide(self, saved: bool, rollbacks: int, final: bool) -> Literal["skip", "rollback", "stop"]:
        """``saved``: a checkpoint exists to roll back to; ``rollbacks``: how many were taken."""
        if final or self.on_nan == "stop":
            return "stop"
        if self.on_nan == "skip":
            return "skip"
        return "rollback" if saved and rollbacks < self.max_rollbacks else "stop"

    def error(
        self, quantity: str, step: int, evaluated: bool, final: bool, checkpoint: Path | None, rollbacks: int
    ) -> NonFiniteError:
        """The error that stops the run, saying why and where the last good state is."""
        saved = checkpoint is not None and checkpoint.exists()
        where = f"the last good checkpoint is {checkpoint}" if saved else "no checkpoint was written yet"
        reason = f"train.on_nan={self.on_nan}"
        if final:
            reason = "at the end of the run: it is not finished"
        elif self.on_nan == "rollback":
            reason = (
                f"rollback gave up after {rollbacks} rollbacks" if saved else "rollback needs a checkpoint"
            )
        return NonFiniteError(
            f"non-finite {quantity} {'after' if evaluated else 'in'} step {step} ({reason}); {where}. "
            "Lower the learning rates, clip gradients (optim.grad_clip), or set train.on_nan to skip or "
            "rollback"
        )


class StopSignals:
    """SIGINT and SIGTERM during a fit: the first one is remembered (``received``) and the loop stops after
    the step in progress; under several processes the step that all ranks agreed on (``agreed``)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.agreed = False
        self._restore: Callable[[], None] = lambda: None

    def install(self) -> None:
        """Start listening (a new fit after an :class:`Interrupted` starts afresh)."""
        self.received, self.agreed = None, False
        self._restore = catch_signals(self._receive)

    def _receive(self, signum: int) -> None:
        self.received = signum

    def restore(self) -> None:
        """The handlers as they were before :meth:`install`."""
        self._restore()
        self._restore = lambda: None


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
