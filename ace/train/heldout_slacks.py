"""Method ``ace_heldout``: resilient slacks that answer to held-out data.

Resilient ACE (``|gamma_i| <= u_i``, slack cost ``rho/2 u_i^2``) lets a layer keep its branch wherever the
*training* loss pays for it, and a branch that memorises training noise is paid for as well as one that fits
a real asymmetry. Here the held-out data decide once, part-way through training: at the first validation at or
after ``after_step``, each gated layer's branch is judged on the validation data (:func:`ace.train.heldout.
heldout`: the validation loss of the model against the same model with that branch removed, a bootstrap
interval over validation samples). A layer whose branch helps there (verdict ``"breaks"``: the interval lies
above the 1 % margin) keeps its slack; every other layer's slack is capped at 0 from then on
(:meth:`ace.PrimalDual.cap_slacks`), so its constraint is ``|gamma_i| <= 0`` and the multiplier drives its
gate to 0, as in ACE. One ``heldout_decision`` event per layer goes to ``metrics.jsonl``; the caps are in the
checkpoints, so a resumed run decides nothing twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from ace.constrained.constraints import GateConstraint
from ace.train.heldout import heldout, small_batches

if TYPE_CHECKING:
    from ace.train.trainer import Trainer

__all__ = ["HeldOutSlacks"]


class HeldOutSlacks:
    """A :attr:`Trainer.observers` entry: after the validation record of a step ``>= after_step``, judge each
    gated layer's branch on ``val_loader`` and cap the slacks of those that do not help (see the module
    docstring). Needs a resilient :class:`ace.GateConstraint`."""

    def __init__(self, val_loader: Iterable, after_step: int) -> None:
        self.loader = small_batches(val_loader)
        self.after_step = after_step

    def __call__(self, trainer: Trainer, record: dict[str, Any]) -> None:
        core = trainer.core
        constraint = next(
            (c for c in core.constraints if isinstance(c, GateConstraint) and c.resilient), None
        )
        if constraint is None or constraint.name in core.slack_caps():
            return
        if not any(k.startswith("val/") for k in record) or record["step"] < self.after_step:
            return
        # the loader draws its seed from torch's generator: the training's random stream stays as it was
        with torch.random.fork_rng(devices=[]):
            read = heldout(
                trainer.model,
                self.loader,
                trainer.loss_fn,
                samples=1,
                seed=trainer.seed + 4,
                device=trainer.device,
            )
        layers = read["layers"]
        caps = torch.tensor([math.inf if layers[name]["verdict"] == "breaks" else 0.0 for name in core.gates])
        core.cap_slacks(constraint.name, caps)
        for name, cap in zip(core.gates, caps.tolist()):
            row = layers[name]
            trainer.write(
                {
                    "step": record["step"],
                    "event": "heldout_decision",
                    "layer": name,
                    "verdict": row["verdict"],
                    "benefit": row["benefit"],
                    "low": row["low"],
                    "high": row["high"],
                    "slack": "kept" if cap > 0 else "held at 0",
                }
            )
