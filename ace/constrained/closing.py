"""Gates closed for good: once an equality ``gamma_i = 0`` holds to a threshold, stop computing the branch.

ACE closes its gates early (N-body: below 1e-3 within ~150 of 3,000 steps), after which a relaxed step still
pays for every branch. :class:`ClosedGates` sets such a gate to 0, stops learning it and disables its branch:
the model is then f_eq up to that layer and a step costs what the remaining branches cost.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ace.constrained.constraints import Constraint, GateConstraint
from ace.nn.relaxed import GatedLayer

__all__ = ["ClosedGates"]


class ClosedGates:
    """The gates of ``model`` closed below ``threshold`` (``None``: never), by name; ``stepped``: the core
    steps the gates (a gate an optimiser holds is not the core's to close).

    Only gates held by an equality :class:`ace.GateConstraint` with multipliers are closed, and only at a step
    whose tolerance is 0.
    """

    def __init__(
        self, model: nn.Module, threshold: float | None, constraints: list[Constraint], stepped: bool = True
    ) -> None:
        self.model, self.threshold = model, threshold
        self.equalities = [c for c in constraints if isinstance(c, GateConstraint) and c.equality and c.dual]
        self.names: set[str] = set()
        if threshold is not None and not (threshold > 0 and self.equalities and stepped):
            raise ValueError(
                "close_gates_below needs a positive threshold, an equality GateConstraint with multipliers "
                f"and the core stepping the gates (step_gates=True), got {threshold!r}"
            )

    def update(
        self,
        gates: Iterable[str],
        values: dict[str, list[float]],
        tolerances: dict[str, float],
        step: int,
        events: list[dict[str, Any]],
    ) -> None:
        """Close the gates whose value at ``step`` (``values[constraint name]``, in the order of ``gates``) is
        below the threshold, with an event record each."""
        if self.threshold is None:
            return
        names = list(gates)
        for c in self.equalities:
            if tolerances[c.name] != 0:
                continue
            for name, value in zip(names, values[c.name], strict=True):
                if name not in self.names and abs(value) < self.threshold:
                    self.close(name)
                    events.append({"step": step, "event": "gate_closed", "gate": name})

    def close(self, name: str) -> None:
        """Set gate ``name`` to 0 for good: no longer learned, its branch no longer computed."""
        layer = self.model.get_submodule(name)
        assert isinstance(layer, GatedLayer), "a gate is named by its GatedLayer (ace.gates)"
        with torch.no_grad():
            layer.gate.zero_()
        layer.gate.requires_grad_(False)
        layer.branch_enabled = False
        self.names.add(name)
