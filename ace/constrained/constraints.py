"""Equivariance constraints: on the gates of a relaxed model, or on a model's measured deviation.

Both kinds share the same options:

* ``tolerance`` eps(t): a number or a schedule (any callable of the step, see :mod:`ace.schedules`);
* ``equality``: ``g = eps`` instead of ``g <= eps`` (multipliers of either sign);
* ``resilient``: a learned slack ``u >= 0`` with cost ``rho/2 * u**2`` enlarges the tolerance,
  ``g <= eps + u`` (ACE's Algorithm 2). At the optimum ``u = lambda / rho``;
* ``penalty``: a fixed multiplier ``w`` and no dual step: the loss gets ``w * relu(g - eps)``
  (``w * |g - eps|`` for an equality), the classic fixed-weight regulariser.

The constraint objects are plain settings; :class:`ace.PrimalDual` measures them, and its multipliers
(:class:`ace.constrained.multipliers.Multipliers`) hold the cooper constraints made from them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ace.symmetry.action import Symmetry
from ace.symmetry.deviation import equivariance_deviation

__all__ = [
    "Constraint",
    "GateConstraint",
    "DeviationConstraint",
    "Tolerance",
    "check_setup",
    "check_tolerance",
]

Tolerance = float | Callable[[int], float]


@dataclass
class Constraint:
    """Options shared by every constraint (see the module docstring)."""

    tolerance: Tolerance = 0.0
    equality: bool = False
    resilient: bool = False
    rho: float = 1.0
    penalty: float | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError(f"{type(self).__name__} needs a non-empty name")
        if self.resilient and self.equality:
            raise ValueError(
                f"constraint '{self.name}': resilient relaxes the constraint to g <= eps + u; "
                "it cannot be an equality (set equality=False)"
            )
        if self.resilient and not (self.rho > 0 and math.isfinite(self.rho)):
            raise ValueError(f"constraint '{self.name}': rho must be a positive number, got {self.rho!r}")
        if self.penalty is not None and not self.penalty >= 0:
            raise ValueError(f"constraint '{self.name}': penalty must be >= 0, got {self.penalty!r}")
        if self.penalty is not None and self.resilient:
            raise ValueError(f"constraint '{self.name}': a fixed penalty has no slack; drop resilient")
        if not callable(self.tolerance):
            self.tolerance = float(self.tolerance)
            if not self.tolerance >= 0:
                raise ValueError(f"constraint '{self.name}': tolerance must be >= 0, got {self.tolerance!r}")
        elif not getattr(self.tolerance, "needs_start", False):  # an auto start is checked once it is known
            check_tolerance(self.tolerance, f"constraint '{self.name}'")

    def tolerance_at(self, step: int) -> float:
        """eps(step)."""
        return self.tolerance(step) if callable(self.tolerance) else self.tolerance

    @property
    def dual(self) -> bool:
        """Whether the constraint has multipliers updated by dual ascent."""
        return self.penalty is None

    def violation(self, value: torch.Tensor, tolerance: float, slack: torch.Tensor | None) -> torch.Tensor:
        """g - eps (- u when resilient)."""
        violation = value - tolerance if tolerance else value  # eps = 0: no operator
        return violation - slack if slack is not None else violation

    def penalty_term(self, violation: torch.Tensor) -> torch.Tensor:
        """w * relu(g - eps) summed (w * |g - eps| for an equality)."""
        assert self.penalty is not None, "penalty_term is the loss term of a constraint with a fixed penalty"
        excess = violation.abs() if self.equality else torch.relu(violation)
        return self.penalty * excess.sum()


@dataclass
class GateConstraint(Constraint):
    r"""One constraint per gate of a relaxed model: ``|gamma_i| <= eps(t)`` or ``gamma_i = eps``.

    With ``tolerance=0, equality=True`` this is ACE's Algorithm 1 (``gamma_i = 0``, one multiplier per
    gate); with ``resilient=True`` it is Algorithm 2 (``|gamma_i| <= u_i``, cost ``rho/2 u_i^2``).
    For an equality the constrained value is the signed gate ``gamma_i``; otherwise ``|gamma_i|``.
    """

    name: str = "gate"

    def value(self, gates: torch.Tensor) -> torch.Tensor:
        """The constrained quantity for a vector of gates, shape (num_gates,)."""
        return gates if self.equality else gates.abs()


@dataclass
class DeviationConstraint(Constraint):
    r"""``D(f) <= eps(t)`` on the measured equivariance deviation of the whole model.

    $$
    D(f) = \mathbb{E}_x \mathbb{E}_g \| f(g \cdot x) - \rho_{out}(g) f(x) \|^2
    $$

    estimated on each batch with ``samples`` group elements (``relative=True`` divides by
    $\mathbb{E}\|f(x)\|^2$). Works for any model, gated or not. Since ``D >= 0``,
    ``tolerance=0`` as an inequality is ACE's "hold at zero and let the duals work".
    """

    samples: int = 1
    relative: bool = False
    name: str = "deviation"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.samples, int) and self.samples >= 1):
            raise ValueError(
                f"constraint '{self.name}': samples must be an integer >= 1, got {self.samples!r}"
            )

    def measure(
        self,
        model: torch.nn.Module,
        inputs: Any,
        symmetry: Symmetry | None,
        generator: torch.Generator,
        output: Any = None,
    ) -> torch.Tensor:
        """D(f) on a batch, shape (1,); ``output`` (the model's on ``inputs``) saves a forward pass."""
        if inputs is None:
            raise ValueError(f"deviation constraint '{self.name}' needs the batch: step(loss, inputs=...)")
        if symmetry is None:
            raise ValueError(f"deviation constraint '{self.name}' needs a symmetry (ace.Symmetry)")
        deviation = equivariance_deviation(
            model,
            inputs,
            symmetry,
            samples=self.samples,
            relative=self.relative,
            generator=generator,
            output=output,
        )
        return deviation.reshape(1)


def check_tolerance(schedule: Callable[[int], float], what: str) -> None:
    """``ValueError`` if the tolerance ``schedule`` goes below 0 at a step in 0 .. 1000 or at 10**9 (after any
    explicit step count a schedule's end)."""
    low = min(schedule(t) for t in (*range(1001), 10**9))
    if not low >= 0:
        raise ValueError(f"{what}: a tolerance must be >= 0, but this schedule goes down to {low:g}")


def check_limits(**limits: float | None) -> None:
    """``ValueError`` for a limit of the step that is not a positive number: ``gate_lr`` must be one;
    ``max_multiplier`` and ``gate_max_step`` may also be None."""
    for name, value in limits.items():
        if value is None and name != "gate_lr":
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (value > 0 and math.isfinite(value))
        ):
            raise ValueError(
                f"{name} must be a positive number{' or None' if name != 'gate_lr' else ''}, got {value!r}"
            )


def check_setup(
    constraints: list[Constraint],
    gates: Mapping[str, torch.Tensor],
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    symmetry: Symmetry | None,
    gate_schedule: Callable[[int], float] | None,
    step_gates: bool = True,
) -> None:
    """Clear errors for constraints that cannot work with this model, symmetry and optimisers."""
    names = [c.name for c in constraints]
    if len(set(names)) != len(names):
        raise ValueError(f"constraint names must be unique, got {names}")
    if any(isinstance(c, GateConstraint) for c in constraints) and not gates:
        raise ValueError(
            "GateConstraint needs a relaxed model with gates: call ace.relax(model, where=...) first, "
            "or use a DeviationConstraint"
        )
    if any(isinstance(c, DeviationConstraint) for c in constraints) and symmetry is None:
        raise ValueError("DeviationConstraint needs symmetry=ace.Symmetry(...) to measure the deviation")
    if gate_schedule is not None and not gates:
        raise ValueError("gate_schedule needs a relaxed model with gates (ace.relax)")
    if gate_schedule is not None and any(isinstance(c, GateConstraint) for c in constraints):
        raise ValueError("gate_schedule fixes the gates; it cannot be combined with a GateConstraint")
    in_optimizer = {id(p) for o in optimizers for group in o.param_groups for p in group["params"]}
    gate_ids = {id(g) for g in gates.values()} if step_gates else set()
    trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
    if trainable and not any(id(p) in in_optimizer for p in trainable):
        raise ValueError(
            "the optimizer holds none of the model's parameters, so training would move no weight: "
            "build it from model.parameters() of this model"
        )
    missing = [n for n, g in gates.items() if id(g) not in in_optimizer]
    if missing and gate_schedule is None and not step_gates:
        raise ValueError(
            f"step_gates=False leaves the gates to the optimizer, which does not hold {missing}: build it "
            "from model.parameters() after ace.relax(model, ...)"
        )
