"""A Trainer's checkpoints: what they hold, writing and reading them, and the epoch a run continues in.

A checkpoint (``checkpoints/last.pt``, :mod:`ace.runs.layout`) holds the model, the primal and dual
optimisers, the multipliers and slacks (:meth:`ace.PrimalDual.state_dict`), the loop's
:class:`~ace.train.state.TrainState` (the epoch and the batch within it, the epoch's shuffle, the best
validation values and steps, the wall time), every RNG state and the best checkpoints' steps: a run continued
from it takes the same steps as one never stopped.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ace.runs import layout
from ace.runs.checkpoint import CHECKPOINT_FORMAT, CheckpointError, rng_state, save_atomic, set_rng_state
from ace.runs.checkpoint import load as read_checkpoint
from ace.utils import distributed

if TYPE_CHECKING:
    from ace.train.trainer import Trainer

__all__ = ["Checkpointing"]

#: the constrained step's state a checkpoint holds (:meth:`ace.PrimalDual.state_dict`)
CORE_KEYS = (
    "cooper_optimizer",
    "cmp",
    "slacks",
    "step",
    "tolerance_starts",
    "loss_scale",
    "closed_gates",
    "slack_caps",
)


class Checkpointing:
    """Checkpoints of ``trainer`` (in its run directory, or at a path of the caller's choice)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    @property
    def path(self) -> Path | None:
        """``checkpoints/last.pt`` of the run directory (None without one)."""
        run = self.trainer.run_dir
        return layout.last_checkpoint(run) if run is not None else None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit: model, optimisers, multipliers, slacks, RNG."""
        t = self.trainer
        core = t.core.state_dict()
        return {
            "format": CHECKPOINT_FORMAT,
            "model": t.model.state_dict(),
            **{k: core[k] for k in CORE_KEYS},
            **t.state.state_dict(),
            "rng": rng_state(t.generator),
            "selected_steps": t.selection.steps,
            # the run's final record even for a resumed run that trains no further step (summary.json)
            "last_record": t.last_record(),
            "ceiling_warned": core["ceiling_warned"],
            "config": t.config,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"not an ace trainer checkpoint of format {CHECKPOINT_FORMAT} "
                f"(got format {state.get('format') if isinstance(state, dict) else type(state).__name__})"
            )
        t = self.trainer
        try:
            t.model.load_state_dict(state["model"])
            t.core.load_state_dict(
                {
                    **state,
                    "generator": state["rng"]["generator"],
                    "lr_factor": t.nan_policy.factor ** state.get("rollbacks", 0),
                }
            )
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"checkpoint does not fit this trainer: {err}") from err
        t.state.load_state_dict(state)
        set_rng_state(state["rng"], t.generator)
        t.selection.steps = state.get("selected_steps", {})

    def save(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write ``path`` (default ``checkpoints/last.pt``) atomically, keeping the one before as
        ``previous.pt``. Without ``path`` this writes on rank 0 only (the others wait for it); without a run
        directory it does nothing and returns None."""
        if path is None:
            path = self.path
            if path is None:
                return None
            if not self.trainer.is_main:
                distributed.barrier()
                return path
        path = save_atomic(self.state_dict(), path)
        distributed.barrier()
        return path

    def load(self, path: str | os.PathLike) -> None:
        """Load a checkpoint written by :meth:`save` (tensors only: no code runs from it)."""
        self.load_state_dict(read_checkpoint(path, self.trainer.device))

    def roll_back(self, checkpoint: Path, factor: float) -> None:
        """Reload ``checkpoint`` (one rollback more) and scale the primal learning rates in use by ``factor``
        (the checkpoint's would undo earlier rollbacks' scaling); records after its step are forgotten."""
        t = self.trainer
        rollbacks = t.state.rollbacks + 1
        lrs = [[group["lr"] for group in o.param_groups] for o in t.optimizers]
        self.load(checkpoint)
        t.state.rollbacks = rollbacks
        t.core.rates.factor = factor**rollbacks
        for o, old in zip(t.optimizers, lrs):
            for group, lr in zip(o.param_groups, old):
                group["lr"] = lr * factor
        t.truncate_records()

    def rest_of_epoch(self, loader: Iterable) -> Iterator:
        """The batches of the current epoch not yet taken: after a mid-epoch resume, the epoch's shuffle is
        replayed from its saved RNG state and the batches already taken are skipped."""
        state, generator = self.trainer.state, self.trainer.generator
        set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
        if set_epoch is not None:  # DistributedSampler: a new shuffle each epoch, the same on all ranks
            set_epoch(state.epoch)
        resumed = None
        if state.batch_in_epoch > 0 and state.epoch_rng is not None:
            resumed = rng_state(generator)
            set_rng_state(state.epoch_rng, generator)
        else:
            state.epoch_rng = rng_state(generator)
        batches = iter(loader)
        for _ in range(state.batch_in_epoch):
            next(batches)
        if resumed is not None:
            set_rng_state(resumed, generator)
        return batches
