"""Train a PyTorch Lightning module under ace constraints (extra ``lightning``).

:class:`Constrained` wraps your ``LightningModule``: its ``training_step`` returns the task loss as usual
(a tensor, or a dict with ``"loss"``), and the wrapper performs ace's primal-dual update
(:class:`ace.PrimalDual`) with Lightning's manual optimisation, on the optimisers of your
``configure_optimizers``::

    module = MyLitModule()                                    # relaxed with ace.relax if it has gates
    model = ace.lightning.Constrained(module, [ace.GateConstraint(equality=True)], symmetry=sym)
    lightning.Trainer(max_epochs=20).fit(model, train_loader, val_loader)

Multipliers, gates and slacks are logged through Lightning's logger (``constraint/<entry>/<key>`` and
``gate/<layer>``, the keys of ``metrics.jsonl``), and the core's state (multipliers, slacks, step, generator)
rides in Lightning checkpoints under ``"ace"``, so a resumed fit equals an uninterrupted one. Deviation
constraints read the batch's inputs with ``inputs_of`` (default: the first element of ``(inputs, target)``
or the graph batch itself, as :func:`ace.utils.batches.split_batch`) and evaluate the model on transformed
copies.

Lightning counts ``global_step`` per optimiser step: with one optimiser for the weights and one for the gates
it advances by 2 a batch (``max_steps`` counts those); ace's tolerances and lr schedules count batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import lightning.pytorch as pl
import torch

from ace.constrained.constraints import Constraint, DeviationConstraint
from ace.constrained.multipliers import DualSettings
from ace.constrained.primal_dual import PrimalDual
from ace.symmetry.action import Symmetry
from ace.utils.batches import split_batch

__all__ = ["Constrained"]


class Constrained(pl.LightningModule):
    """``module`` trained under ``constraints``; the keyword options are those of :class:`ace.PrimalDual`.

    Args:
        module: your ``LightningModule``; its ``training_step(batch, batch_idx)`` returns the task loss, its
            ``configure_optimizers`` the primal optimisers (a learning-rate scheduler it returns is stepped
            each epoch; or use ``lr_schedule``, which ace applies per batch).
        constraints: :class:`ace.GateConstraint` / :class:`ace.DeviationConstraint` objects.
        inputs_of: ``batch -> model inputs``, for deviation constraints.
        log_every: batches between logged records.
    """

    def __init__(
        self,
        module: pl.LightningModule,
        constraints: list[Constraint],
        *,
        symmetry: Symmetry | None = None,
        dual: DualSettings = DualSettings(),
        inputs_of: Callable[[Any], Any] = lambda batch: split_batch(batch)[0],
        log_every: int = 10,
        **options: Any,
    ) -> None:
        super().__init__()
        self.module = module
        self.automatic_optimization = False
        self._settings = dict(constraints=list(constraints), symmetry=symmetry, dual=dual, **options)
        self.inputs_of, self.log_every = inputs_of, log_every
        self.core: PrimalDual | None = None
        self._restored: dict | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def configure_optimizers(self) -> Any:
        return self.module.configure_optimizers()

    def _core(self) -> PrimalDual:
        """Built at the first step, once Lightning has moved the module and set up its optimisers."""
        if self.core is None:
            wrapped = self.optimizers()
            # Lightning's optimiser wrappers: their step() counts global_step and runs the strategy's hooks;
            # they stand in for the optimisers they wrap (their types do not say so)
            optimizers = cast(
                list[torch.optim.Optimizer], wrapped if isinstance(wrapped, list) else [wrapped]
            )
            self.core = PrimalDual(
                self.module, optimizers, device=self.device, backward=self.manual_backward, **self._settings
            )
            if self._restored is not None:
                self.core.load_state_dict(self._restored)
        return self.core

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        core = self._core()
        with core.cached():
            out = self.module.training_step(batch, batch_idx)
            loss = out["loss"] if isinstance(out, dict) else out
            if not isinstance(loss, torch.Tensor):
                raise TypeError(
                    f"training_step must return the loss (a tensor or a dict with 'loss'), got {out!r}"
                )
            needs_batch = any(isinstance(c, DeviationConstraint) for c in core.constraints)
            inputs = self.inputs_of(batch) if needs_batch else None
            result = core.step(loss, inputs=inputs)
        if result.problem is not None:
            raise FloatingPointError(f"non-finite {result.problem} in ace step {result.step}")
        if result.step % self.log_every == 0:
            record = result.log()
            record.pop("step")
            self.log_dict(record, on_step=True, on_epoch=False)
        return result.loss

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        return self.module.validation_step(batch, batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> Any:
        return self.module.test_step(batch, batch_idx)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.core is not None:
            checkpoint["ace"] = self.core.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._restored = checkpoint.get("ace")
        if self.core is not None and self._restored is not None:
            self.core.load_state_dict(self._restored)
