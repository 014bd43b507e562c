"""The Lagrangian trainer: any model, any loss, equivariance constraints solved with cooper.

One training step, for constraints ``g_i(theta) <= eps_i(t)`` with multipliers ``lambda_i``:

.. math::
    L(\\theta, u, \\lambda) = \\ell(\\theta) + \\sum_i \\tfrac{\\rho_i}{2} u_i^2
        + \\sum_i \\lambda_i \\, (g_i(\\theta) - \\epsilon_i(t) - u_i)

    \\theta, u \\leftarrow \\text{primal step on } \\nabla_{\\theta, u} L, \\quad u \\leftarrow \\max(u, 0)

    \\lambda_i \\leftarrow [\\lambda_i + \\eta_\\lambda (g_i - \\epsilon_i(t) - u_i)]_+
    \\quad (\\text{no } [\\cdot]_+ \\text{ for equalities})

The slack terms appear only for resilient constraints; fixed-penalty constraints add
``w * relu(g - eps)`` to the loss and have no multiplier. The tolerance eps(t) is a pure function of the
step, so resuming needs only the step count.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cooper
import torch
import torch.distributed as dist
from cooper.formulations import AugmentedLagrangian, Lagrangian
from cooper.multipliers import DenseMultiplier
from cooper.optim import nuPI, nuPIInitType
from cooper.penalty_coefficients import DensePenaltyCoefficient
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from .batches import batch_size, float_fields, split_batch, to_device
from .checkpoint import CHECKPOINT_FORMAT, CheckpointError, rng_state, save_atomic, set_rng_state
from .checkpoint import load as read_checkpoint
from .constraints import Constraint, DeviationConstraint, GateConstraint
from .deviation import equivariance_deviation, mean_squared_norm
from .loggers import MetricsLog, format_table, write_json
from .relax import equivariant, gates
from .selection import BestCheckpoints, higher_is_better
from .symmetry import call_model

__all__ = [
    "Trainer",
    "DualSettings",
    "split_batch",
    "to_device",
    "CheckpointError",
    "NonFiniteError",
    "Interrupted",
]

NAN_POLICIES = ("stop", "skip", "rollback")


class NonFiniteError(RuntimeError):
    """A NaN or Inf in the loss, a constraint value, a gradient or a multiplier."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; a checkpoint was saved after the step in progress."""


class _RolledBack(Exception):
    """Internal: the state was restored from a checkpoint; the epoch loop starts over from there."""


@dataclass(frozen=True)
class DualSettings:
    """How the multipliers are updated.

    Attributes:
        formulation: ``"lagrangian"`` or ``"augmented"`` (adds ``c/2 * relu(g)^2``, and ``c/2 g^2`` for
            equalities, to the primal Lagrangian).
        optimizer: ``"sgd"`` (plain ascent, no momentum), ``"nupi"`` (PI control, Kp/Ki) or ``"adam"``.
        lr: dual step size eta_lambda. With the augmented Lagrangian, set it equal to
            ``penalty_coefficient`` for the method of multipliers (cooper does not couple them).
        update: ``"simultaneous"`` (primal and dual steps from one evaluation) or ``"alternating"``
            (dual step first, then the primal step with the updated multipliers; no extra forward).
        penalty_coefficient: c of the augmented Lagrangian.
        kp, ki: nuPI gains.
        init: initial multiplier value.
    """

    formulation: str = "lagrangian"
    optimizer: str = "sgd"
    lr: float = 1e-2
    update: str = "simultaneous"
    penalty_coefficient: float = 1.0
    kp: float = 0.0
    ki: float = 1.0
    init: float = 0.0

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


class _Problem(cooper.ConstrainedMinimizationProblem):
    """The cooper problem; the trainer computes its state, this class only holds the constraints."""

    def compute_cmp_state(self, *args: Any, **kwargs: Any) -> cooper.CMPState:  # pragma: no cover
        raise NotImplementedError("the Trainer evaluates the problem itself")


class Trainer:
    """Train ``model`` on ``loss`` subject to equivariance ``constraints``.

    Args:
        model: any ``nn.Module``; for gate constraints, a model relaxed with :func:`ace.relax`.
        loss: ``(output, target) -> scalar``.
        optimizer: the primal optimiser over the model's parameters (gates included), or a list of
            optimisers that together hold them (e.g. plain SGD for the gates, Adam for the rest).
        symmetry: the :class:`ace.Symmetry` the deviation is measured under (needed by deviation
            constraints and for the deviation reported at evaluation).
        constraints: :class:`ace.GateConstraint` / :class:`ace.DeviationConstraint` objects.
        dual: :class:`DualSettings`.
        metrics: extra evaluation metrics ``{name: (output, target) -> batch mean}``.
        gate_schedule: if given, the gates are not learned but set to ``gate_schedule(step)`` before each
            step (the constraint-relaxation baseline ``cr``); f_eq is what gets evaluated as final.
        grad_clip: clip the gradient norm of the weights, and separately of the gates, to this value.
        gate_max_step: largest change of a gate in one step (``None``: unbounded). A trust region: at a
            large loss scale one plain-SGD gate step can otherwise throw a gate far past 0.
        lr_schedule: a factor ``step -> float`` on the learning rate of every parameter group without
            gates (e.g. cosine with warm-up, :func:`ace.schedules.lr_schedule`); the gates' plain-SGD rate
            is left alone (it sets the damping of the gate-multiplier pair) unless ``schedule_gates``.
        schedule_gates: scale the gates' learning rate by ``lr_schedule`` too: a gate's batch-to-batch
            noise around its equilibrium scales with the square root of its learning rate, so a decaying rate
            lets an equality-constrained gate settle at 0 by the end of the run.
        select: the validation metric that picks each variant's best step (``"loss"``, or a metric name
            such as ``"accuracy"``, maximised); see :mod:`ace.selection`.
        slack_lr: learning rate of the slack variables (SGD).
        eval_samples: group samples per batch for the deviation reported at evaluation.
        log_dir: run directory for ``metrics.jsonl``, ``summary.json`` and ``checkpoints/``; ``None``
            keeps records in ``trainer.history`` only. A directory that already holds a run (records,
            checkpoints or a summary) is refused unless ``resume`` or ``overwrite``.
        resume: continue the run in ``log_dir``: append to its records (then :meth:`load_checkpoint` and
            :meth:`truncate_records`, as ``ace train --resume`` does).
        overwrite: start again in ``log_dir``: its records, summary and checkpoints are deleted.
        log_every: steps between training records.
        progress: show a tqdm bar (``None``: only when stderr is a terminal).
        tensorboard: mirror records to TensorBoard in ``log_dir/tensorboard``.
        seed: seeds the group-element generator.
        device: where the model and batches live (default: the model's device).
        config: a plain dict saved in checkpoints, for the record.
        on_nan: what a NaN/Inf in the loss, a constraint value, a gradient or a multiplier does:
            ``"stop"`` (raise :class:`NonFiniteError`; the last checkpoint stays intact), ``"skip"`` (drop
            the step's update) or ``"rollback"`` (reload the last checkpoint and scale the primal learning
            rates by ``rollback_lr_factor``, at most ``max_rollbacks`` times). Each event is logged.
        max_multiplier: multipliers are clamped to ``[-max, max]``, with a warning logged the first time
            each constraint reaches it (``None``: no ceiling).

    Under ``torch.distributed`` (e.g. launched by ``torchrun``) the model is wrapped in
    DistributedDataParallel, constraint values are all-reduced before every dual step so that all ranks
    apply the same multiplier update, and only rank 0 writes logs and checkpoints.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Callable[[Any, torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        *,
        symmetry: Any = None,
        constraints: Sequence[Constraint] = (),
        dual: DualSettings = DualSettings(),
        metrics: dict[str, Callable] | None = None,
        gate_schedule: Callable[[int], float] | None = None,
        grad_clip: float | None = None,
        gate_max_step: float | None = 0.1,
        lr_schedule: Callable[[int], float] | None = None,
        schedule_gates: bool = False,
        select: str = "loss",
        slack_lr: float = 1e-2,
        eval_samples: int = 4,
        log_dir: str | os.PathLike | None = None,
        log_every: int = 10,
        progress: bool | None = None,
        tensorboard: bool = False,
        seed: int = 0,
        device: str | torch.device | None = None,
        config: dict | None = None,
        on_nan: str = "stop",
        max_multiplier: float | None = 1e6,
        max_rollbacks: int = 3,
        rollback_lr_factor: float = 0.5,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.model = model
        self.loss_fn = loss
        self.optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
        self.symmetry = symmetry
        self.constraints = list(constraints)
        self.dual = dual
        self.metrics = dict(metrics or {})
        self.gate_schedule = gate_schedule
        self.grad_clip = grad_clip
        self.gate_max_step = gate_max_step
        self.lr_schedule = lr_schedule
        self.eval_samples = eval_samples
        self.log_every = log_every
        self.progress = progress
        self.config = config
        self.seed = seed
        self.on_nan = on_nan
        self.max_multiplier = max_multiplier
        self.max_rollbacks = max_rollbacks
        self.rollback_lr_factor = rollback_lr_factor
        self.device = torch.device(device) if device is not None else _module_device(model)
        self.model.to(self.device)
        self.gates = gates(model)
        self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world_size > 1 else 0
        self.is_main = self.rank == 0

        self._check_setup()
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.slacks = self._make_slacks()
        self.slack_optimizer = (
            torch.optim.SGD(list(self.slacks.values()), lr=slack_lr) if self.slacks else None
        )
        self.cmp, self.cooper_constraints = self._make_problem()
        self.cooper_optimizer = self._make_cooper_optimizer()
        self._gate_names = list(self.gates)
        self._gate_params = list(self.gates.values())
        gate_ids = {id(g) for g in self._gate_params}
        self._weights = [  # the primal parameters other than the gates, listed once for the hot path
            p
            for o in self.optimizers
            for group in o.param_groups
            for p in group["params"]
            if id(p) not in gate_ids
        ]
        if gate_schedule is not None:
            for g in self._gate_params:
                g.requires_grad_(False)
        # (optimiser, group index, base lr) of the groups the lr schedule scales; by index, since
        # Optimizer.load_state_dict replaces the group dicts
        self._scheduled_groups = [
            (o, i, group["lr"])
            for o in self.optimizers
            for i, group in enumerate(o.param_groups)
            if schedule_gates or not any(id(p) in gate_ids for p in group["params"])
        ]

        # the forward pass of the loss goes through DDP (gradient averaging); the deviation's extra forward
        # passes use the bare module: autograd sums both paths into each parameter before DDP's hook fires
        self.forward_model = self.model
        if self.world_size > 1:
            device_ids = [self.device] if self.device.type == "cuda" else None
            # models often hold parameters that a loss does not reach (e.g. the last EGNN layer's feature
            # update when only positions are predicted): let DDP find them instead of failing
            self.forward_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=device_ids, find_unused_parameters=True
            )

        self.run_dir = Path(log_dir) if log_dir is not None else None  # read by every rank
        self.log_dir = self.run_dir if self.is_main else None  # written by rank 0 only
        if self.log_dir is not None and not resume:
            _claim_run_dir(self.log_dir, overwrite)
        self.log = MetricsLog(
            self.log_dir / "metrics.jsonl" if self.log_dir else None,
            self.log_dir / "tensorboard" if (self.log_dir and tensorboard) else None,
        )
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.tolerance_starts: dict[str, float] = {}
        self.best: dict[str, dict[str, float]] = {}
        self.selection = BestCheckpoints(
            self.model,
            select,
            self.log_dir / "checkpoints" if self.log_dir else None,
            ("model", "eq") if self.gates else ("model",),
        )
        self.last_eval: dict[str, float] = {}
        self._val_step: int | None = None  # the step of the last finite validation
        self.wall_time = 0.0
        self._epoch_rng: dict | None = None
        self.rollbacks = 0
        self._ceiling_warned: set[str] = set()
        self._checked_batch = False
        self._stop_signal: int | None = None
        self._stop_agreed = False

    # ------------------------------------------------------------------ setup

    def _check_setup(self) -> None:
        names = [c.name for c in self.constraints]
        if len(set(names)) != len(names):
            raise ValueError(f"constraint names must be unique, got {names}")
        if any(isinstance(c, GateConstraint) for c in self.constraints) and not self.gates:
            raise ValueError(
                "GateConstraint needs a relaxed model with gates: call ace.relax(model, where=...) first, "
                "or use a DeviationConstraint"
            )
        if any(isinstance(c, DeviationConstraint) for c in self.constraints) and self.symmetry is None:
            raise ValueError("DeviationConstraint needs symmetry=ace.Symmetry(...) to measure the deviation")
        if self.gate_schedule is not None and not self.gates:
            raise ValueError("gate_schedule needs a relaxed model with gates (ace.relax)")
        if self.gate_schedule is not None and any(isinstance(c, GateConstraint) for c in self.constraints):
            raise ValueError("gate_schedule fixes the gates; it cannot be combined with a GateConstraint")
        in_optimizer = {id(p) for o in self.optimizers for group in o.param_groups for p in group["params"]}
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if trainable and not any(id(p) in in_optimizer for p in trainable):
            raise ValueError(
                "the optimizer holds none of the model's parameters, so training would move no weight: "
                "build it from model.parameters() of this model"
            )
        missing = [n for n, g in self.gates.items() if id(g) not in in_optimizer]
        if missing and self.gate_schedule is None:
            raise ValueError(
                f"the optimizer does not hold the gates {missing}: build it from model.parameters() "
                "after ace.relax(model, ...)"
            )
        if not (isinstance(self.eval_samples, int) and self.eval_samples >= 1):
            raise ValueError(f"eval_samples must be an integer >= 1, got {self.eval_samples!r}")
        if not (isinstance(self.log_every, int) and self.log_every >= 1):
            raise ValueError(f"log_every must be an integer >= 1, got {self.log_every!r}")
        if self.on_nan not in NAN_POLICIES:
            raise ValueError(f"on_nan must be one of {NAN_POLICIES}, got {self.on_nan!r}")
        if self.max_multiplier is not None and not self.max_multiplier > 0:
            raise ValueError(f"max_multiplier must be > 0 or None, got {self.max_multiplier!r}")
        if self.gate_max_step is not None and not (
            self.gate_max_step > 0 and math.isfinite(self.gate_max_step)
        ):
            raise ValueError(f"gate_max_step must be a positive number or None, got {self.gate_max_step!r}")

    def _size(self, c: Constraint) -> int:
        return len(self.gates) if isinstance(c, GateConstraint) else 1

    def _make_slacks(self) -> dict[str, nn.Parameter]:
        return {
            c.name: nn.Parameter(torch.zeros(self._size(c), device=self.device))
            for c in self.constraints
            if c.resilient
        }

    def _make_problem(self) -> tuple[_Problem, dict[str, cooper.Constraint]]:
        cmp = _Problem()
        made = {}
        augmented = self.dual.formulation == "augmented"
        for c in self.constraints:
            if not c.dual:
                continue
            n = self._size(c)
            kind = cooper.ConstraintType.EQUALITY if c.equality else cooper.ConstraintType.INEQUALITY
            made[c.name] = cooper.Constraint(
                constraint_type=kind,
                formulation_type=AugmentedLagrangian if augmented else Lagrangian,
                multiplier=DenseMultiplier(init=torch.full((n,), float(self.dual.init), device=self.device)),
                penalty_coefficient=(
                    DensePenaltyCoefficient(
                        torch.full((n,), self.dual.penalty_coefficient, device=self.device)
                    )
                    if augmented
                    else None
                ),
            )
            setattr(cmp, c.name, made[c.name])
        return cmp, made

    def _make_cooper_optimizer(self) -> cooper.optim.CooperOptimizer:
        primal = self.optimizers + ([self.slack_optimizer] if self.slack_optimizer else [])
        if not self.cooper_constraints:
            return cooper.optim.UnconstrainedOptimizer(self.cmp, primal)
        params = list(self.cmp.dual_parameters())
        d = self.dual
        if d.optimizer == "sgd":
            dual_opt = torch.optim.SGD(params, lr=d.lr, maximize=True)
        elif d.optimizer == "adam":
            dual_opt = torch.optim.Adam(params, lr=d.lr, maximize=True)
        else:  # ZEROS init: cooper 1.0.1's default init takes a wrong second step when Kp != 0
            dual_opt = nuPI(params, lr=d.lr, Kp=d.kp, Ki=d.ki, init_type=nuPIInitType.ZEROS, maximize=True)
        return cooper.optim.SimultaneousOptimizer(self.cmp, primal, dual_opt)

    # ------------------------------------------------------------------ one step

    def _tolerances(self) -> dict[str, float]:
        return {c.name: c.tolerance_at(self.step) for c in self.constraints}

    def _evaluate_problem(self, inputs: Any, target: torch.Tensor, tolerances: dict[str, float]):
        """Forward pass, loss, and every constraint's value and violation.

        Returns ``(state, loss, values, violations, stop)``: the cooper state (differentiable, local to this
        rank) and the detached loss, values and violations averaged over ranks, with ``stop`` true when any
        rank has received SIGINT/SIGTERM. One all-reduce per step carries all of them.
        """
        output = call_model(self.forward_model, inputs)
        if not self._checked_batch:
            self._check_output(inputs, output)
            task_loss = self._first_loss(output, target)
        else:
            task_loss = self.loss_fn(output, target)
        raw = {}
        for c in self.constraints:
            if isinstance(c, GateConstraint):
                raw[c.name] = c.value(torch.stack(self._gate_params))
            else:
                raw[c.name] = equivariance_deviation(
                    self.model,
                    inputs,
                    self.symmetry,
                    samples=c.samples,
                    relative=c.relative,
                    generator=self.generator,
                    output=output,
                ).reshape(1)
        shared = torch.cat([task_loss.detach().reshape(1), *(v.detach() for v in raw.values())])
        if self.world_size > 1:  # the stop flag rides on the all-reduce (one process reads it on the host)
            stop = torch.tensor([float(self._stop_signal is not None)], device=task_loss.device)
            shared = torch.cat([shared, stop])
            dist.all_reduce(shared)
            shared = shared / self.world_size
        loss_all, rest = shared[0], shared[1:]
        objective = task_loss
        observed, values, violations = {}, {}, {}
        for c in self.constraints:
            value_all, rest = rest[: raw[c.name].numel()], rest[raw[c.name].numel() :]
            slack = self.slacks.get(c.name)
            violation = c.violation(raw[c.name], tolerances[c.name], slack)
            violation_all = c.violation(
                value_all, tolerances[c.name], None if slack is None else slack.detach()
            )
            if slack is not None:
                objective = objective + 0.5 * c.rho * slack.pow(2).sum()
            if c.dual:  # the dual step reads the all-reduced violation: the same update on every rank
                strict = violation_all if self.world_size > 1 else None
                observed[self.cooper_constraints[c.name]] = cooper.ConstraintState(
                    violation=violation, strict_violation=strict
                )
            else:
                objective = objective + c.penalty_term(violation)
            values[c.name], violations[c.name] = value_all, violation_all
        state = cooper.CMPState(loss=objective, observed_constraints=observed)
        stop = bool(rest[0] > 0) if self.world_size > 1 else self._stop_signal is not None
        return state, loss_all, values, violations, stop

    def train_step(self, batch: Any, record: bool | None = None) -> dict[str, Any] | None:
        """One primal-dual update on ``batch``; returns its log record when ``record`` (default: every
        ``log_every`` steps). A record holds what the step saw before its update: loss, constraint values,
        violations, gates, slacks and multipliers.

        Raises:
            NonFiniteError: a NaN/Inf appeared and ``on_nan="stop"`` (or rollback is impossible).
        """
        if not self.model.training:  # train() walks every submodule: ~0.6 ms a step on the EGNN
            self.model.train()
        inputs, target = split_batch(to_device(batch, self.device))
        self._check_batch(inputs, target)
        if self.gate_schedule is not None:
            with torch.no_grad():
                for g in self._gate_params:
                    g.fill_(self.gate_schedule(self.step))
        tolerances = self._tolerances()
        if self.lr_schedule is not None:
            scale = self.lr_schedule(self.step) * self.rollback_lr_factor**self.rollbacks
            for o, i, base in self._scheduled_groups:
                o.param_groups[i]["lr"] = base * scale
        opt = self.cooper_optimizer
        opt.zero_grad()
        # bounded branches: one spectral normalisation per step, shared by the loss's and the deviation's
        # forward passes (else each pass takes its own power iteration and the two see different functions)
        with parametrize.cached():
            state, task_loss, values, violations, stop = self._evaluate_problem(inputs, target, tolerances)
        self._checked_batch = True
        self._stop_agreed = stop
        problem = _first_nonfinite({"loss": task_loss, **{f"constraint '{k}'": v for k, v in values.items()}})
        # skip must also undo a dual step that overflowed the multipliers: keep their values (a few numbers)
        kept = [c.multiplier.weight.detach().clone() for c in self.cooper_constraints.values()]
        if record is None:
            record = (self.step + 1) % self.log_every == 0
        seen = self._snapshot(kept) if record else None
        alternating = self.cooper_constraints and self.dual.update == "alternating"
        if problem is None and alternating:  # dual step first: the primal Lagrangian uses the new multipliers
            state.compute_dual_lagrangian().backward()
            opt.dual_step()
        primal = None
        if problem is None:
            primal = state.compute_primal_lagrangian()
            primal.lagrangian.backward()
            problem = self._primal_step()
        if problem is None and self.cooper_constraints and not alternating:
            state.compute_dual_lagrangian().backward()  # violations at the pre-step point
            opt.dual_step()
        if problem is None:
            problem = self._check_multipliers()
        if problem is not None:
            self._handle_nonfinite(problem)  # raises, unless the step is skipped
            with torch.no_grad():
                for c, weight in zip(self.cooper_constraints.values(), kept):
                    c.multiplier.weight.copy_(weight)
        self.step += 1
        self.batch_in_epoch += 1
        if problem is None and record:
            return self._train_record(
                task_loss, primal.lagrangian.detach(), tolerances, values, violations, seen
            )
        return None

    def _snapshot(self, multipliers: list[torch.Tensor]) -> dict[str, Any]:
        """Gates, slacks and multipliers before the step's update, for its log record."""
        weights = dict(zip(self.cooper_constraints, multipliers))
        return {
            "gates": [g.detach().clone() for g in self._gate_params],
            "slacks": {k: u.detach().clone() for k, u in self.slacks.items()},
            "multipliers": {
                c.name: weights[c.name] if c.dual else torch.full((self._size(c),), float(c.penalty))
                for c in self.constraints
            },
        }

    def _primal_step(self) -> str | None:
        """Check the gradients, clip, step, project the slacks; the name of a non-finite quantity or None."""
        grads = [p.grad for p in (*self._weights, *self._gate_params) if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            if not torch.isfinite(norm):
                return "gradient"
            if self.grad_clip is not None:
                # weights and gates apart: the weights' large norm must not blunt the multipliers' pull on
                # the gates, while a runaway gate step is still bounded
                torch.nn.utils.clip_grad_norm_(self._weights, self.grad_clip)
                if self._gate_params:
                    torch.nn.utils.clip_grad_norm_(self._gate_params, self.grad_clip)
        before = [g.detach().clone() for g in self._gate_params] if self.gate_max_step is not None else []
        self.cooper_optimizer.primal_step()
        with torch.no_grad():
            for u in self.slacks.values():
                u.clamp_(min=0.0)
            for g, old in zip(self._gate_params, before):  # the gates' trust region
                g.copy_(torch.clamp(g, old - self.gate_max_step, old + self.gate_max_step))
        return None

    def _check_multipliers(self) -> str | None:
        """NaN check and ceiling of the multipliers (one host sync for all of them)."""
        if not self.cooper_constraints:
            return None
        weights = {name: c.multiplier.weight for name, c in self.cooper_constraints.items()}
        largest = torch.cat([w.detach().abs().reshape(-1) for w in weights.values()]).max().item()
        if not math.isfinite(largest):
            return "multiplier"
        if self.max_multiplier is not None and largest > self.max_multiplier:
            with torch.no_grad():
                for name, w in weights.items():
                    if w.abs().max() > self.max_multiplier and name not in self._ceiling_warned:
                        self._ceiling_warned.add(name)
                        message = (
                            f"multiplier of constraint '{name}' reached the ceiling {self.max_multiplier:g} "
                            f"at step {self.step + 1} and is clamped there: the constraint may be infeasible "
                            "(raise its tolerance, make it resilient, or raise max_multiplier)"
                        )
                        warnings.warn(message, stacklevel=3)
                        self._write(
                            {
                                "step": self.step + 1,
                                "event": "multiplier_ceiling",
                                "constraint": name,
                                "message": message,
                            }
                        )
                    w.clamp_(-self.max_multiplier, self.max_multiplier)
        return None

    def _handle_nonfinite(self, quantity: str, evaluated: bool = False, final: bool = False) -> None:
        """Apply ``on_nan`` to a non-finite ``quantity`` of the step in progress or, when ``evaluated``, of
        the evaluation after step ``self.step`` (``final``: the run's last one, which always stops)."""
        step = self.step if evaluated else self.step + 1
        self._write({"step": step, "event": "non_finite", "quantity": quantity, "policy": self.on_nan})
        self.cooper_optimizer.zero_grad()
        if self.on_nan == "skip" and not final:
            return
        checkpoint = self._checkpoint_path()
        saved = checkpoint is not None and checkpoint.exists()
        if self.on_nan == "rollback" and saved and self.rollbacks < self.max_rollbacks and not final:
            rollbacks = self.rollbacks + 1
            lrs = [[group["lr"] for group in o.param_groups] for o in self.optimizers]
            self.load_checkpoint(checkpoint)  # restores the checkpoint's lr: scale the lr in use instead
            self.rollbacks = rollbacks
            for o, old in zip(self.optimizers, lrs):
                for group, lr in zip(o.param_groups, old):
                    group["lr"] = lr * self.rollback_lr_factor
            self.truncate_records()
            raise _RolledBack
        where = f"the last good checkpoint is {checkpoint}" if saved else "no checkpoint was written yet"
        reason = f"train.on_nan={self.on_nan}"
        if final:
            reason = "at the end of the run: it is not finished"
        elif self.on_nan == "rollback":
            reason = (
                f"rollback gave up after {self.rollbacks} rollbacks"
                if saved
                else "rollback needs a checkpoint"
            )
        raise NonFiniteError(
            f"non-finite {quantity} {'after' if evaluated else 'in'} step {step} ({reason}); {where}. "
            "Lower the learning rates, clip "
            "gradients (optim.grad_clip), or set train.on_nan to skip or rollback"
        )

    def _checkpoint_path(self) -> Path | None:
        return self.run_dir / "checkpoints" / "last.pt" if self.run_dir else None

    def truncate_records(self, events: bool = True) -> None:
        """Forget records of steps after ``self.step`` (they will be run again after a rollback or resume) and
        test records (``fit`` writes them again at its end). ``events``: keep the event records of later steps
        (after a rollback they say why; a resume replays them, so it passes False)."""

        def keep(r: dict[str, Any]) -> bool:
            if any(k.startswith("test/") for k in r):
                return False
            return r.get("step", 0) <= self.step or (events and "event" in r)

        self.history = [r for r in self.history if keep(r)]
        self.log.truncate(keep)

    def _check_batch(self, inputs: Any, target: torch.Tensor) -> None:
        """Clear errors for empty batches and inputs whose dtype differs from the model's."""
        if batch_size(inputs, target) == 0:
            raise ValueError(
                f"empty batch in step {self.step + 1}: the loader yielded a batch with no samples"
            )
        if self._checked_batch:
            return
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        for name, tensor in float_fields(inputs):
            if dtype is not None and tensor.dtype != dtype:
                raise ValueError(
                    f"input field '{name}' has dtype {tensor.dtype}, but the model's parameters are {dtype}"
                )
        self._check_output(inputs, None)  # missing fields and wrong shapes, before the model trips on them

    def _first_loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        """The loss of the first batch, with clear errors for a target that does not fit the model's output
        and for a loss that is not a scalar."""
        try:
            loss = self.loss_fn(output, target)
        except (RuntimeError, ValueError) as err:
            if (
                isinstance(output, torch.Tensor)
                and target.is_floating_point()
                and output.shape != target.shape
            ):
                lead = output.dim() > 0 and target.dim() > 0 and output.shape[0] == target.shape[0]
                shape = lambda t: str(("B", *t.shape[1:]) if lead else tuple(t.shape)).replace("'", "")  # noqa: E731
                raise ValueError(
                    f"target shape {shape(target)} does not match model output {shape(output)}"
                ) from err
            raise
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"the loss must return a scalar tensor, got {got}: reduce it (e.g. .mean())")
        return loss

    def _check_output(self, inputs: Any, output: Any) -> None:
        """Named fields present with the right shapes, output (unless None) fitting its representation."""
        if self.symmetry is None:
            return
        try:
            self.symmetry.check(inputs, output)
        except ValueError as err:
            raise ValueError(f"the batch does not fit the symmetry {self.symmetry!r}: {err}") from err

    # ------------------------------------------------------------------ records

    def multipliers(self) -> dict[str, torch.Tensor]:
        """Current multiplier values by constraint name (the fixed weight for penalty constraints)."""
        out = {}
        for c in self.constraints:
            if c.dual:
                out[c.name] = self.cooper_constraints[c.name].multiplier.weight.detach()
            else:
                out[c.name] = torch.full((self._size(c),), float(c.penalty))
        return out

    def _entries(self, c: Constraint) -> list[str]:
        """Log names of a constraint's entries: one per gate for gate constraints."""
        if isinstance(c, GateConstraint):
            return [f"{c.name}.{g}" for g in self._gate_names]
        return [c.name]

    def constraint_table(self, tolerances, values, violations, seen) -> dict[str, dict[str, float]]:
        """Per constraint entry: tolerance, deviation or gate, violation, multiplier, slack."""
        gate_values = torch.stack(seen["gates"]).tolist() if seen["gates"] else []
        table = {}
        for c in self.constraints:
            vals = values[c.name].tolist()
            viols = violations[c.name].tolist()
            mults = seen["multipliers"][c.name].tolist()
            slack = seen["slacks"][c.name].tolist() if c.name in seen["slacks"] else None
            for i, entry in enumerate(self._entries(c)):
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

    def _train_record(self, task_loss, lagrangian, tolerances, values, violations, seen) -> dict[str, Any]:
        record: dict[str, Any] = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": task_loss.item(),
            "lagrangian": lagrangian.item(),
        }
        for name, g in zip(self._gate_names, seen["gates"]):
            record[f"gate/{name}"] = g.item()
        for entry, row in self.constraint_table(tolerances, values, violations, seen).items():
            for key, value in row.items():
                record[f"constraint/{entry}/{key}"] = value
        return record

    def _write(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self.log.write(record)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, loader: Iterable) -> dict[str, float]:
        """Loss and metrics of the relaxed model and, for gated models, of f_eq (keys ``eq/...``).

        With a symmetry, also the measured deviation ``deviation`` (absolute, ``eval_samples`` group
        elements per batch from a fixed seed, so evaluations are comparable) and ``relative_deviation``
        (divided by the mean squared norm of the output). For gated models: ``eq/deviation`` (0 up to
        rounding when f_eq is exactly equivariant) and, per gated layer, ``deviation/<layer>`` and
        ``relative_deviation/<layer>``: the deviation of the model with only that layer's branch enabled,
        the measured read-out of how much symmetry that layer gives up.
        """
        was_training = self.model.training
        self.model.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.seed + 1)
        totals: dict[str, float] = {}
        count = 0
        for batch in loader:
            inputs, target = split_batch(to_device(batch, self.device))
            n = batch_size(inputs, target)
            count += n
            for prefix, suffix, context in self._eval_variants():
                with context:
                    output = call_model(self.model, inputs)
                    scores = {}
                    if not suffix:
                        scores["loss"] = self.loss_fn(output, target)
                        scores.update({k: m(output, target) for k, m in self.metrics.items()})
                    if self.symmetry is not None:
                        deviation = equivariance_deviation(
                            self.model, inputs, self.symmetry, self.eval_samples, False, generator, output
                        )
                        scores["deviation"] = deviation
                        if prefix != "eq/":
                            scores["relative_deviation"] = deviation / mean_squared_norm(
                                self.symmetry, output
                            )
                for key, value in scores.items():
                    name = prefix + key + suffix
                    totals[name] = totals.get(name, 0.0) + float(value) * n
        self.model.train(was_training)
        if count == 0:
            raise ValueError("evaluate() got an empty loader")
        return {k: v / count for k, v in totals.items()}

    def _eval_variants(self):
        """(key prefix, key suffix, context): the model, f_eq, and the model relaxed at one layer only."""
        yield "", "", contextlib.nullcontext()
        if self.gates:
            yield "eq/", "", equivariant(self.model)
            if self.symmetry is not None:
                for name in self._gate_names:
                    yield "", f"/{name}", equivariant(self.model, keep=[name])

    def _track_best(self, record: dict[str, float]) -> None:
        for key, value in record.items():
            if key in ("step", "epoch") or not isinstance(value, float) or math.isnan(value):
                continue
            higher = higher_is_better(key)
            best = self.best.get(key)
            if best is None or (value > best["value"] if higher else value < best["value"]):
                self.best[key] = {"value": value, "step": self.step}

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        train_loader: Iterable,
        val_loader: Iterable | None = None,
        *,
        epochs: int | None = None,
        max_steps: int | None = None,
        eval_every: int = 1,
        checkpoint_every: int = 1,
        test_loader: Iterable | None = None,
        print_summary: bool = True,
    ) -> dict[str, Any]:
        """Train for ``epochs`` (or ``max_steps``, whichever ends first); resumes from ``self.step``.

        Evaluates on ``val_loader`` every ``eval_every`` epochs, checkpoints every ``checkpoint_every``
        epochs (when there is a ``log_dir``) and at the end, evaluates ``test_loader`` at the end, writes
        ``summary.json`` and returns the summary. SIGINT and SIGTERM finish the step in progress, save a
        checkpoint and raise :class:`Interrupted`.
        """
        if epochs is None and max_steps is None:
            raise ValueError("fit() needs epochs or max_steps")
        for name, count in (("epochs", epochs), ("max_steps", max_steps)):
            if count is not None and not (isinstance(count, int) and count >= 1):
                raise ValueError(f"fit(): {name} must be an integer >= 1 (or None), got {count!r}")
        per_epoch = len(train_loader)
        if per_epoch == 0:
            raise ValueError("the training loader is empty")
        total = int(min(epochs * per_epoch if epochs is not None else math.inf, max_steps or math.inf))
        if self.step == 0:
            self._resolve_auto_tolerances(train_loader)
        show = self.is_main and (self.progress if self.progress is not None else sys.stderr.isatty())
        bar = tqdm(total=total, initial=self.step, disable=not show, desc="train", dynamic_ncols=True)
        started = time.perf_counter() - self.wall_time
        restore_signals = self._catch_signals()
        try:
            while self.step < total:
                try:
                    epoch_done = self._run_epoch(train_loader, total, bar)
                    self.wall_time = time.perf_counter() - started
                    if not epoch_done:
                        break
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    last = self.step >= total
                    good = True  # a checkpoint after a non-finite validation would not be a good state
                    if val_loader is not None and (self.epoch % eval_every == 0 or last):
                        good = self._log_eval("val", val_loader).get("finite", True)
                except _RolledBack:
                    bar.n = self.step
                    continue
                if good and (self.epoch % checkpoint_every == 0 or last):
                    self.save_checkpoint()
            bar.close()
            self.wall_time = time.perf_counter() - started
            if val_loader is not None and self._val_step != self.step:
                self._log_eval("val", val_loader, final=True)
            if test_loader is not None:
                self._stop_if_signalled()
                self._log_eval("test", test_loader, final=True)
            if self.is_main and val_loader is not None:
                splits = {"val": val_loader, **({"test": test_loader} if test_loader is not None else {})}
                self.selected = self.selection.evaluate(self.evaluate, splits, self.device)
            self._stop_if_signalled()
        finally:
            restore_signals()
            bar.close()
        self.save_checkpoint()
        summary = self.summary()
        if self.log_dir:
            write_json(self.log_dir / "summary.json", summary)
        if print_summary and self.is_main:
            print(self.format_balance(summary))
        return summary

    def _stop_if_signalled(self) -> None:
        """A signal that arrived during the final evaluations: save and stop before the run is marked
        finished (``--resume`` evaluates again). One process only: ranks would not agree on it."""
        if self.world_size == 1 and self._stop_signal is not None:
            path = self.save_checkpoint()
            where = f"checkpoint saved to {path}" if path is not None else "no log_dir: no checkpoint saved"
            raise Interrupted(
                f"stopped by a signal during the final evaluation after step {self.step}; {where}; "
                "continue with `ace train CONFIG --out DIR --resume`"
            )

    def _catch_signals(self) -> Callable[[], None]:
        """SIGINT/SIGTERM set a flag read after each step; a second signal acts as usual."""
        self._stop_signal, self._stop_agreed = None, False  # a new fit() after an Interrupted starts afresh
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        def on_signal(signum: int, frame: Any) -> None:
            self._stop_signal = signum
            restore()

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
        return restore

    def _run_epoch(self, loader: Iterable, total: int, bar) -> bool:
        """Run the rest of the current epoch; False if ``total`` steps were reached before its end."""
        sampler = getattr(loader, "sampler", None)
        if hasattr(
            sampler, "set_epoch"
        ):  # DistributedSampler: a new shuffle each epoch, the same on all ranks
            sampler.set_epoch(self.epoch)
        resumed = None
        if self.batch_in_epoch > 0 and self._epoch_rng is not None:
            resumed = rng_state(self.generator)  # mid-epoch resume: replay the epoch's shuffle
            set_rng_state(self._epoch_rng, self.generator)
        else:
            self._epoch_rng = rng_state(self.generator)
        batches = iter(loader)
        for _ in range(self.batch_in_epoch):
            next(batches)
        if resumed is not None:
            set_rng_state(resumed, self.generator)
        for batch in batches:
            record = self.train_step(
                batch, record=(self.step + 1) % self.log_every == 0 or self.step + 1 == total
            )
            bar.update(1)
            if record is not None:
                self._write(record)
                bar.set_postfix(self._progress_postfix(record), refresh=False)
            # one process stops after the step the signal arrived in; several after the step that agreed on it
            if self._stop_agreed or (self.world_size == 1 and self._stop_signal is not None):
                path = self.save_checkpoint()
                raise Interrupted(
                    f"stopped by a signal after step {self.step}; checkpoint saved to {path}; "
                    "continue with `ace train CONFIG --out DIR --resume`"
                    if path is not None
                    else f"stopped by a signal after step {self.step} (no log_dir: no checkpoint saved)"
                )
            if self.step >= total:
                return self.batch_in_epoch >= len(loader)
        return True

    def _progress_postfix(self, record: dict[str, Any]) -> dict[str, str]:
        post = {"loss": f"{record['loss']:.3g}"}
        mults = [v for k, v in record.items() if k.endswith("/multiplier")]
        tols = [v for k, v in record.items() if k.endswith("/tolerance")]
        if mults:
            post["max_lambda"] = f"{max(mults, key=abs):.3g}"
        if tols:
            post["eps"] = f"{tols[0]:.3g}"
        return post

    def _log_eval(self, split: str, loader: Iterable, final: bool = False) -> dict[str, Any]:
        """Evaluate and log ``split``. Non-finite losses or weights are handled by ``on_nan`` (``skip``: this
        evaluation is not tracked and its checkpoint not written); at the end of a run (``final``) they
        always raise: a run that ends non-finite is not finished. Returns the record, with ``finite: False``
        (not logged) after a skipped one."""
        record, problem = {}, None
        if self.is_main:  # evaluation needs no collective: rank 0 does it while the others wait
            scores = self.evaluate(loader)
            record = {
                "step": self.step,
                "epoch": self.epoch,
                **{f"{split}/{k}": v for k, v in scores.items()},
            }
            losses = [k for k, v in scores.items() if k.split("/")[-1] == "loss" and not math.isfinite(v)]
            weights = [p.detach().reshape(-1) for p in self.model.parameters()]
            if losses:
                problem = f"{split} {losses[0]}"
            elif weights and not torch.isfinite(torch.cat(weights)).all():
                problem = "weights"
            if problem is None and split == "val":
                self._track_best(record)
                self.selection.update(record, self.step)
                self.last_eval = record
            elif problem is None:
                self.test_scores = record
            self._write(record)
        if self.world_size > 1:  # every rank takes the same way out of a non-finite evaluation
            flag = torch.tensor([float(problem is not None)], device=self.device)
            dist.broadcast(flag, 0)
            problem = problem or ("evaluation (rank 0)" if flag.item() else None)
        if problem is not None:
            self._handle_nonfinite(problem, evaluated=True, final=final)
            return {**record, "finite": False}
        if split == "val":
            self._val_step = self.step  # on every rank (last_eval is rank 0's): the final pass agrees on it
        return record

    def _resolve_auto_tolerances(self, train_loader: Iterable, batches: int = 8) -> None:
        """Fill ``start="auto"`` schedules with the value measured before the first step.

        A deviation is averaged over the first ``batches`` training batches: one batch's estimate is noisy,
        and a start below the typical deviation makes a tightening constraint active from step 1.
        """
        pending = [c for c in self.constraints if getattr(c.tolerance, "needs_start", False)]
        if not pending:
            return
        inputs = [split_batch(to_device(b, self.device))[0] for b in itertools.islice(train_loader, batches)]
        generator = torch.Generator(device=self.device).manual_seed(self.seed + 2)
        with torch.no_grad():
            for c in pending:
                if c.name not in self.tolerance_starts:
                    if isinstance(c, GateConstraint):
                        start = c.value(torch.stack(self._gate_params)).abs().max().item()
                    else:
                        samples = max(c.samples, self.eval_samples)
                        measured = [
                            equivariance_deviation(
                                self.model, x, self.symmetry, samples, c.relative, generator
                            )
                            for x in inputs
                        ]
                        start = torch.stack(measured).mean().item()
                    if self.world_size > 1:  # every rank measured its own batches: agree on the mean
                        shared = torch.tensor([start], device=self.device)
                        dist.all_reduce(shared)
                        start = shared.item() / self.world_size
                    self.tolerance_starts[c.name] = start
                c.tolerance = c.tolerance.resolve(start=self.tolerance_starts[c.name])

    # ------------------------------------------------------------------ summary

    def summary(self) -> dict[str, Any]:
        """The final state and metrics.

        ``constraints`` (one row per constraint entry) and ``layers`` (one row per gated layer) describe the
        model as it ends, after the last update: the gates, multipliers and slacks now, the tolerance at the
        final step, and for a deviation constraint the deviation measured on the final validation pass
        (the last training batch's estimate when there was none). ``final`` is the last training record,
        which (like every record) holds what its step saw before its update.
        """
        last_train = next((r for r in reversed(self.history) if "loss" in r), {})
        seen = self._snapshot([c.multiplier.weight.detach() for c in self.cooper_constraints.values()])
        tolerances = {c.name: c.tolerance_at(self.step) for c in self.constraints}
        values, violations = {}, {}
        for c in self.constraints:
            if isinstance(c, GateConstraint):
                value = c.value(torch.stack(seen["gates"]))
            else:
                key = "val/relative_deviation" if c.relative else "val/deviation"
                measured = self.last_eval.get(key, last_train.get(f"constraint/{c.name}/deviation"))
                value = torch.tensor([math.nan if measured is None else measured])
            values[c.name] = value
            violations[c.name] = c.violation(value, tolerances[c.name], seen["slacks"].get(c.name))
        table = self.constraint_table(tolerances, values, violations, seen)
        layers = {}
        for i, name in enumerate(self._gate_names):
            row = {"gate": seen["gates"][i].item()}
            for c in self.constraints:
                if isinstance(c, GateConstraint):
                    row.update(
                        {k: v for k, v in table[f"{c.name}.{name}"].items() if k in ("multiplier", "slack")}
                    )
            for key in ("deviation", "relative_deviation"):
                if f"val/{key}/{name}" in self.last_eval:
                    row[key] = self.last_eval[f"val/{key}/{name}"]
            layers[name] = row
        return {
            "steps": self.step,
            "epochs": self.epoch,
            "wall_time": round(self.wall_time, 3),
            "final": last_train,
            "constraints": table,
            "layers": layers,
            "gates": {name: row["gate"] for name, row in layers.items()},
            "tolerance_starts": self.tolerance_starts,
            "best": self.best,
            "val": self.last_eval,
            "test": getattr(self, "test_scores", {}),
            "selected": getattr(self, "selected", {}),
        }

    @staticmethod
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
        header = [
            "constraint",
            "tolerance",
            "gate / deviation",
            "multiplier",
            "slack",
            "layer rel. deviation",
        ]
        return f"final balance after {summary['steps']} steps\n" + format_table(header, rows)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit: model, optimisers, multipliers, slacks, RNG."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "cooper_optimizer": self.cooper_optimizer.state_dict(),
            "cmp": self.cmp.state_dict(),
            "slacks": {k: v.detach().clone() for k, v in self.slacks.items()},
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "tolerance_starts": dict(self.tolerance_starts),
            "rng": rng_state(self.generator),
            "epoch_rng": self._epoch_rng,
            "best": self.best,
            "selected_steps": self.selection.steps,
            "last_eval": self.last_eval,
            "wall_time": self.wall_time,
            "rollbacks": self.rollbacks,
            "ceiling_warned": sorted(self._ceiling_warned),
            "config": self.config,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"not an ace trainer checkpoint of format {CHECKPOINT_FORMAT} "
                f"(got format {state.get('format') if isinstance(state, dict) else type(state).__name__})"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.cmp.load_state_dict(state["cmp"])
            self.cooper_optimizer.load_state_dict(state["cooper_optimizer"])
            if set(state["slacks"]) != set(self.slacks):
                raise CheckpointError(f"checkpoint slacks {sorted(state['slacks'])} != {sorted(self.slacks)}")
            with torch.no_grad():
                for k, v in state["slacks"].items():
                    self.slacks[k].copy_(v)
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"checkpoint does not fit this trainer: {err}") from err
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.tolerance_starts = dict(state["tolerance_starts"])
        for c in self.constraints:
            if getattr(c.tolerance, "needs_start", False) and c.name in self.tolerance_starts:
                c.tolerance = c.tolerance.resolve(start=self.tolerance_starts[c.name])
        set_rng_state(state["rng"], self.generator)
        self._epoch_rng = state["epoch_rng"]
        self.best, self.last_eval = state["best"], state["last_eval"]
        self._val_step = self.last_eval.get("step")
        self.selection.steps = state.get("selected_steps", {})
        self.wall_time = state["wall_time"]
        self.rollbacks = state.get("rollbacks", 0)
        self._ceiling_warned |= set(state.get("ceiling_warned", ()))  # a rollback keeps its own warnings

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write ``checkpoints/last.pt`` atomically, keeping the one before as ``previous.pt``.

        Without ``path`` this writes into the run directory, on rank 0 only (others wait for it); without a
        run directory it does nothing and returns None.
        """
        if path is None:
            if self.run_dir is None:
                return None
            path = self._checkpoint_path()
            if not self.is_main:
                dist.barrier()
                return path
        path = save_atomic(self.state_dict(), path)
        if self.world_size > 1:
            dist.barrier()
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a checkpoint written by :meth:`save_checkpoint` (tensors only: no code runs from it)."""
        self.load_state_dict(read_checkpoint(path, self.device))

    def close(self) -> None:
        self.log.close()


def _module_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _claim_run_dir(folder: Path, overwrite: bool) -> None:
    """Refuse a folder that holds a run (records, checkpoints, summary), or clear it when ``overwrite``."""
    metrics, checkpoints = folder / "metrics.jsonl", folder / "checkpoints"
    held = [
        p
        for p in (metrics, folder / "summary.json", *checkpoints.glob("*.pt"))
        if p.exists() and (p != metrics or p.stat().st_size > 0)
    ]
    if held and not overwrite:
        raise ValueError(
            f"{folder} already holds a run ({', '.join(p.name for p in held)}); pass resume=True to continue "
            "it or overwrite=True to start again"
        )
    for path in held:
        path.unlink()


def _first_nonfinite(values: dict[str, torch.Tensor]) -> str | None:
    """The name of the first quantity holding a NaN or Inf (one host sync when all are finite)."""
    if torch.isfinite(torch.cat([v.reshape(-1) for v in values.values()])).all():
        return None
    return next(name for name, v in values.items() if not torch.isfinite(v).all())
