"""What stops a run: non-finite numbers, signals, and the exceptions that say which.

:class:`StepCheck` finds a step's non-finite numbers; the Trainer applies ``on_nan`` (stop, skip or
rollback, see :class:`ace.Trainer`) to what :class:`ace.PrimalDual` reports as a step's ``problem``; SIGINT
and SIGTERM set a flag that the loop reads after each step, so a run stops between steps with a checkpoint.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["NAN_POLICIES", "NonFiniteError", "Interrupted", "RolledBack", "catch_signals", "StepCheck"]

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
    previous = {}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def handler(signum: int, frame: Any) -> None:
        on_signal(signum)
        restore()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    return restore


class StepCheck:
    """The step's one host sync: reads the small quantities of a step (loss, constraint values,
    multipliers) as floats and tests every gradient of ``parameters`` for a NaN or Inf.

    The gradients are tested by the fused kernel of torch's ``GradScaler``
    (``_amp_foreach_non_finite_check_and_unscale_``, with a scale of 1, which changes no value), one kernel
    per device and dtype where ``isfinite(g).all()`` takes five operators per tensor, into flags that persist
    between steps (reset when set): on a small model the step's fixed cost is mostly per-call overhead.
    """

    def __init__(self, parameters: list[torch.Tensor], device: torch.device) -> None:
        groups: dict[tuple, list[torch.Tensor]] = {}
        for p in parameters:
            groups.setdefault((p.device, p.dtype), []).append(p)
        self.groups = list(groups.values())
        self.device = device
        devices = {device, *(p.device for p in parameters)}
        self.flags = {d: (torch.zeros(1, device=d), torch.ones(1, device=d)) for d in devices}

    def __call__(self, quantities: dict[str, list[torch.Tensor]]) -> tuple[dict[str, list[float]], bool]:
        """``(floats by quantity, whether every gradient is finite)``."""
        with torch.no_grad():
            for group in self.groups:
                grads = [p.grad for p in group if p.grad is not None]
                if grads:
                    found, one = self.flags[grads[0].device]
                    try:
                        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
                    except (RuntimeError, NotImplementedError):  # no kernel for this device or dtype
                        found += ~torch.stack([torch.isfinite(g).all() for g in grads]).all()
            flat = [t if t.dim() == 1 else t.reshape(-1) for ts in quantities.values() for t in ts]
            flags = [found.to(self.device) for found, _ in self.flags.values()]
            numbers = torch.cat([*flat, *flags]).tolist()
        finite = not any(numbers[len(numbers) - len(flags) :])
        if not finite:
            for found, _ in self.flags.values():
                found.zero_()
        out, start = {}, 0
        for name, ts in quantities.items():
            n = sum(t.numel() for t in ts)
            out[name], start = numbers[start : start + n], start + n
        return out, finite
