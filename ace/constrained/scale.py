r"""The loss's scale, which makes the constrained step's gains dimensionless.

A multiplier is a price in units of the loss: ``lambda = -dP*/d eps``. A loss summed instead of averaged, or
another model, changes those units, and with them the gains that a gate and its multiplier need (every
hand-tuned ``dual.lr`` before ace 0.2 was tuned in one task's units). :class:`ace.PrimalDual` therefore
measures the loss in units of its scale at the start of training,

$$
s = \frac{1}{K} \sum_{t=1}^{K} |\ell_t| \quad (K = 20 \text{ steps, then fixed}), \qquad
L = \ell + s \Big(\sum_i \lambda_i\, h_i + \tfrac{\rho_i}{2} u_i^2
    \;[+ \tfrac{c}{2} h_i^2]\Big),
$$

and prices every constraint in those units: a multiplier is the fraction of the untrained model's loss that
one unit of tolerance would save, ``rho`` is relative to that loss, and the gates and slacks that
:class:`ace.PrimalDual` steps itself move by ``-eta * grad / s``. Multiplying the loss by any ``a > 0``
multiplies ``s`` by ``a`` and leaves every gate, slack and multiplier trajectory unchanged (bit for bit when
``a`` is a power of two and the weights' optimiser is scale-free, e.g. Adam with ``eps = 0``).

Why the scale at the start and not a running one: late in training the loss is mostly noise, and a loss
divided by its current value magnifies that noise (a gate's batch noise grows as the fit improves) and prices
what branches memorise as much as what the data break (resilient slacks ~0.4 on symmetric and broken toy data
alike, measured). In units of the initial loss, a mean-squared error is read like ``1 - R^2`` and a
cross-entropy against ``log(classes)``. A model that starts already trained (fine-tuning) starts with a small
loss: pass ``scale=`` a number there.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["LossScale", "check_scale", "WARMUP"]

#: steps whose mean |loss| is the scale
WARMUP = 20


def check_scale(scale: Any) -> None:
    """``ValueError`` unless ``scale`` is ``"initial"``, ``"none"`` or a positive finite number."""
    if scale in ("initial", "none"):
        return
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not (scale > 0 and math.isfinite(scale))
    ):
        raise ValueError(f"dual.scale must be 'initial', 'none' or a positive number, got {scale!r}")


class LossScale:
    """``s``: the mean ``|loss|`` of the first :data:`WARMUP` steps (``"initial"``; the mean so far before
    then), 1 (``"none"``: gains in units of the loss, the behaviour before ace 0.2) or a fixed number.

    :meth:`update` takes the step's detached loss and returns ``s`` as a 0-dim tensor, computed on the device
    without a host sync; :meth:`restore` undoes the update of a dropped step.
    """

    def __init__(self, scale: str | float, device: torch.device, dtype: torch.dtype) -> None:
        check_scale(scale)
        self.kind = scale
        self.mean = torch.zeros((), device=device, dtype=dtype)
        if scale not in ("initial", "none"):
            self.mean.fill_(float(scale))
        self.steps = 0
        self._previous: tuple[torch.Tensor, int] | None = None

    def update(self, loss: torch.Tensor) -> torch.Tensor | None:
        """``s`` after this step's loss (``None`` for ``"none"``)."""
        self._previous = None
        if self.kind == "none":
            return None
        if self.kind == "initial" and self.steps < WARMUP:
            self._previous = (self.mean.clone(), self.steps)
            self.steps += 1
            self.mean.add_((loss.detach().abs().to(self.mean.dtype) - self.mean) / self.steps)
            # a loss of exactly 0 at the start must not divide by 0 (tiny: scaling stays exact above it)
            self.mean.clamp_(min=torch.finfo(self.mean.dtype).tiny)
        return self.mean

    def value(self) -> float:
        """``s`` now, as a number (1 for ``"none"`` and before the first step)."""
        return 1.0 if self.kind == "none" or (self.kind == "initial" and not self.steps) else float(self.mean)

    def restore(self) -> None:
        """Undo the last :meth:`update` (a step dropped for a non-finite quantity)."""
        if self._previous is not None:
            self.mean.copy_(self._previous[0])
            self.steps = self._previous[1]
            self._previous = None

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.detach().clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean.copy_(state["mean"])
        self.steps = int(state["steps"])
