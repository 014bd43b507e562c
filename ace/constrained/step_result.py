"""The result of one constrained step, which doubles as its log record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ace.constrained.constraints import Constraint, GateConstraint

__all__ = ["StepResult", "constraint_table", "entries"]


@dataclass
class StepResult:
    """What one step saw, before its update: the log record of the step.

    Attributes:
        step: the number of steps taken, this one included (the step counts from 1).
        loss: the task loss (averaged over ranks), detached.
        lagrangian: the primal Lagrangian (``None`` when the step was not applied), computed on each read
            (``lagrangian_of``): a step that writes no record does not pay for it.
        tolerances: eps(t) by constraint name.
        values, violations: the constrained quantity (gate or deviation) and ``g - eps (- u)`` by constraint
            name, one entry per gate for gate constraints (averaged over ranks).
        gates, slacks, multipliers: their values before the update (for a penalty constraint, its weight).
        problem: the first non-finite quantity (``"loss"``, ``"gradient"``, ``"multiplier"``, ...) when the
            update was dropped (the multipliers are then restored; a NaN multiplier is found after the primal
            step, which stays applied), else ``None``.
        events: records of things worth a line in the log (a multiplier reaching its ceiling).
        table: per constraint entry ``{tolerance, gate | deviation, violation, multiplier, slack}``.
    """

    step: int
    loss: torch.Tensor
    tolerances: dict[str, float]
    values: dict[str, torch.Tensor]
    violations: dict[str, torch.Tensor]
    gates: dict[str, torch.Tensor]
    slacks: dict[str, torch.Tensor]
    multipliers: dict[str, torch.Tensor]
    table: Callable[[], dict[str, dict[str, float]]] = field(repr=False)
    problem: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    lagrangian_of: Callable[[], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def lagrangian(self) -> torch.Tensor | None:
        """The primal Lagrangian, computed from the step's saved tensors on each read."""
        return None if self.lagrangian_of is None else self.lagrangian_of()

    def log(self, **extra: Any) -> dict[str, Any]:
        """The flat log record: ``step``, ``extra`` (e.g. ``epoch``), ``loss``, ``lagrangian``,
        ``gate/<layer>`` and ``constraint/<entry>/<key>`` (host syncs happen here, not in the step)."""
        record: dict[str, Any] = {"step": self.step, **extra, "loss": self.loss.item()}
        lagrangian = self.lagrangian  # computed on each read
        if lagrangian is not None:
            record["lagrangian"] = lagrangian.item()
        for name, g in self.gates.items():
            record[f"gate/{name}"] = g.item()
        for entry, row in self.table().items():
            for key, value in row.items():
                record[f"constraint/{entry}/{key}"] = value
        return record


def entries(c: Constraint, gate_names: list[str]) -> list[str]:
    """Log names of a constraint's entries: one per gate for gate constraints."""
    return [f"{c.name}.{g}" for g in gate_names] if isinstance(c, GateConstraint) else [c.name]


def constraint_table(
    constraints: list[Constraint],
    gate_names: list[str],
    tolerances: dict[str, float],
    values: dict[str, torch.Tensor],
    violations: dict[str, torch.Tensor],
    seen: dict[str, Any],
) -> dict[str, dict[str, float]]:
    """Per constraint entry (:func:`entries`): tolerance, deviation or gate, violation, multiplier, slack;
    ``seen`` holds the gates, slacks and multipliers."""
    gate_values = torch.stack(list(seen["gates"].values())).tolist() if seen["gates"] else []
    table = {}
    for c in constraints:
        vals = values[c.name].tolist()
        viols = violations[c.name].tolist()
        mults = seen["multipliers"][c.name].tolist()
        slack = seen["slacks"][c.name].tolist() if c.name in seen["slacks"] else None
        for i, entry in enumerate(entries(c, gate_names)):
            row = {"tolerance": float(tolerances[c.name])}
            if isinstance(c, GateConstraint):
                row["gate"] = gate_values[i]
            else:
                row["deviation"] = vals[i]
            row["violation"] = viols[i]
            row["multiplier"] = mults[i]
            if slack is not None:
                row["slack"] = slack[i]
            table[entry] = row
    return table
