r"""The constrained step: multipliers, slacks and one primal-dual update, for any training loop.

For constraints ``g_i(theta) <= eps_i(t)`` (or ``= eps_i(t)``) with multipliers ``lambda_i``, slacks
``u_i >= 0`` (resilient constraints only) and the task loss ``l``, one step on a batch is

$$
L(\theta, u, \lambda) = \ell(\theta) + \sum_i \tfrac{\rho_i}{2} u_i^2
    + \sum_i \lambda_i \, (g_i(\theta) - \epsilon_i(t) - u_i)
    \; [+ \tfrac{c}{2} \textstyle\sum_i \max(g_i - \epsilon_i - u_i, 0)^2 \text{ (augmented)}]
$$

$$
\lambda_i \leftarrow [\lambda_i + \eta_\lambda (g_i - \epsilon_i(t) - u_i)]_+
\quad (\text{no } [\cdot]_+ \text{ for equalities; first when alternating})
$$

$$
\theta, \gamma, u \leftarrow \text{primal step on } \nabla_{\theta, \gamma, u} L, \quad
u \leftarrow \max(u, 0), \quad |\Delta \gamma_i| \le \delta_{\max}
$$

With ``dual.scale="initial"`` (the default) every term but the loss is multiplied by the loss's scale ``s``
(its mean over the first 20 steps, :mod:`ace.constrained.scale`): the multipliers are prices relative to the
untrained
model's loss and ``rho`` is relative to it, so no gain depends on the loss's units. The gates are ace's: your
optimiser's update skips them and the core steps them itself, ``gamma <- gamma - eta_gamma grad_gamma L / s``
(plain SGD at ``gate_lr``: an adaptive optimiser moves a gate by about its learning rate whatever the
multiplier's size, and the pair oscillates), and so the slacks, ``u <- max(u - eta_u grad_u L / s, 0)``.

Fixed-penalty constraints add ``w * relu(g - eps)`` to the loss and have no multiplier. The tolerance
``eps(t)`` and the learning-rate factor are pure functions of the step, so resuming needs only the state
dict. :class:`PrimalDual` is the whole of it; :class:`ace.Trainer` is a loop around it, and a plain PyTorch
loop uses it the same way::

    core = ace.PrimalDual(model, torch.optim.Adam(model.parameters()), [ace.GateConstraint(equality=True)],
                          symmetry=sym)         # the Adam skips the gates: ace steps them
    for x, y in loader:
        with core.cached():                       # bounded branches: one normalisation per step
            out = model(x)
            result = core.step(loss_fn(out, y), inputs=x, output=out)
        if result.step % 100 == 0:
            print(result.log())
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ace.constrained.closing import ClosedGates
from ace.constrained.constraints import (
    Constraint,
    DeviationConstraint,
    GateConstraint,
    check_limits,
    check_setup,
    check_tolerance,
)
from ace.constrained.multipliers import DualSettings, Multipliers
from ace.constrained.primal import Bounds, PrimalSide
from ace.constrained.scale import LossScale
from ace.constrained.schedules import LearningRates, Schedule
from ace.constrained.step_check import StepCheck
from ace.constrained.step_result import StepResult, constraint_table
from ace.nn.relaxed import gates as find_gates
from ace.symmetry.action import Symmetry
from ace.utils import distributed

__all__ = ["PrimalDual"]


@dataclass
class _Measured:
    """A batch's constrained problem: the objective and the violations that carry multipliers
    (differentiable), and the detached, rank-averaged loss, values and violations."""

    objective: torch.Tensor
    observed: dict[str, torch.Tensor]
    loss: torch.Tensor
    values: dict[str, torch.Tensor]
    violations: dict[str, torch.Tensor]
    tolerances: dict[str, float]
    gates: torch.Tensor | None  # the gates this batch saw, stacked and detached
    gate_bounds: Bounds | None  # each gate's lowest and highest value after the step
    stop: bool
    scale: torch.Tensor | None  # the loss scale s_t of this step (None: units of the loss)


class PrimalDual:
    """The constrained problem of ``model`` and one primal-dual update per batch (see the module docstring).

    Args:
        model: the model (relaxed with :func:`ace.relax` for gate constraints); the bare module, not a
            DistributedDataParallel wrapper.
        optimizer: the primal optimiser over the model's parameters, or a list of them. Its update skips the
            gates (said once, as a warning), which the core steps, unless ``step_gates=False``.
        constraints: :class:`ace.GateConstraint` / :class:`ace.DeviationConstraint` objects.
        symmetry: the :class:`ace.Symmetry` deviation constraints are measured under.
        dual: :class:`DualSettings`.
        slack_lr: learning rate of the slacks (SGD, on the gradient divided by the loss scale).
        gate_lr: learning rate ``eta_gamma`` of the gates (plain SGD on the gradient divided by the loss
            scale).
        step_gates: the core steps the gates (default); ``False`` leaves them to ``optimizer``, which must
            then hold them (the ACE paper's recipe: one Adam over weights and gates).
        grad_clip: clip the gradient norm of the weights, and separately of the gates, to this value.
        gate_max_step: largest change of a gate in one step (``None``: unbounded), a trust region: at a large
            loss scale one plain-SGD gate step can otherwise throw a gate far past 0.
        lr_schedule: a factor ``step -> float`` on the learning rate of every parameter group, and with
            ``schedule_gates`` (default) on the gates' rate: a gate's batch noise around its equilibrium
            scales with its rate, so a decaying rate lets an equality-constrained gate settle.
        gate_schedule: the gates are not learned but set to ``gate_schedule(step)`` before each step (the
            constraint-relaxation baseline ``cr``).
        max_multiplier: multipliers are clamped to ``[-max, max]`` (warning once per constraint).
        close_gates_below: a gate held at 0 by an equality :class:`ace.GateConstraint` whose value falls below
            this is closed for good: set to 0 and no longer learned, its branch no longer computed (an event
            ``gate_closed`` in the step's record). The model is then f_eq up to that layer, and a step costs
            less as gates close. ``None`` (default): never.
        seed: seeds the generator of the group elements that deviation constraints sample.
        device: where the multipliers and slacks live (default: the model's device).
        backward: how the primal Lagrangian is backpropagated (default ``Tensor.backward``; Lightning passes
            its ``manual_backward``, so that precision plugins and strategies see it).

    Under ``torch.distributed`` the loss and constraint values are all-reduced (one collective per step) so
    that every rank applies the same dual update.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        constraints: Sequence[Constraint] = (),
        *,
        symmetry: Symmetry | None = None,
        dual: DualSettings = DualSettings(),
        slack_lr: float = 1e-2,
        gate_lr: float = 0.05,
        step_gates: bool = True,
        grad_clip: float | None = None,
        gate_max_step: float | None = 0.1,
        lr_schedule: Callable[[int], float] | None = None,
        schedule_gates: bool = True,
        gate_schedule: Callable[[int], float] | None = None,
        max_multiplier: float | None = 1e6,
        close_gates_below: float | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        backward: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        self.model = model
        self.optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
        self.constraints = list(constraints)
        self.symmetry = symmetry
        self.dual = dual
        self.max_multiplier = max_multiplier
        self.device = torch.device(device) if device is not None else module_device(model)
        self.dtype = module_dtype(model)  # multipliers and slacks in the model's precision (float64 too)
        self.gates = find_gates(model)
        check_setup(self.constraints, self.gates, model, self.optimizers, symmetry, gate_schedule, step_gates)
        check_limits(max_multiplier=max_multiplier, gate_max_step=gate_max_step, gate_lr=gate_lr)
        self.closed = ClosedGates(model, close_gates_below, self.constraints, step_gates)
        self.scale = LossScale(dual.scale, self.device, self.dtype)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.slacks = {
            c.name: nn.Parameter(torch.zeros(self._size(c), device=self.device, dtype=self.dtype))
            for c in self.constraints
            if c.resilient
        }
        self.slack_optimizer = (
            torch.optim.SGD(list(self.slacks.values()), lr=slack_lr) if self.slacks else None
        )
        sizes = {c.name: self._size(c) for c in self.constraints}
        primal_optimizers = self.optimizers + ([self.slack_optimizer] if self.slack_optimizer else [])
        self.duals = Multipliers(self.constraints, sizes, dual, primal_optimizers, self.device, self.dtype)
        gates = list(self.gates.values())
        self.primal = PrimalSide(
            self.optimizers,
            gates,
            self.slack_optimizer,
            grad_clip,
            gate_max_step,
            gate_schedule,
            gate_lr if step_gates else None,
        )
        self.gate_lr, self.schedule_gates = gate_lr, schedule_gates
        # the gates' rate sets the gate-multiplier damping: scaled only on request (the core's own rate
        # follows it in update(); an optimiser's group that holds gates it steps keeps its rate)
        skip = [] if schedule_gates or step_gates else gates
        self.rates = LearningRates(lr_schedule, self.optimizers, skip=skip)
        self._check = StepCheck([*self.primal.weights, *self.primal.gates], self.device)
        self.backward = backward or torch.Tensor.backward
        self.step_count = 0
        self.tolerance_starts: dict[str, float] = {}
        self._ceiling_warned: set[str] = set()
        self.primal.set_scheduled_gates(0)

    # ------------------------------------------------------------------ setup

    def _size(self, c: Constraint) -> int:
        return len(self.gates) if isinstance(c, GateConstraint) else 1

    def resolve_tolerances(self, measure: Callable[[Constraint], float]) -> None:
        """Fill ``start="auto"`` tolerances with ``measure(constraint)`` (once; kept in the state)."""
        for c in self.constraints:
            if _waits_for_start(c) and c.name not in self.tolerance_starts:
                self.tolerance_starts[c.name] = measure(c)
        for name, schedule in self._apply_tolerance_starts():
            start = self.tolerance_starts[name]
            check_tolerance(schedule, f"constraint '{name}' (measured start {start:.4g})")

    def _apply_tolerance_starts(self) -> list[tuple[str, Schedule]]:
        """Give every ``start="auto"`` schedule its recorded start; returns each constraint it resolved, by
        name, with its resolved schedule."""
        resolved = []
        for c in self.constraints:
            schedule = _waits_for_start(c)
            if schedule is not None and c.name in self.tolerance_starts:
                c.tolerance = schedule.resolve(start=self.tolerance_starts[c.name])
                resolved.append((c.name, c.tolerance))
        return resolved

    # ------------------------------------------------------------------ one step

    @staticmethod
    def cached():
        """Context for the forward pass and the step: bounded branches are normalised once, so the loss's and
        the deviation's forward passes see the same function (``torch.nn.utils.parametrize.cached``)."""
        return parametrize.cached()

    def tolerances(self) -> dict[str, float]:
        """eps(t) of every constraint at the current step."""
        return {c.name: c.tolerance_at(self.step_count) for c in self.constraints}

    def measure(
        self, loss: torch.Tensor, inputs: Any = None, output: Any = None, stop: bool = False
    ) -> _Measured:
        """Every constraint's value and violation on this batch, with ``loss`` (the task loss of ``output``).

        Deviation constraints evaluate the model on transformed ``inputs`` and compare with ``output``.
        ``stop`` is a flag OR-ed over ranks on the same all-reduce (a loop's signal agreement).
        """
        self.primal.zero_grad()  # the multipliers' gradients are assigned, never accumulated
        tolerances = self.tolerances()
        gates = torch.stack(self.primal.gates) if self.gates else None
        raw = {}
        for c in self.constraints:
            if isinstance(c, GateConstraint):
                assert gates is not None  # check_setup refuses gate constraints without gates
                raw[c.name] = c.value(gates)
            else:
                assert isinstance(c, DeviationConstraint)
                # in the multipliers' dtype: under autocast the deviation may come out in bfloat16
                deviation = c.measure(self.model, inputs, self.symmetry, self.generator, output)
                raw[c.name] = deviation.to(self.dtype)
        shared = distributed.mean_with_flag(  # the list is built only under torch.distributed
            lambda: [loss.detach().reshape(1), *(v.detach() for v in raw.values())], stop
        )
        loss_all, rest = (shared[0], shared[1:]) if shared is not None else (loss.detach(), None)
        scale = self.scale.update(loss_all)
        objective = loss
        observed, values, violations = {}, {}, {}
        for c in self.constraints:
            slack = self.slacks.get(c.name)
            violation = c.violation(raw[c.name], tolerances[c.name], slack)
            if rest is None:  # one process: the detached local values are the rank averages
                value_all, violation_all = raw[c.name].detach(), violation.detach()
            else:  # the dual step reads the all-reduced violation: the same update on every rank
                value_all, rest = rest[: raw[c.name].numel()], rest[raw[c.name].numel() :]
                violation_all = c.violation(
                    value_all, tolerances[c.name], None if slack is None else slack.detach()
                )
            if slack is not None:
                cost = 0.5 * c.rho * slack.pow(2).sum()
                objective = objective + (cost if scale is None else scale * cost)
            if c.dual:
                observed[c.name] = violation
            else:
                objective = objective + c.penalty_term(violation)
            values[c.name], violations[c.name] = value_all, violation_all
        stop = bool(rest[0] > 0) if rest is not None else stop
        snapshot = None if gates is None else gates.detach()
        bounds = self.primal.gate_bounds()
        return _Measured(
            objective, observed, loss_all, values, violations, tolerances, snapshot, bounds, stop, scale
        )

    def update(self, measured: _Measured) -> StepResult:
        """The primal-dual update of a measured batch (nothing is applied when a quantity is non-finite)."""
        multipliers = self.duals
        # a dropped step must also undo a dual step that overflowed the multipliers: keep their values
        kept = multipliers.keep()
        seen = self.snapshot(kept, measured.gates)
        self.rates.apply(self.step_count)
        alternating = multipliers and self.dual.update == "alternating"
        if alternating:  # dual step first, so the primal Lagrangian uses the new multipliers
            multipliers.step(measured.violations)
        if self.primal.gate_lr is not None:  # the gates' rate follows the schedule only on request
            self.primal.gate_lr = self.rates.rate(self.gate_lr, self.step_count, self.schedule_gates)
        self.backward(multipliers.surrogate(measured.objective, measured.observed, measured.scale))
        if multipliers and not alternating:
            # violations at the pre-step point; taken before the primal step, which does not read the
            # multipliers, so that one host sync checks the new multipliers with everything else
            multipliers.step(measured.violations)
        quantities = {"loss": [measured.loss]}
        quantities.update({f"constraint '{k}'": [v] for k, v in measured.values.items()})
        quantities["multiplier"] = multipliers.weights()
        numbers, gradients_finite = self._check(quantities)  # the step's one host sync
        problem = next((k for k, xs in numbers.items() if not all(map(math.isfinite, xs))), None)
        if problem is None and not gradients_finite:
            problem = "gradient"
        largest = max(map(abs, numbers["multiplier"]), default=0.0)
        used = numbers["multiplier"] if alternating else kept  # the multipliers of the primal step
        events: list[dict[str, Any]] = []
        if problem is None:
            self.primal.step(measured.gate_bounds, measured.scale)
            if self.closed.threshold is not None:
                read = {c.name: numbers[f"constraint '{c.name}'"] for c in self.closed.equalities}
                self.closed.update(self.gates, read, measured.tolerances, self.step_count + 1, events)
            if self.max_multiplier is not None and largest > self.max_multiplier:
                step, warned = self.step_count + 1, self._ceiling_warned
                multipliers.clamp(self.max_multiplier, warned, step, events)
        if problem is not None:  # dropped: no gradients left, the multipliers and scale as they were
            multipliers.zero_grad()
            self.scale.restore()
            multipliers.restore(kept)
        self.step_count += 1
        self.primal.set_scheduled_gates(self.step_count)
        tolerances, values, violations = measured.tolerances, measured.values, measured.violations
        return StepResult(
            step=self.step_count,
            loss=measured.loss,
            lagrangian_of=None if problem else lambda: self._lagrangian(measured, used),
            tolerances=tolerances,
            values=values,
            violations=violations,
            problem=problem,
            events=events,
            table=lambda: self.table(tolerances, values, violations, seen),
            **seen,
        )

    def step(self, loss: torch.Tensor, inputs: Any = None, output: Any = None) -> StepResult:
        """``update(measure(loss, inputs, output))``: one primal-dual step on a batch."""
        return self.update(self.measure(loss, inputs, output))

    def _lagrangian(self, measured: _Measured, multipliers: list[float] | list[torch.Tensor]) -> torch.Tensor:
        """The primal Lagrangian's value at the step (for records: a step that is not logged skips it), from
        the multipliers its primal step used: read by the step's check, or kept before a dual step."""
        tensors = [m for m in multipliers if isinstance(m, torch.Tensor)]
        if len(tensors) != len(multipliers):  # the floats the step's check read
            tensors = self.duals.split([float(m) for m in multipliers])
        objective = measured.objective.detach()
        return self.duals.lagrangian(objective, measured.observed, tensors, measured.scale)

    def snapshot(
        self, multipliers: list[torch.Tensor] | None = None, gates: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """Gates (``gates``: stacked, else read now), slacks and multipliers (``multipliers``: one tensor per
        constraint with multipliers, else the current ones)."""
        if multipliers is None:
            weights = self.duals.values()
        else:
            weights = dict(zip(self.duals.constraints, multipliers))
        if gates is None and self.gates:
            gates = torch.stack(self.primal.gates).detach()
        return {
            "gates": dict(zip(self.gates, gates.unbind())) if gates is not None else {},
            "slacks": {k: u.detach().clone() for k, u in self.slacks.items()},
            "multipliers": {
                c.name: weights[c.name] if c.dual else torch.full((self._size(c),), float(c.penalty or 0.0))
                for c in self.constraints
            },
        }

    # ------------------------------------------------------------------ read-out

    def cap_slacks(self, name: str, caps: torch.Tensor) -> None:
        """Bound the slack of constraint ``name`` entry by entry from now on: ``u <= caps`` (0 holds that
        entry's constraint strict, ``inf`` leaves it resilient); kept in the state."""
        index = list(self.slacks).index(name)
        cap = caps.to(device=self.device, dtype=self.dtype).reshape(self.slacks[name].shape)
        self.primal.slack_caps[index] = cap
        with torch.no_grad():
            torch.minimum(self.slacks[name], cap, out=self.slacks[name])

    def slack_caps(self) -> dict[str, torch.Tensor]:
        """The caps set by :meth:`cap_slacks`, by constraint name."""
        capped = zip(self.slacks, self.primal.slack_caps)
        return {name: cap for name, cap in capped if cap is not None}

    def zero_grad(self) -> None:
        """Forget the gradients of the step in progress (every parameter, gate, slack and multiplier)."""
        self.duals.zero_grad()

    def needs_tolerance_starts(self) -> bool:
        """Some constraint's schedule starts at ``"auto"`` and waits for :meth:`resolve_tolerances`."""
        return any(_waits_for_start(c) is not None for c in self.constraints)

    def multipliers(self) -> dict[str, torch.Tensor]:
        """Current multiplier values by constraint name (the fixed weight for penalty constraints)."""
        return self.snapshot()["multipliers"]

    def table(self, tolerances, values, violations, seen) -> dict[str, dict[str, float]]:
        """Per constraint entry: tolerance, gate or deviation, violation, multiplier, slack."""
        return constraint_table(self.constraints, list(self.gates), tolerances, values, violations, seen)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Multipliers, the optimisers (primal and dual), slacks, step, tolerance starts and the generator."""
        return {
            **self.duals.state_dict(),
            "slacks": {k: v.detach().clone() for k, v in self.slacks.items()},
            "step": self.step_count,
            "tolerance_starts": dict(self.tolerance_starts),
            "generator": self.generator.get_state(),
            "lr_factor": self.rates.factor,
            "ceiling_warned": sorted(self._ceiling_warned),
            "loss_scale": self.scale.state_dict(),
            "closed_gates": sorted(self.closed.names),
            "slack_caps": self.slack_caps(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (``ValueError``, ``KeyError``, ``RuntimeError`` if it does not fit)."""
        self.duals.load_state_dict(state)
        if set(state["slacks"]) != set(self.slacks):
            raise ValueError(f"checkpoint slacks {sorted(state['slacks'])} != {sorted(self.slacks)}")
        with torch.no_grad():
            for k, v in state["slacks"].items():
                self.slacks[k].copy_(v)
        self.step_count = state["step"]
        self.tolerance_starts = dict(state["tolerance_starts"])
        self._apply_tolerance_starts()
        self.generator.set_state(state["generator"])
        self.rates.factor = state.get("lr_factor", 1.0)
        self._ceiling_warned |= set(state.get("ceiling_warned", ()))  # a rollback keeps its own warnings
        if "loss_scale" in state:  # absent in checkpoints of ace < 0.2, which had no scale
            self.scale.load_state_dict(state["loss_scale"])
        for name in state.get("closed_gates", ()):
            self.closed.close(name)
        self.primal.slack_caps = [None] * len(self.slacks)  # the state's caps, not those set since
        for name, cap in state.get("slack_caps", {}).items():  # absent before ace 0.2's ace_heldout
            self.cap_slacks(name, cap)
        self.primal.set_scheduled_gates(self.step_count)


def module_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def module_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (torch's default where it has none)."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.get_default_dtype()


def _waits_for_start(c: Constraint) -> Schedule | None:
    """``c``'s tolerance schedule when it starts at ``"auto"`` and waits for a measured start."""
    return c.tolerance if isinstance(c.tolerance, Schedule) and c.tolerance.needs_start else None
