"""The primal Lagrangian of the constrained step and a surrogate whose gradient is the Lagrangian's.

The formulas are cooper's (``CMPState.compute_primal_lagrangian``, equal on the tested cases) without its
per-step objects and einsums; they read the multipliers and penalty coefficients of cooper constraints.
"""

from __future__ import annotations

import cooper
import torch

__all__ = ["primal_lagrangian", "multiplier_weights", "lagrangian_surrogate", "multiplier_of"]


def multiplier_of(c: cooper.Constraint) -> torch.Tensor:
    """The multiplier tensor of a cooper constraint that has one (ace builds every one with a
    ``DenseMultiplier``, whose ``weight`` is a Parameter; cooper's types allow a missing one and a Module)."""
    assert c.multiplier is not None, "ace gives every cooper constraint a multiplier"
    weight = c.multiplier.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def primal_lagrangian(
    objective: torch.Tensor,
    violations: dict[str, torch.Tensor],
    multipliers: dict[str, torch.Tensor],
    constraints: dict[str, cooper.Constraint],
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The primal Lagrangian ``objective + s sum_i lambda_i^T v_i`` (``s`` the loss scale, 1 when ``None``),
    with the augmented terms where the constraint has a penalty coefficient c:

    $$
    \lambda^\top h + \tfrac{1}{2} c^\top h^2 \;\text{(equality)}, \qquad
    \tfrac{1}{2} (1/c)^\top \left(\mathrm{relu}(\lambda + c\, g)^2 - \lambda^2\right)
    \;\text{(inequality; Nocedal \& Wright 17.64-65)}.
    $$

    cooper's formulas (``CMPState.compute_primal_lagrangian``, equal on the tested cases) without
    its per-step objects and einsums (their cost: docs/performance.md).
    """
    lagrangian = objective
    for name, violation in violations.items():
        c, multiplier = constraints[name], multipliers[name]
        if c.penalty_coefficient is None:
            term = torch.dot(multiplier, violation)
        elif c.constraint_type == cooper.ConstraintType.EQUALITY:
            rho = c.penalty_coefficient.value
            term = torch.dot(multiplier, violation) + 0.5 * torch.dot(rho, violation**2)
        else:
            rho = c.penalty_coefficient.value
            shifted = torch.relu(multiplier + rho * violation) ** 2
            term = 0.5 * torch.dot(1 / rho, shifted - multiplier**2)
        lagrangian = lagrangian + (term if scale is None else scale * term)
    return lagrangian


def multiplier_weights(
    violations: dict[str, torch.Tensor], constraints: dict[str, cooper.Constraint]
) -> dict[str, torch.Tensor]:
    r"""``w_i``, the derivative of :func:`primal_lagrangian` with respect to ``v_i`` (detached), so that
    backpropagating ``objective + sum_i w_i^T v_i`` gives the primal Lagrangian's gradient with one dot per
    constraint, where autograd through the terms takes five to nine operators and as many backward nodes:

    $$
    w = \lambda, \qquad \lambda + c \odot h \;\text{(augmented equality)}, \qquad
    \tfrac{1}{2} (1/c) \odot 2\,\mathrm{relu}(\lambda + c\, g) \odot c
    \;\text{(augmented inequality)}.
    $$

    The last is the chain rule factor by factor, in the order autograd multiplies them: the gradients are bit
    for bit those of backpropagating the terms (tested), so runs are unchanged.
    """
    weights = {}
    with torch.no_grad():
        for name, violation in violations.items():
            c = constraints[name]
            multiplier = multiplier_of(c)
            if c.penalty_coefficient is None:
                weights[name] = multiplier.detach()
            elif c.constraint_type == cooper.ConstraintType.EQUALITY:
                weights[name] = multiplier + c.penalty_coefficient.value * violation
            else:
                rho = c.penalty_coefficient.value
                shifted = torch.relu(multiplier + rho * violation)
                weights[name] = ((0.5 * (1 / rho)) * (2 * shifted)) * rho
    return weights


def lagrangian_surrogate(
    objective: torch.Tensor,
    violations: dict[str, torch.Tensor],
    constraints: dict[str, cooper.Constraint],
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``objective + s sum_i w_i^T v_i`` (:func:`multiplier_weights`; ``s`` the loss scale, 1 when ``None``),
    whose gradient is the primal Lagrangian's."""
    surrogate = objective
    for name, w in multiplier_weights(violations, constraints).items():
        surrogate = surrogate + torch.dot(w if scale is None else w * scale, violations[name])
    return surrogate
