"""Schedules from and to their config specs (YAML dicts such as ``{type: cosine, start: auto, end: 0}``).

A config names a schedule by its ``type`` and fields (see :func:`schedule_from_config`); a length may be a
share of the run (``fraction``), resolved against the run's length here, so :mod:`ace.schedules` stays pure
functions of the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ace.constrained.schedules import (
    Constant,
    Cosine,
    Geometric,
    Join,
    Linear,
    Piecewise,
    Schedule,
    Triangular,
    check_count,
    check_number,
)

__all__ = ["schedule_from_config", "to_config"]

_TYPES: dict[str, type[Schedule]] = {
    "constant": Constant,
    "linear": Linear,
    "cosine": Cosine,
    "geometric": Geometric,
    "piecewise": Piecewise,
    "triangular": Triangular,
    "join": Join,
}
_NAMES = {cls: name for name, cls in _TYPES.items()}


def schedule_from_config(spec: Any, total_steps: int | None = None) -> Schedule:
    """Build a schedule from its config spec.

    Args:
        spec: a number (or numeric string, or ``"auto"``) for a :class:`Constant`; a dict
            ``{"type": name, **fields}`` with ``name`` in constant, linear, cosine, geometric,
            piecewise, triangular, join; or a :class:`Schedule`, returned as is. A missing or null
            ``steps`` means ``total_steps``; ``fraction: f`` (0 < f <= 1) instead of ``steps`` means
            ``round(f * total_steps)``, so a homotopy's length is set as a share of the run. A join
            lists ``phases: [{type: ..., length: N}, ...]``; inside a phase a missing ``steps`` means
            the phase's length, and the last phase's missing ``length`` the steps left of ``total_steps``.
        total_steps: the length of training, used where ``steps`` is not given.

    Raises:
        ValueError: naming an unknown type, an unknown or missing field, or an invalid value.
    """
    if isinstance(spec, Schedule):
        return spec
    if not isinstance(spec, dict):
        return Constant(spec)
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind is None:
        raise ValueError(f"schedule spec {spec} needs a 'type', one of {sorted(_TYPES)}")
    cls = _TYPES.get(str(kind).lower())
    if cls is None:
        raise ValueError(f"unknown schedule type {kind!r}; choose one of {sorted(_TYPES)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "fraction" in spec:
        fraction = check_number(spec.pop("fraction"), "fraction", f"{kind} schedule")
        if "steps" not in fields or spec.get("steps") is not None:
            raise ValueError(f"{kind} schedule: give 'steps' or 'fraction', not both (and only to a ramp)")
        if not 0 < fraction <= 1 or total_steps is None:
            raise ValueError(
                f"{kind} schedule: 'fraction' must be in (0, 1] of a known run length, got {fraction}"
            )
        spec["steps"] = max(1, round(fraction * total_steps))
    unknown = sorted(set(spec) - set(fields))
    if unknown:
        raise ValueError(f"{kind} schedule: unknown field(s) {unknown}; its fields are {sorted(fields)}")
    if "steps" in fields and spec.get("steps") is None:
        if total_steps is None:
            raise ValueError(f"{kind} schedule: 'steps' is not given and total_steps is unknown")
        spec["steps"] = total_steps
    if cls is Join:
        spec["phases"] = _phases_from_config(spec.get("phases"), total_steps)
    missing = [n for n, f in fields.items() if n not in spec and f.default is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{kind} schedule: missing field(s) {missing}")
    return cls(**spec)


def _phases_from_config(phases: Any, total_steps: int | None) -> tuple[tuple[Schedule, int], ...]:
    if not isinstance(phases, (list, tuple)) or not phases:
        raise ValueError("join schedule: 'phases' must be a non-empty list of schedule specs with 'length'")
    result, used = [], 0
    for i, phase in enumerate(phases):
        if not isinstance(phase, dict):
            raise ValueError(
                f"join schedule: phase {i} must be a dict with 'type' and 'length', got {phase!r}"
            )
        phase = dict(phase)
        length = phase.pop("length", None)
        if length is None:
            if i < len(phases) - 1 or total_steps is None:
                raise ValueError(f"join schedule: phase {i} needs a 'length'")
            length = total_steps - used
        length = check_count(length, f"phases[{i}].length", "join schedule")
        used += length
        result.append((schedule_from_config(phase, length), length))
    return tuple(result)


def to_config(schedule: Schedule) -> dict[str, Any]:
    """The config spec of ``schedule``: ``schedule_from_config(to_config(s)) == s``."""
    if type(schedule) not in _NAMES:
        raise ValueError(f"to_config: {type(schedule).__name__} is not a built-in schedule")
    if isinstance(schedule, Join):
        phases = [{**to_config(s), "length": length} for s, length in schedule.phases]
        return {"type": "join", "phases": phases}
    spec: dict[str, Any] = {"type": _NAMES[type(schedule)]}
    for f in dataclasses.fields(schedule):
        value = getattr(schedule, f.name)
        spec[f.name] = list(value) if isinstance(value, tuple) else value
    return spec
