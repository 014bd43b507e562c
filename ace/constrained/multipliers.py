"""The dual side: how multipliers are updated (:class:`DualSettings`) and :class:`Multipliers`, the one owner
of the cooper objects that hold them (the problem, its constraints and the constrained optimiser)."""

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
from ace.constrained.lagrangian import lagrangian_surrogate, multiplier_of, primal_lagrangian
from ace.constrained.scale import check_scale

__all__ = ["DualSettings", "Multipliers", "make_problem", "make_optimizer", "dual_step", "clamp_multipliers"]


@dataclass(frozen=True)
class DualSettings:
    r"""How the multipliers are updated. The defaults close the gates of any relaxed model at any loss scale:
    with the loss measured in units of its initial scale (``scale="initial"``, :mod:`ace.constrained.scale`)
    every gain is
    dimensionless, and the gate-multiplier pair of an equality ``gamma_i = 0``,

    $$
    \gamma_i \leftarrow \gamma_i
        - \eta_\gamma \big(\partial_{\gamma_i} \ell / s + \lambda_i + c\,\gamma_i\big),
    \qquad \lambda_i \leftarrow \lambda_i + \eta_\lambda\, \gamma_i,
    $$

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
    dual_opt: torch.optim.Optimizer
    if dual.optimizer == "sgd":
        dual_opt = torch.optim.SGD(params, lr=dual.lr, maximize=True)
    elif dual.optimizer == "adam":
        dual_opt = torch.optim.Adam(params, lr=dual.lr, maximize=True)
    else:  # ZEROS init: cooper 1.0.1's default init takes a wrong second step when Kp != 0
        kp, ki = dual.kp, dual.ki  # floats, as nuPI's own defaults are (its annotation says Tensor)
        dual_opt = nuPI(params, lr=dual.lr, Kp=kp, Ki=ki, init_type=nuPIInitType.ZEROS, maximize=True)  # type: ignore[arg-type]
    return cooper.optim.SimultaneousOptimizer(cmp, primal, dual_opt)


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
                weight = multiplier_of(c).add_(violations[name], alpha=lr)
                if c.constraint_type == cooper.ConstraintType.INEQUALITY:
                    weight.relu_()
        return
    for name, c in constraints.items():
        multiplier_of(c).grad = violations[name].clone()
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
            w = multiplier_of(c)
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


class Multipliers:
    """The multipliers of the constraints that have them (``sizes[name]`` each, of ``dtype``), with the cooper
    problem that holds them and cooper's constrained optimiser over ``primal`` optimisers and the dual one.

    Nothing else reads cooper's objects: the core asks this class to step, keep, restore and clamp the
    multipliers and for the Lagrangian at them. Its state is the checkpoint's ``cooper_optimizer`` and
    ``cmp`` entries.
    """

    def __init__(
        self,
        constraints: list[Constraint],
        sizes: dict[str, int],
        dual: DualSettings,
        primal: list[torch.optim.Optimizer],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.dual = dual
        self.cmp, self.constraints = make_problem(constraints, sizes, dual, device, dtype)
        self.optimizer = make_optimizer(self.cmp, primal, dual)
        self.device = device

    def __bool__(self) -> bool:
        return bool(self.constraints)

    def weights(self) -> list[torch.Tensor]:
        """The multipliers themselves (live tensors, in constraint order)."""
        return [multiplier_of(c) for c in self.constraints.values()]

    def values(self) -> dict[str, torch.Tensor]:
        """The current multipliers by constraint name (detached)."""
        return {name: multiplier_of(c).detach() for name, c in self.constraints.items()}

    def keep(self) -> list[torch.Tensor]:
        """Copies of the multipliers, for :meth:`restore` (a dropped step undoes its dual step)."""
        with torch.no_grad():
            return [w.clone() for w in self.weights()]

    def restore(self, kept: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for weight, value in zip(self.weights(), kept):
                weight.copy_(value)

    def split(self, numbers: list[float]) -> list[torch.Tensor]:
        """Flat multiplier values (as the step's check reads them) back into one tensor per constraint."""
        sizes = [w.numel() for w in self.weights()]
        return list(torch.tensor(numbers, device=self.device).split(sizes))

    def step(self, violations: dict[str, torch.Tensor]) -> None:
        """One ascent step on the (rank-averaged) ``violations`` (:func:`dual_step`)."""
        dual_step(self.optimizer, self.constraints, violations, self.dual)

    def clamp(self, ceiling: float, warned: set[str], step: int, events: list[dict[str, Any]]) -> None:
        """Clamp to ``[-ceiling, ceiling]``, warning once per constraint (:func:`clamp_multipliers`)."""
        clamp_multipliers(self.constraints, ceiling, warned, step, events)

    def zero_grad(self) -> None:
        """Forget every gradient the constrained optimiser holds (primal and dual)."""
        self.optimizer.zero_grad()

    def surrogate(
        self, objective: torch.Tensor, violations: dict[str, torch.Tensor], scale: torch.Tensor | None
    ) -> torch.Tensor:
        """A scalar whose gradient is the primal Lagrangian's at the current multipliers."""
        return lagrangian_surrogate(objective, violations, self.constraints, scale)

    def lagrangian(
        self,
        objective: torch.Tensor,
        violations: dict[str, torch.Tensor],
        multipliers: list[torch.Tensor],
        scale: torch.Tensor | None,
    ) -> torch.Tensor:
        """The primal Lagrangian's value at ``multipliers`` (one tensor per constraint, in order)."""
        with torch.no_grad():
            used = dict(zip(self.constraints, multipliers))
            return primal_lagrangian(objective, violations, used, self.constraints, scale)

    def state_dict(self) -> dict[str, Any]:
        return {"cooper_optimizer": self.optimizer.state_dict(), "cmp": self.cmp.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cmp.load_state_dict(state["cmp"])
        self.optimizer.load_state_dict(state["cooper_optimizer"])
