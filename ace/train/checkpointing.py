"""The Trainer's state on disk: what a checkpoint holds, how a run continues from it, and how a fault
rolls back to it (the ``on_nan`` policies of :class:`ace.Trainer`).

A checkpoint (``checkpoints/last.pt``, :mod:`ace.runs.layout`) holds the model, the primal and dual
optimisers,
the multipliers and slacks (:meth:`ace.PrimalDual.state_dict`), the epoch and the batch within it, every RNG
state and the epoch's shuffle, the best validation values and steps, and the wall time: a run continued from
it takes the same steps as one never stopped.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ace.runs import layout as run_dir
from ace.runs.checkpoint import CHECKPOINT_FORMAT, CheckpointError, rng_state, save_atomic, set_rng_state
from ace.runs.checkpoint import load as read_checkpoint
from ace.train.faults import Interrupted, NonFiniteError, RolledBack
from ace.utils import distributed

__all__ = ["RunState"]


class RunState:
    """Checkpoints, resumption and fault handling of :class:`ace.Trainer` (a part of it, not used alone)."""

    def _handle_nonfinite(
        self, quantity: str, step: int, evaluated: bool = False, final: bool = False
    ) -> None:
        """Apply ``on_nan`` to a non-finite ``quantity`` of training step ``step`` or, when ``evaluated``, of
        the evaluation after it (``final``: the run's last one, which always stops)."""
        self._write({"step": step, "event": "non_finite", "quantity": quantity, "policy": self.on_nan})
        self.core.cooper_optimizer.zero_grad()
        if self.on_nan == "skip" and not final:
            return
        checkpoint = self._checkpoint_path()
        saved = checkpoint is not None and checkpoint.exists()
        if self.on_nan == "rollback" and saved and self.rollbacks < self.max_rollbacks and not final:
            rollbacks = self.rollbacks + 1
            lrs = [[group["lr"] for group in o.param_groups] for o in self.optimizers]
            self.load_checkpoint(checkpoint)  # restores the checkpoint's lr: scale the lr in use instead
            self.rollbacks = rollbacks
            self.core.rates.factor = self.rollback_lr_factor**rollbacks
            for o, old in zip(self.optimizers, lrs):
                for group, lr in zip(o.param_groups, old):
                    group["lr"] = lr * self.rollback_lr_factor
            self.truncate_records()
            raise RolledBack
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
            "Lower the learning rates, clip gradients (optim.grad_clip), or set train.on_nan to skip or "
            "rollback"
        )

    def _checkpoint_path(self) -> Path | None:
        return run_dir.last_checkpoint(self.run_dir) if self.run_dir else None

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

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit: model, optimisers, multipliers, slacks, RNG."""
        core = self.core.state_dict()
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            **{
                k: core[k]
                for k in (
                    "cooper_optimizer",
                    "cmp",
                    "slacks",
                    "step",
                    "tolerance_starts",
                    "loss_scale",
                    "closed_gates",
                )
            },
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "rng": rng_state(self.generator),
            "epoch_rng": self._epoch_rng,
            "best": self.best,
            "selected_steps": self.selection.steps,
            "last_eval": self.last_eval,
            "wall_time": self.wall_time,
            "rollbacks": self.rollbacks,
            # the run's final record even for a resumed run that trains no further step (summary.json)
            "last_record": self.last_record(),
            "ceiling_warned": core["ceiling_warned"],
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
            self.core.load_state_dict(
                {
                    **state,
                    "generator": state["rng"]["generator"],
                    "lr_factor": self.rollback_lr_factor ** state.get("rollbacks", 0),
                }
            )
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"checkpoint does not fit this trainer: {err}") from err
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        set_rng_state(state["rng"], self.generator)
        self._epoch_rng = state["epoch_rng"]
        self.best, self.last_eval = state["best"], state["last_eval"]
        self._val_step = self.last_eval.get("step")
        self.selection.steps = state.get("selected_steps", {})
        self.wall_time = state["wall_time"]
        self.rollbacks = state.get("rollbacks", 0)
        self._loaded_record = state.get("last_record") or {}

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
                distributed.barrier()
                return path
        path = save_atomic(self.state_dict(), path)
        distributed.barrier()
        return path

    def last_record(self) -> dict[str, Any]:
        """The last training record: of this process's steps, else the one a loaded checkpoint held."""
        return next((r for r in reversed(self.history) if "loss" in r), self._loaded_record)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a checkpoint written by :meth:`save_checkpoint` (tensors only: no code runs from it)."""
        self.load_state_dict(read_checkpoint(path, self.device))

    def _rest_of_epoch(self, loader: Iterable) -> Iterator:
        """The batches of the current epoch not yet taken: after a mid-epoch resume, the epoch's shuffle is
        replayed from its saved RNG state and the batches already taken are skipped."""
        sampler = getattr(loader, "sampler", None)
        if hasattr(
            sampler, "set_epoch"
        ):  # DistributedSampler: a new shuffle each epoch, the same on all ranks
            sampler.set_epoch(self.epoch)
        resumed = None
        if self.batch_in_epoch > 0 and self._epoch_rng is not None:
            resumed = rng_state(self.generator)
            set_rng_state(self._epoch_rng, self.generator)
        else:
            self._epoch_rng = rng_state(self.generator)
        batches = iter(loader)
        for _ in range(self.batch_in_epoch):
            next(batches)
        if resumed is not None:
            set_rng_state(resumed, self.generator)
        return batches

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
