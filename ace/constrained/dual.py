"""The dual side: how multipliers are updated (:class:`DualSettings`) and the cooper objects holding them."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import cooper
import torch
from cooper.formulations import AugmentedLagrangian, Lagrangian
from cooper.multipliers import DenseMultiplier
from cooper.optim import nuPI, nuPIInitType
from cooper.penalty_coefficients import DensePenaltyCoefficient

from ace.constrained.constraints import Constraint
from ace.constrained.scale import check_scale

__all__ = [
    "DualSettings",
    "make_problem",
    "make_optimizer",
    "primal_lagrangian",
    "multiplier_weights",
    "lagrangian_surrogate",
    "dual_step",
    "clamp_multipliers",
]


@dataclass(frozen=True)
class DualSettings:
    """How the multipliers are updated. The defaults close the gates of any relaxed model at any loss scale:
    with the loss measured in units of its initial scale (``scale="initial"``, :mod:`ace.constrained.scale`)
    every gain is
    dimensionless, and the gate-multiplier pair of an equality ``gamma_i = 0``,

    .. math::
        \\gamma_i \\leftarrow \\gamma_i
            - \\eta_\\gamma \\big(\\partial_{\\gamma_i} \\ell / s + \\lambda_i + c\\,\\gamma_i\\big),
        \\qquad \\lambda_i \\leftarrow \\lambda_i + \\eta_\\lambda\\, \\gamma_i,

    is a PI controller, critically damped at ``eta_lambda = eta_gamma c^2 / 4`` (``eta_gamma`` = 0.05, the
    gates' rate of :class:`ace.PrimalDual`; c = 4, eta_lambda = 0.2: a time constant ``2 / (eta_gamma c)`` of
    10 steps).

    Attributes:
        formulation: ``"augmented"`` (adds ``c/2 * relu(g)^2``, and ``c/2 g^2`` for equalities, to the primal
            Lagrangian: the damping of the gate-multiplier pair) or ``"lagrangian"``.
        optimizer: ``"sgd"`` (plain ascent, no momentum), ``"nupi"`` (PI control, Kp/Ki) or ``"adam"``.
        lr: dual step size eta_lambda.
        update: ``"alternating"`` (dual step first, then the primal step with the updated multipliers; no
            extra forward) or ``"simultaneous"`` (primal and dual steps from one evaluation).
        penalty_coefficient: c of the augmented Lagrangian.
        kp, ki: nuPI gains.
        init: initial multiplier value.
        scale: the unit of the multipliers: ``"initial"`` (the mean loss of the first 20 steps,
            :mod:`ace.constrained.scale`: multipliers are prices relative to the untrained model's loss and
            ``rho`` is
            relative to it), ``"none"`` (units of the loss, the behaviour before ace 0.2: every gain then
            depends on the loss's scale) or a fixed positive number.
    """

    formulation: str = "augmented"
    optimizer: str = "sgd"
    lr: float = 0.2
    update: str = "alternating"
    penalty_coefficient: float = 4.0
    kp: float = 0.0
    ki: float = 1.0
    init: float = 0.0
    scale: str | float = "initial"

    def __post_init__(self) -> None:
        choices = {
            "formulation": ("lagrangian", "augmented"),
            "optimizer": ("sgd", "nupi", "adam"),
            "update": ("simultaneous", "alternating"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"dual.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if not self.lr > 0:
            raise ValueError(f"dual.lr must be > 0, got {self.lr!r}")
        if not self.penalty_coefficient > 0:
            raise ValueError(f"dual.penalty_coefficient must be > 0, got {self.penalty_coefficient!r}")
        for key in ("lr", "penalty_coefficient", "kp", "ki", "init"):
            if not math.isfinite(getattr(self, key)):
                raise ValueError(f"dual.{key} must be a finite number, got {getattr(self, key)!r}")
        check_scale(self.scale)


class _Problem(cooper.ConstrainedMinimizationProblem):
    """The cooper problem; :class:`ace.PrimalDual` computes its state, this class holds the constraints."""

    def compute_cmp_state(self, *args: Any, **kwargs: Any) -> cooper.CMPState:  # pragma: no cover
        # never called (PrimalDual computes the state itself): its mutants cannot be observed
        raise NotImplementedError("ace.PrimalDual evaluates the problem itself")  # pragma: no mutate


def make_problem(
    constraints: list[Constraint],
    sizes: dict[str, int],
    dual: DualSettings,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> tuple[_Problem, dict[str, cooper.Constraint]]:
    """The cooper problem and, by name, a cooper constraint with ``sizes[name]`` multipliers (of ``dtype``,
    the model's) for every constraint that has multipliers (fixed-penalty constraints have none)."""
    cmp = _Problem()
    made = {}
    augmented = dual.formulation == "augmented"
    for c in constraints:
        if not c.dual:
            continue
        n = sizes[c.name]
        kind = cooper.ConstraintType.EQUALITY if c.equality else cooper.ConstraintType.INEQUALITY
        made[c.name] = cooper.Constraint(
            constraint_type=kind,
            formulation_type=AugmentedLagrangian if augmented else Lagrangian,
            multiplier=DenseMultiplier(init=torch.full((n,), float(dual.init), device=device), dtype=dtype),
            penalty_coefficient=(
                DensePenaltyCoefficient(
                    torch.full((n,), dual.penalty_coefficient, device=device, dtype=dtype)
                )
                if augmented
                else None
            ),
        )
        setattr(cmp, c.name, made[c.name])
    return cmp, made


def make_optimizer(cmp: _Problem, primal: list[torch.optim.Optimizer], dual: DualSettings) -> Any:
    """cooper's constrained optimiser: the primal optimisers and the dual one (ascent on the multipliers)."""
    if not list(cmp.dual_parameters()):
        return cooper.optim.UnconstrainedOptimizer(cmp, primal)
    params = list(cmp.dual_parameters())
    if dual.optimizer == "sgd":
        dual_opt = torch.optim.SGD(params, lr=dual.lr, maximize=True)
    elif dual.optimizer == "adam":
        dual_opt = torch.optim.Adam(params, lr=dual.lr, maximize=True)
    else:  # ZEROS init: cooper 1.0.1's default init takes a wrong second step when Kp != 0
        dual_opt = nuPI(
            params, lr=dual.lr, Kp=dual.kp, Ki=dual.ki, init_type=nuPIInitType.ZEROS, maximize=True
        )
    return cooper.optim.SimultaneousOptimizer(cmp, primal, dual_opt)


def primal_lagrangian(
    objective: torch.Tensor,
    violations: dict[str, torch.Tensor],
    multipliers: dict[str, torch.Tensor],
    constraints: dict[str, cooper.Constraint],
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The primal Lagrangian ``objective + s sum_i lambda_i^T v_i`` (``s`` the loss scale, 1 when ``None``),
    with the augmented terms where the constraint has a penalty coefficient c:

    .. math::
        \\lambda^\\top h + \\tfrac{1}{2} c^\\top h^2 \\;\\text{(equality)}, \\qquad
        \\tfrac{1}{2} (1/c)^\\top \\left(\\mathrm{relu}(\\lambda + c\\, g)^2 - \\lambda^2\\right)
        \\;\\text{(inequality; Nocedal \\& Wright 17.64-65)}.

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
    """``w_i``, the derivative of :func:`primal_lagrangian` with respect to ``v_i`` (detached), so that
    backpropagating ``objective + sum_i w_i^T v_i`` gives the primal Lagrangian's gradient with one dot per
    constraint, where autograd through the terms takes five to nine operators and as many backward nodes:

    .. math::
        w = \\lambda, \\qquad \\lambda + c \\odot h \\;\\text{(augmented equality)}, \\qquad
        \\tfrac{1}{2} (1/c) \\odot 2\\,\\mathrm{relu}(\\lambda + c\\, g) \\odot c
        \\;\\text{(augmented inequality)}.

    The last is the chain rule factor by factor, in the order autograd multiplies them: the gradients are bit
    for bit those of backpropagating the terms (tested), so runs are unchanged.
    """
    weights = {}
    with torch.no_grad():
        for name, violation in violations.items():
            c = constraints[name]
            multiplier = c.multiplier.weight
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


def dual_step(
    optimizer: Any,
    constraints: dict[str, cooper.Constraint],
    violations: dict[str, torch.Tensor],
    dual: DualSettings,
) -> None:
    """Ascent on the multipliers. The gradient of the dual Lagrangian ``sum_i lambda_i v_i`` is the
    violation itself (rank-averaged): no second autograd pass. Plain SGD is applied directly,
    ``lambda <- lambda + eta v`` then ``[.]_+`` for inequalities (bit for bit torch's SGD with
    ``maximize=True`` and cooper's projection, without their per-step bookkeeping); nuPI and Adam go through
    their optimiser (in cooper's ``optimizer``)."""
    if dual.optimizer == "sgd":
        lr = optimizer.dual_optimizers[0].param_groups[0]["lr"]
        with torch.no_grad():
            for name, c in constraints.items():
                weight = c.multiplier.weight.add_(violations[name], alpha=lr)
                if c.constraint_type == cooper.ConstraintType.INEQUALITY:
                    weight.relu_()
        return
    for name, c in constraints.items():
        c.multiplier.weight.grad = violations[name].clone()
    optimizer.dual_step()


def clamp_multipliers(
    constraints: dict[str, cooper.Constraint],
    ceiling: float,
    warned: set[str],
    step: int,
    events: list[dict[str, Any]],
) -> None:
    """Clamp multipliers beyond ``ceiling`` to it, with a warning and an event record the first time per
    constraint (names in ``warned``)."""
    with torch.no_grad():
        for name, c in constraints.items():
            w = c.multiplier.weight
            if w.abs().max() > ceiling and name not in warned:
                warned.add(name)
                message = (
                    f"multiplier of constraint '{name}' reached the ceiling {ceiling:g} at step {step} "
                    "and is clamped there: the constraint may be infeasible (raise its tolerance, make "
                    "it resilient, or raise max_multiplier)"
                )
                warnings.warn(message, stacklevel=5)
                event = {"step": step, "event": "multiplier_ceiling", "constraint": name}
                events.append({**event, "message": message})
            w.clamp_(-ceiling, ceiling)
