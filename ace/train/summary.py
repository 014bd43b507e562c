"""The schema of a run's summary (``summary.json``) and its balance table.

``summary.json`` holds: ``steps``, ``epochs``, ``wall_time``; ``final`` (the last training record, which like
every record holds what its step saw before its update); ``constraints`` (one row per constraint entry:
tolerance, gate or deviation, violation, multiplier, slack) and ``layers`` (one row per gated layer: gate,
multiplier, slack, and the measured deviation of that layer's branch alone), both describing the model as it
ends, after the last update; ``gates``; ``tolerance_starts``; ``best`` (per validation metric, its best value
and step); ``val`` and ``test`` (the final evaluations); ``selected`` (per variant, the best validation step
and the metrics there, see :mod:`ace.train.selection`).
"""

from __future__ import annotations

import math
from typing import Any

import cooper
import torch

from ace.constrained.constraints import GateConstraint
from ace.constrained.primal_dual import PrimalDual
from ace.constrained.step_result import StepResult
from ace.runs.metrics import format_table

__all__ = ["summary", "format_balance"]


def summary(core: PrimalDual, last_train: dict[str, Any], last_eval: dict[str, Any], **fields: Any) -> dict:
    """The summary of a run whose constrained state is ``core``, whose last training record is ``last_train``
    and whose last validation record is ``last_eval``; ``fields`` are the run's other entries (steps, best,
    test, ...).

    A deviation constraint's final value is the deviation of the final validation pass (the last training
    batch's estimate when there was none).
    """
    deviations = {}
    for c in core.constraints:
        key = "val/relative_deviation" if getattr(c, "relative", False) else "val/deviation"
        deviations[c.name] = last_eval.get(key, last_train.get(f"constraint/{c.name}/deviation"))
    now = _final_state(core, deviations)
    table = now.table()
    layers = {}
    for name, gate in now.gates.items():
        row = {"gate": gate.item()}
        for c in core.constraints:
            if isinstance(c, GateConstraint):
                row.update(
                    {k: v for k, v in table[f"{c.name}.{name}"].items() if k in ("multiplier", "slack")}
                )
        for key in ("deviation", "relative_deviation"):
            if f"val/{key}/{name}" in last_eval:
                row[key] = last_eval[f"val/{key}/{name}"]
        layers[name] = row
    return {
        "steps": fields.pop("steps"),
        "epochs": fields.pop("epochs"),
        "wall_time": round(fields.pop("wall_time"), 3),
        "final": last_train,
        "constraints": table,
        "layers": layers,
        "gates": {name: row["gate"] for name, row in layers.items()},
        "tolerance_starts": core.tolerance_starts,
        # the unit of the multipliers and of rho (ace.constrained.scale): a multiplier times it is a price in
        # loss units
        "loss_scale": core.scale.value(),
        "best": fields.pop("best"),
        "val": last_eval,
        **fields,
    }


def format_balance(summary: dict[str, Any]) -> str:
    """The final gates, multipliers and slacks as a table, with each gated layer's measured deviation
    (relative, that layer's branch alone, on the final validation pass)."""
    layers = summary.get("layers", {})
    rows = []
    for entry, row in summary["constraints"].items():
        value = row.get("gate", row.get("deviation"))
        layer = layers.get(entry.split(".", 1)[-1], {}) if "gate" in row else {}
        rows.append(
            [
                entry,
                row.get("tolerance"),
                value,
                row.get("multiplier"),
                row.get("slack"),
                layer.get("relative_deviation"),
            ]
        )
    shown = {r[0].split(".", 1)[-1] for r in rows}
    for name, row in layers.items():
        if name not in shown:
            rows.append([f"gate {name}", None, row["gate"], None, None, row.get("relative_deviation")])
    if not rows:
        return f"trained {summary['steps']} steps (no constraints, no gates)"
    header = ["constraint", "tolerance", "gate / deviation", "multiplier", "slack", "layer rel. deviation"]
    return f"final balance after {summary['steps']} steps\n" + format_table(header, rows)


def _multipliers(c: cooper.Constraint) -> torch.Tensor:
    """The multipliers of a constraint the core built (each has them), detached."""
    assert c.multiplier is not None, "the core gives every constraint a multiplier"
    weight = c.multiplier.weight  # a Parameter, which cooper's types leave as Tensor | Module
    assert isinstance(weight, torch.Tensor)
    return weight.detach()


def _final_state(core: PrimalDual, deviations: dict[str, float | None]) -> StepResult:
    """The state after the last update, in the shape of a step result (no loss): gate constraints read the
    gates; a deviation constraint reads ``deviations[name]`` (NaN if missing)."""
    seen = core.snapshot([_multipliers(c) for c in core.cooper_constraints.values()])
    tolerances = core.tolerances()
    values, violations = {}, {}
    for c in core.constraints:
        if isinstance(c, GateConstraint):
            value = c.value(torch.stack(list(seen["gates"].values())))
        else:
            measured = deviations.get(c.name)
            value = torch.tensor([math.nan if measured is None else measured])
        values[c.name] = value
        violations[c.name] = c.violation(value, tolerances[c.name], seen["slacks"].get(c.name))
    return StepResult(
        step=core.step_count,
        loss=torch.tensor(math.nan),
        tolerances=tolerances,
        values=values,
        violations=violations,
        table=lambda: core.table(tolerances, values, violations, seen),
        **seen,
    )
