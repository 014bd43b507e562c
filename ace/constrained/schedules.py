"""Tolerance schedules eps(t): pure functions of the training step.

Every schedule is a frozen dataclass called as ``schedule(step) -> float``, so resuming a run needs
only the step count (as for nanoGPT's learning rate). Ramps hold ``start`` before ``delay`` and
``end`` after ``delay + steps``; in between they move with the progress

    w(t) = (t - delay) / steps          clipped to [0, 1]   (steps = 0: a jump to end at t = delay)

A ramp's ``start`` (and a Constant's ``value``) may be the string ``"auto"``: the trainer fills it,
typically with the deviation measured before training, via ``schedule.resolve(start=value)``.
Numbers may be given as strings such as ``"1e-3"``, which is how PyYAML reads that literal.

Example::

    eps = Join(((Constant(0.1), 100), (Cosine(0.1, 0.0, steps=900), 900)))
    eps(0), eps(550), eps(1000)   # 0.1, 0.05, 0.0
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

__all__ = [
    "AUTO",
    "Schedule",
    "Constant",
    "Linear",
    "Cosine",
    "Geometric",
    "Triangular",
    "Piecewise",
    "Join",
    "check_number",
    "check_count",
    "is_nonincreasing",
    "settles_at",
    "steps_of",
    "lr_schedule",
    "LearningRates",
]

AUTO = "auto"
Start = float | Literal["auto"]


def _name(owner: object) -> str:
    return owner if isinstance(owner, str) else type(owner).__name__


def check_number(value: Any, name: str, owner: object, auto: bool = False) -> Any:
    """``value`` as a finite float (numeric strings accepted), or ``"auto"`` where allowed."""
    if auto and value == AUTO:
        return AUTO
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    allowed = 'a finite number or "auto"' if auto else "a finite number"
    raise ValueError(f"{_name(owner)}: {name!r} must be {allowed}, got {value!r}")


def check_count(value: Any, name: str, owner: object) -> int:
    """``value`` as a non-negative integer (a step count or a step index)."""
    number = check_number(value, name, owner)
    if number < 0 or number != int(number):
        raise ValueError(f"{_name(owner)}: {name!r} must be a non-negative integer, got {value!r}")
    return int(number)


def _tuple(value: Any, name: str, owner: object) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{_name(owner)}: {name!r} must be a sequence, got {value!r}")
    return tuple(value)


class Schedule:
    """Base class of tolerance schedules: ``schedule(step) -> float``, a pure function of the step."""

    _auto_fields: ClassVar[tuple[str, ...]] = ()
    # every schedule is a frozen dataclass: said here for the type checker (dataclasses.fields and replace)
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def __call__(self, step: int) -> float:
        if self.needs_start:
            raise ValueError(f"{self!r} has start='auto': call .resolve(start=value) before evaluating it")
        return self._value(step)

    def _value(self, step: int) -> float:
        raise NotImplementedError

    @property
    def needs_start(self) -> bool:
        """Whether the schedule still has an ``"auto"`` start to be filled by :meth:`resolve`."""
        return any(getattr(self, name) == AUTO for name in self._auto_fields)

    def resolve(self, start: float) -> Schedule:
        """A copy with every ``"auto"`` start replaced by ``start``; unchanged if there is none."""
        auto = {name: start for name in self._auto_fields if getattr(self, name) == AUTO}
        return dataclasses.replace(self, **auto) if auto else self


def _set(schedule: Schedule, name: str, value: Any) -> None:
    object.__setattr__(schedule, name, value)  # normalising fields of a frozen dataclass


def _resolved(start: Start) -> float:
    """``start`` where ``Schedule.__call__`` has checked that it is no longer ``"auto"``."""
    assert isinstance(start, float), "Schedule.__call__ evaluates only resolved schedules"
    return start


@dataclass(frozen=True)
class Constant(Schedule):
    """eps(t) = value.

    Args:
        value: the tolerance, or ``"auto"``.
    """

    value: Start
    _auto_fields = ("value",)

    def __post_init__(self) -> None:
        _set(self, "value", check_number(self.value, "value", self, auto=True))

    def _value(self, step: int) -> float:
        return _resolved(self.value)


@dataclass(frozen=True)
class _Ramp(Schedule):
    """Shared fields of the ramps: eps(t) = start for w(t) = 0, end for w(t) = 1."""

    start: Start
    end: float
    steps: int
    delay: int = 0
    _auto_fields = ("start",)

    def __post_init__(self) -> None:
        _set(self, "start", check_number(self.start, "start", self, auto=True))
        _set(self, "end", check_number(self.end, "end", self))
        _set(self, "steps", check_count(self.steps, "steps", self))
        _set(self, "delay", check_count(self.delay, "delay", self))

    def _value(self, step: int) -> float:
        w, start = _progress(step, self.delay, self.steps), _resolved(self.start)
        if w <= 0.0:
            return start
        if w >= 1.0:  # exact endpoint, whatever the rounding of the interpolation
            return self.end
        return self._interpolate(start, w)

    def _interpolate(self, start: float, w: float) -> float:
        raise NotImplementedError


def _progress(step: int, delay: int, steps: int) -> float:
    if steps == 0:
        return 1.0 if step >= delay else 0.0
    return min(max((step - delay) / steps, 0.0), 1.0)


@dataclass(frozen=True)
class Linear(_Ramp):
    """eps(t) = start + (end - start) w(t),   w(t) = clip((t - delay) / steps, 0, 1).

    Args:
        start: value up to ``delay`` (or ``"auto"``).
        end: value from ``delay + steps`` on.
        steps: length of the ramp.
        delay: steps held at ``start`` before the ramp.
    """

    def _interpolate(self, start: float, w: float) -> float:
        return start + (self.end - start) * w


@dataclass(frozen=True)
class Cosine(_Ramp):
    """eps(t) = start + (end - start) (1 - cos(pi w(t))) / 2,   w(t) = clip((t - delay) / steps, 0, 1).

    Flat at both ends: slow departure from ``start``, slow arrival at ``end``.

    Args:
        start: value up to ``delay`` (or ``"auto"``).
        end: value from ``delay + steps`` on.
        steps: length of the ramp.
        delay: steps held at ``start`` before the ramp.
    """

    def _interpolate(self, start: float, w: float) -> float:
        return start + (self.end - start) * (1.0 - math.cos(math.pi * w)) / 2.0


@dataclass(frozen=True)
class Geometric(_Ramp):
    """eps(t) = start (end / start)^w(t),   w(t) = clip((t - delay) / steps, 0, 1).

    Linear in log eps: the same factor per step, so a tolerance falling from 1e-1 to 1e-4 spends as
    long on each decade. Needs ``start > 0`` and ``end > 0``.

    Args:
        start: value up to ``delay`` (or ``"auto"``), > 0.
        end: value from ``delay + steps`` on, > 0.
        steps: length of the ramp.
        delay: steps held at ``start`` before the ramp.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("start", "end"):
            value = getattr(self, name)
            if value != AUTO and value <= 0:
                raise ValueError(f"Geometric: {name!r} must be > 0 (log-linear interpolation), got {value!r}")

    def _interpolate(self, start: float, w: float) -> float:
        return start * (self.end / start) ** w


@dataclass(frozen=True)
class Triangular(Schedule):
    """eps(t) = low + (peak - low) (1 - |2 w(t) - 1|),   w(t) = clip((t - delay) / steps, 0, 1).

    Rises from ``low`` to ``peak`` at ``t = delay + steps / 2`` and falls back to ``low`` at
    ``t = delay + steps``; ``low`` outside the ramp.

    Args:
        low: value before, after and at both ends of the ramp.
        peak: value at the middle of the ramp.
        steps: length of the ramp.
        delay: steps held at ``low`` before the ramp.
    """

    low: float
    peak: float
    steps: int
    delay: int = 0

    def __post_init__(self) -> None:
        _set(self, "low", check_number(self.low, "low", self))
        _set(self, "peak", check_number(self.peak, "peak", self))
        _set(self, "steps", check_count(self.steps, "steps", self))
        _set(self, "delay", check_count(self.delay, "delay", self))

    def _value(self, step: int) -> float:
        if self.steps == 0:
            return self.low
        w = 1.0 - abs(2.0 * _progress(step, self.delay, self.steps) - 1.0)
        return self.peak if w == 1.0 else self.low + (self.peak - self.low) * w


@dataclass(frozen=True)
class Piecewise(Schedule):
    """eps(t) = values[i],   i = #{b in boundaries : b <= t}.

    ``values[0]`` before ``boundaries[0]``, ``values[k]`` from ``boundaries[k - 1]`` on.

    Args:
        boundaries: strictly increasing steps at which the value changes.
        values: ``len(boundaries) + 1`` values.
    """

    boundaries: tuple[int, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        boundaries = tuple(
            check_count(b, "boundaries", self) for b in _tuple(self.boundaries, "boundaries", self)
        )
        values = tuple(check_number(v, "values", self) for v in _tuple(self.values, "values", self))
        if any(a >= b for a, b in zip(boundaries, boundaries[1:], strict=False)):
            raise ValueError(f"Piecewise: 'boundaries' must be strictly increasing, got {boundaries}")
        if len(values) != len(boundaries) + 1:
            raise ValueError(
                f"Piecewise: 'values' needs len(boundaries) + 1 = {len(boundaries) + 1} entries, "
                f"got {len(values)}"
            )
        _set(self, "boundaries", boundaries)
        _set(self, "values", values)

    def _value(self, step: int) -> float:
        return self.values[bisect.bisect_right(self.boundaries, step)]


@dataclass(frozen=True)
class Join(Schedule):
    """Schedules one after another, each on its own clock.

    eps(t) = s_i(t - T_i)  for  T_i <= t < T_i + L_i,   T_i = L_1 + ... + L_{i-1};
    the last phase keeps running past its length (a ramp then holds its end).

    Args:
        phases: ``((schedule, length), ...)``, at least one.
    """

    phases: tuple[tuple[Schedule, int], ...]

    def __post_init__(self) -> None:
        phases = []
        for phase in _tuple(self.phases, "phases", self):
            if not (isinstance(phase, (tuple, list)) and len(phase) == 2 and isinstance(phase[0], Schedule)):
                raise ValueError(f"Join: each of 'phases' must be a (schedule, length) pair, got {phase!r}")
            phases.append((phase[0], check_count(phase[1], "length", self)))
        if not phases:
            raise ValueError("Join: 'phases' must not be empty")
        _set(self, "phases", tuple(phases))

    @property
    def needs_start(self) -> bool:
        return any(schedule.needs_start for schedule, _ in self.phases)

    def resolve(self, start: float) -> Join:
        """A copy with every phase's ``"auto"`` start replaced by ``start``."""
        return Join(tuple((schedule.resolve(start), length) for schedule, length in self.phases))

    def _value(self, step: int) -> float:
        for schedule, length in self.phases[:-1]:
            if step < length:
                return schedule(step)
            step -= length
        return self.phases[-1][0](step)


def is_nonincreasing(schedule: Schedule, total_steps: int) -> bool:
    """Whether eps(t + 1) <= eps(t) for t = 0, ..., total_steps - 1 (up to float rounding).

    A homotopy should only tighten the tolerance over training.
    """
    values = np.array([schedule(t) for t in range(total_steps + 1)], dtype=np.float64)
    return bool(np.all(np.diff(values) <= 1e-12 * np.abs(values[:-1])))


def settles_at(schedule: Callable[[int], float], total_steps: int) -> int:
    """The first step from which ``schedule`` holds its value at ``total_steps`` (0 for a constant): the end
    of a homotopy: before it, validation scores are measured under a looser constraint than the final one."""
    end = schedule(total_steps)
    changed = [t for t in range(total_steps + 1) if schedule(t) != end]
    return changed[-1] + 1 if changed else 0


def steps_of(length: float, total_steps: int) -> int:
    """A length given as a fraction of the run (``0 < length < 1``) or as a number of steps (``>= 1``)."""
    length = check_number(length, "length", "schedule")
    if length < 0:
        raise ValueError(f"a length must be >= 0, got {length}")
    return round(length * total_steps) if length < 1 else int(length)


def lr_schedule(
    kind: str,
    total_steps: int,
    warmup: float = 0.0,
    min_factor: float = 0.0,
    decay_every: float | None = None,
    decay_factor: float = 0.1,
) -> Schedule | None:
    """The factor on a base learning rate at each step (``None`` for ``"constant"`` without warm-up).

    * warm-up: ``(t + 1) / W`` for the first ``W`` steps (``warmup`` as steps or a fraction of the run);
    * ``"cosine"``: then ``min_factor + (1 - min_factor) (1 + cos(pi s / S)) / 2`` over the remaining ``S``
      steps (SGDR without restarts);
    * ``"step"``: then ``decay_factor ** floor(s / decay_every)`` (``decay_every`` null: a third of the run).
    """
    w = steps_of(warmup, total_steps)
    rest = max(total_steps - w, 1)
    if kind == "constant":
        main: Schedule = Constant(1.0)
    elif kind == "cosine":
        main = Cosine(1.0, min_factor, steps=rest)
    elif kind == "step":
        every = max(steps_of(decay_every, total_steps), 1) if decay_every is not None else max(rest // 3, 1)
        boundaries = tuple(range(every, rest, every))
        main = Piecewise(boundaries, tuple(decay_factor**i for i in range(len(boundaries) + 1)))
    else:
        raise ValueError(f"unknown learning-rate schedule {kind!r}; choose constant, cosine or step")
    if w == 0:
        return None if kind == "constant" else main
    return Join(((Linear(1.0 / w, 1.0, steps=w - 1 if w > 1 else 0), w), (main, rest)))


class LearningRates:
    """Sets the learning rate of parameter groups to ``base * schedule(step) * factor``.

    Args:
        schedule: the factor at each step (:func:`lr_schedule`); ``None`` leaves the rates alone.
        optimizers: their groups are scaled, except those holding a parameter in ``skip``; ``base`` is a
            group's learning rate at construction (groups are kept by index: ``Optimizer.load_state_dict``
            replaces the group dicts).
        skip: parameters whose groups keep their rate.

    ``factor`` (1 at first) lowers the rates on top of the schedule: a loop's rollbacks set it.
    """

    def __init__(
        self, schedule: Callable[[int], float] | None, optimizers: list, skip: Iterable[Any] = ()
    ) -> None:
        skipped = {id(p) for p in skip}
        self.schedule = schedule
        self.groups = [
            (o, i, group["lr"])
            for o in optimizers
            for i, group in enumerate(o.param_groups)
            if not any(id(p) in skipped for p in group["params"])
        ]
        self.factor = 1.0

    def rate(self, base: float, step: int, scheduled: bool = True) -> float:
        """``base * schedule(step) * factor`` (without the schedule when it is None or not ``scheduled``):
        the rate of a parameter no optimiser holds, such as the gates that :class:`ace.PrimalDual` steps."""
        return base * (self.schedule(step) if scheduled and self.schedule is not None else 1.0) * self.factor

    def apply(self, step: int) -> None:
        if self.schedule is not None:
            scale = self.schedule(step) * self.factor
            for o, i, base in self.groups:
                o.param_groups[i]["lr"] = base * scale
