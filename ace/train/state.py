"""Where a run is: what the Trainer's loop advances besides the model, the optimisers and the constrained
step's own state (:meth:`ace.PrimalDual.state_dict`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainState"]


@dataclass
class TrainState:
    """The loop's position and what its evaluations found.

    Attributes:
        epoch: epochs finished.
        batch_in_epoch: batches of the current epoch taken (a run resumed mid-epoch skips them).
        epoch_rng: the RNG state the current epoch's shuffle was drawn from (replayed on a mid-epoch resume).
        best: per validation metric, its best value and step (``{"val/loss": {"value", "step"}}``).
        last_eval: the last finite validation record (rank 0).
        val_step: the step of the last finite validation (every rank: the final pass agrees on it).
        test_scores: the final test record.
        selected: per variant, the best validation step and the metrics there (:mod:`ace.train.selection`).
        heldout: the held-out read-out of the final evaluations (:mod:`ace.train.heldout`).
        wall_time: seconds of training, summed over resumptions.
        rollbacks: rollbacks taken under ``on_nan="rollback"``.
        loaded_record: the last training record of a loaded checkpoint (the run's final record when a resumed
            run trains no further step).
    """

    epoch: int = 0
    batch_in_epoch: int = 0
    epoch_rng: dict | None = None
    best: dict[str, dict[str, float]] = field(default_factory=dict)
    last_eval: dict[str, Any] = field(default_factory=dict)
    val_step: int | None = None
    test_scores: dict[str, float] = field(default_factory=dict)
    selected: dict[str, Any] = field(default_factory=dict)
    heldout: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0
    rollbacks: int = 0
    loaded_record: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        """The fields a checkpoint holds (under the keys of checkpoint format 1)."""
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_rng": self.epoch_rng,
            "best": self.best,
            "last_eval": self.last_eval,
            "wall_time": self.wall_time,
            "rollbacks": self.rollbacks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.epoch_rng = state["epoch_rng"]
        self.best, self.last_eval = state["best"], state["last_eval"]
        self.val_step = self.last_eval.get("step")
        self.wall_time = state["wall_time"]
        self.rollbacks = state.get("rollbacks", 0)
        self.loaded_record = state.get("last_record") or {}
