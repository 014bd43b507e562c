"""The primal side of a constrained step: the weights, gates and slacks, and what each step does to them.

Each step zeroes their gradients, divides the gates' and slacks' by the loss scale, clips them (the weights
and the gates apart), steps the primal optimisers and the gates (plain SGD, unless the user's optimiser holds
them), projects the slacks onto ``u >= 0`` (and below their caps, where set) and bounds each gate's move (a
trust region). Under a gate schedule the gates are set, not learned. :class:`ace.PrimalDual` owns one
:class:`PrimalSide`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

__all__ = ["PrimalSide"]

Tensors = list[torch.Tensor] | tuple[torch.Tensor, ...]  # what torch's _foreach ops take and return
Bounds = tuple[Tensors, Tensors]


class PrimalSide:
    """The primal parameters of a constrained problem and their update.

    Args:
        optimizers: the user's optimisers (the weights, and the gates when ``gate_lr`` is None).
        gates: the relaxed model's gates (``ace.relax``), in a fixed order.
        slack_optimizer: the slacks' optimiser (resilient constraints), stepped after the others.
        grad_clip, gate_max_step, gate_schedule: see :class:`ace.PrimalDual`.
        gate_lr: the gates' plain-SGD rate when this side steps them (``None``: an optimiser holds them).
    """

    def __init__(
        self,
        optimizers: list[torch.optim.Optimizer],
        gates: Sequence[torch.Tensor],
        slack_optimizer: torch.optim.Optimizer | None,
        grad_clip: float | None,
        gate_max_step: float | None,
        gate_schedule: Callable[[int], float] | None,
        gate_lr: float | None = None,
    ) -> None:
        self.optimizers = [*optimizers, *([slack_optimizer] if slack_optimizer else [])]
        self.gates = list(gates)
        gate_ids = {id(g) for g in gates}
        self.weights = [  # the parameters other than the gates and slacks, listed once for the hot path
            p
            for o in optimizers
            for group in o.param_groups
            for p in group["params"]
            if id(p) not in gate_ids
        ]
        self.slacks = (
            [p for group in slack_optimizer.param_groups for p in group["params"]] if slack_optimizer else []
        )
        self.grad_clip, self.gate_max_step, self.gate_schedule = grad_clip, gate_max_step, gate_schedule
        self.gate_lr = gate_lr
        #: per slack, an upper bound on its entries after each step (None: u >= 0 only)
        self.slack_caps: list[torch.Tensor | None] = [None] * len(self.slacks)
        held = {id(p) for o in optimizers for group in o.param_groups for p in group["params"]}
        if gate_lr is not None and gate_ids & held:  # said once (Python shows a warning once per place)
            warnings.warn(
                f"ace.PrimalDual steps the {len(gates)} gates itself (plain SGD at gate_lr on the "
                "loss-scaled Lagrangian); your optimiser holds them and its updates skip them. Pass "
                "step_gates=False to leave them to it, or build it from ace.weights(model)",
                stacklevel=4,
            )
        # torch's zero_grad sets each grad to None under a profiler scope and a compiler guard, a cost a small
        # model's step notices (docs/performance.md): for optimisers that keep torch's zero_grad, do just that
        # (the groups are read at each step: a group added later is zeroed too)
        self._zeroed = [o for o in self.optimizers if type(o).zero_grad is torch.optim.Optimizer.zero_grad]
        self._zeroed_by_call = [o for o in self.optimizers if o not in self._zeroed]
        if gate_schedule is not None:
            for g in gates:
                g.requires_grad_(False)

    def zero_grad(self) -> None:
        for o in self._zeroed:
            for group in o.param_groups:
                for p in group["params"]:
                    p.grad = None
        for o in self._zeroed_by_call:
            o.zero_grad()
        if self.gate_lr is not None:  # the gates this side steps may be in no optimiser
            for g in self.gates:
                g.grad = None

    def gate_bounds(self) -> Bounds | None:
        """The lowest and highest value each gate may take in the coming step (None: unbounded)."""
        if not self.gates or self.gate_max_step is None:
            return None
        with torch.no_grad():
            step = self.gate_max_step
            return torch._foreach_sub(self.gates, step), torch._foreach_add(self.gates, step)

    def step(self, gate_bounds: Bounds | None, scale: torch.Tensor | None = None) -> None:
        """Scale, clip, step, project the slacks, keep each gate within ``gate_bounds``.

        ``scale`` (the loss scale s_t) divides the gradients of the gates and slacks, whose every term but the
        loss's pull carries a factor s_t: the update then reads the loss in units of its own scale.
        """
        if scale is not None:
            own = [p.grad for p in (*self.gates, *self.slacks) if p.grad is not None]
            if own:
                torch._foreach_div_(own, scale)
        if self.grad_clip is not None:
            # weights and gates apart: the weights' large norm must not blunt the multipliers' pull on the
            # gates, while a runaway gate step is still bounded
            torch.nn.utils.clip_grad_norm_(self.weights, self.grad_clip)
            if self.gates:
                torch.nn.utils.clip_grad_norm_(self.gates, self.grad_clip)
        lr = self.gate_lr
        stepped = [g for g in self.gates if g.grad is not None] if lr is not None else []
        grads = [g.grad for g in stepped if g.grad is not None]  # all of them (the filter narrows the type)
        for g in stepped:  # an optimiser that holds a gate skips it: a parameter without a gradient
            g.grad = None
        for o in self.optimizers:
            o.step()
        with torch.no_grad():
            if lr is not None and stepped:  # plain SGD: the multipliers' pull stays proportional to them
                torch._foreach_add_(stepped, grads, alpha=-lr)
                for g, grad in zip(stepped, grads, strict=True):
                    g.grad = grad
            for u, cap in zip(self.slacks, self.slack_caps):
                u.clamp_(min=0.0)
                if cap is not None:
                    torch.minimum(u, cap, out=u)
            if gate_bounds is not None:
                torch._foreach_clamp_min_(self.gates, gate_bounds[0])
                torch._foreach_clamp_max_(self.gates, gate_bounds[1])

    def set_scheduled_gates(self, step: int) -> None:
        """``gate_schedule``: the gates of ``step``, set after each update (and at the start)."""
        if self.gate_schedule is not None:
            with torch.no_grad():
                for g in self.gates:
                    g.fill_(self.gate_schedule(step))
