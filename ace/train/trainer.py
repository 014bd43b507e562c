"""The Trainer: a training loop around :class:`ace.PrimalDual`, with evaluation, logs and checkpoints.

Each step: forward pass, task loss, ``PrimalDual.step`` (constraint values, primal-dual update); every
``log_every`` steps a record; every ``eval_every`` epochs an evaluation of the model and of f_eq (the best
validation step of each is kept, :mod:`ace.train.selection`) and a checkpoint from which the run continues
bit for bit. Faults (:mod:`ace.train.faults`): NaN/Inf are handled by ``on_nan``, SIGINT/SIGTERM stop the run
between steps with a checkpoint. Under ``torch.distributed`` rank 0 writes; see :mod:`ace.utils.distributed`.

The Trainer is composed of parts, each holding the trainer it serves: its loop state
(:class:`~ace.train.state.TrainState`), :class:`~ace.train.checkpointing.Checkpointing`,
:class:`~ace.train.validation.Validation`, the NaN policy and the stop signals (:mod:`ace.train.faults`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ace.constrained.constraints import Constraint
from ace.constrained.multipliers import DualSettings
from ace.constrained.primal_dual import PrimalDual, module_device
from ace.runs import layout
from ace.runs.metrics import MetricsLog, write_json
from ace.symmetry.action import Symmetry, call_model
from ace.train import summary as records
from ace.train.batch_checks import BatchChecks
from ace.train.checkpointing import Checkpointing
from ace.train.faults import Interrupted, NanPolicy, StopSignals
from ace.train.selection import BestCheckpoints
from ace.train.state import TrainState
from ace.train.validation import Validation
from ace.utils import distributed
from ace.utils.batches import split_batch, to_device
from ace.utils.loaders import Loader

__all__ = ["Trainer"]


class Trainer:
    """Train ``model`` on ``loss`` subject to equivariance ``constraints``.

    Args:
        model: any ``nn.Module``; for gate constraints, a model relaxed with :func:`ace.relax`.
        loss: ``(output, target) -> scalar``.
        optimizer: the primal optimiser over the model's parameters, or a list of optimisers that together
            hold them; the gates are stepped by the core (see :class:`ace.PrimalDual`, ``step_gates``).
        symmetry: the :class:`ace.Symmetry` the deviation is measured under (needed by deviation
            constraints and for the deviation reported at evaluation).
        constraints: the constrained problem; it and ``dual``, ``gate_schedule``, ``grad_clip``,
            ``gate_max_step``, ``lr_schedule``, ``schedule_gates``, ``slack_lr``, ``gate_lr``, ``step_gates``,
            ``max_multiplier`` and ``close_gates_below`` are passed on to :class:`ace.PrimalDual`.
        metrics: extra evaluation metrics ``{name: (output, target) -> batch mean}``.
        select: the validation metric that picks each variant's best step (``"loss"``, or a metric name
            such as ``"accuracy"``, maximised); see :mod:`ace.train.selection`.
        eval_samples: group samples per batch for the deviation reported at evaluation.
        readout_every: validation passes between two measurements of the per-layer deviations (the read-out
            of a relaxed model, ``1 + eval_samples`` forward passes per gated layer and batch); ``0``: only
            at the end. The final validation, the test and the best checkpoints' tests always have them.
        readout_batches: the per-layer deviations on the first validation (and test) batches only (``None``:
            all), a fixed subsample.
        log_dir: run directory (:mod:`ace.runs.layout`); ``None`` keeps records in ``trainer.history`` only. A
            directory that already holds a run is refused unless ``resume`` or ``overwrite``.
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
        symmetry: Symmetry | None = None,
        constraints: Sequence[Constraint] = (),
        dual: DualSettings = DualSettings(),
        metrics: dict[str, Callable] | None = None,
        gate_schedule: Callable[[int], float] | None = None,
        grad_clip: float | None = None,
        gate_max_step: float | None = 0.1,
        lr_schedule: Callable[[int], float] | None = None,
        schedule_gates: bool = True,
        select: str = "loss",
        slack_lr: float = 1e-2,
        gate_lr: float = 0.05,
        step_gates: bool = True,
        eval_samples: int = 4,
        readout_every: int = 1,
        readout_batches: int | None = None,
        log_dir: str | os.PathLike | None = None,
        log_every: int = 10,
        progress: bool | None = None,
        tensorboard: bool = False,
        seed: int = 0,
        device: str | torch.device | None = None,
        config: dict | None = None,
        on_nan: str = "stop",
        max_multiplier: float | None = 1e6,
        close_gates_below: float | None = None,
        max_rollbacks: int = 3,
        rollback_lr_factor: float = 0.5,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        if not (isinstance(eval_samples, int) and eval_samples >= 1):
            raise ValueError(f"eval_samples must be an integer >= 1, got {eval_samples!r}")
        if not (isinstance(readout_every, int) and readout_every >= 0):
            raise ValueError(f"readout_every must be an integer >= 0, got {readout_every!r}")
        if readout_batches is not None and not (isinstance(readout_batches, int) and readout_batches >= 1):
            raise ValueError(f"readout_batches must be an integer >= 1 or None, got {readout_batches!r}")
        if not (isinstance(log_every, int) and log_every >= 1):
            raise ValueError(f"log_every must be an integer >= 1, got {log_every!r}")
        self.model, self.loss_fn, self.symmetry = model, loss, symmetry
        self.metrics = dict(metrics or {})
        self.eval_samples, self.log_every, self.progress = eval_samples, log_every, progress
        self.readout_every, self.readout_batches = readout_every, readout_batches
        self.config, self.seed = config, seed
        self.nan_policy = NanPolicy(on_nan, max_rollbacks, rollback_lr_factor)
        self.device = torch.device(device) if device is not None else module_device(model)
        self.model.to(self.device)
        self.world_size, self.rank = distributed.world()
        self.is_main = self.rank == 0
        self.core = PrimalDual(
            model,
            optimizer,
            constraints,
            symmetry=symmetry,
            dual=dual,
            slack_lr=slack_lr,
            gate_lr=gate_lr,
            step_gates=step_gates,
            grad_clip=grad_clip,
            gate_max_step=gate_max_step,
            lr_schedule=lr_schedule,
            schedule_gates=schedule_gates,
            gate_schedule=gate_schedule,
            max_multiplier=max_multiplier,
            close_gates_below=close_gates_below,
            seed=seed,
            device=self.device,
        )
        self.optimizers = self.core.optimizers
        self.forward_model = distributed.wrap(self.model, self.device)  # the loss's forward pass
        self.checks = BatchChecks(model, symmetry)

        self.run_dir = Path(log_dir) if log_dir is not None else None  # read by every rank
        self.log_dir = self.run_dir if self.is_main else None  # written by rank 0 only
        if self.log_dir is not None and not resume:
            layout.claim(self.log_dir, overwrite)
        self.log = MetricsLog(
            self.log_dir / layout.METRICS if self.log_dir else None,
            self.log_dir / layout.TENSORBOARD if (self.log_dir and tensorboard) else None,
        )
        self.history: list[dict[str, Any]] = []
        #: called as ``observer(trainer, record)`` after every record is written (a pruner, a live plot);
        #: an exception it raises ends ``fit`` there, the records and the last checkpoint kept
        self.observers: list[Callable[[Trainer, dict[str, Any]], None]] = []
        #: the run's length in steps where the caller knows it before fit (set by ace.experiment)
        self.total_steps: int | None = None
        variants = ("model", "eq") if self.gates else ("model",)
        self.selection = BestCheckpoints(
            model, select, layout.checkpoints(self.log_dir) if self.log_dir else None, variants
        )
        self.state = TrainState()
        self.checkpoints = Checkpointing(self)
        self.validation = Validation(self)
        self.signals = StopSignals()

    # the constrained state lives in the core; these are its names on the trainer
    step = property(lambda self: self.core.step_count, lambda self, v: setattr(self.core, "step_count", v))
    constraints = property(lambda self: self.core.constraints)
    gates = property(lambda self: self.core.gates)
    slacks = property(lambda self: self.core.slacks)
    generator = property(lambda self: self.core.generator)
    tolerance_starts = property(lambda self: self.core.tolerance_starts)

    def multipliers(self) -> dict[str, torch.Tensor]:
        """Current multiplier values by constraint name (the fixed weight for penalty constraints)."""
        return self.core.multipliers()

    # ------------------------------------------------------------------ one step

    def train_step(self, batch: Any, record: bool | None = None) -> dict[str, Any] | None:
        """One primal-dual update on ``batch``; returns its log record when ``record`` (default: every
        ``log_every`` steps). A record holds what the step saw before its update: loss, constraint values,
        violations, gates, slacks and multipliers. A step whose numbers are not finite returns None after
        the NaN policy acted (skipped, or rolled back: ``state.rollbacks`` counts them).

        Raises:
            NonFiniteError: a NaN/Inf appeared and ``on_nan="stop"`` (or rollback is impossible).
        """
        if not self.model.training:  # train() walks every submodule: only when needed
            self.model.train()
        inputs, target = split_batch(to_device(batch, self.device))
        self.checks.batch(inputs, target, self.step + 1)
        with self.core.cached():  # bounded branches: one normalisation for the loss's and deviation's passes
            output = call_model(self.forward_model, inputs)
            loss = self.checks.loss_of(self.loss_fn, inputs, output, target)
            measured = self.core.measure(loss, inputs, output, stop=self.signals.received is not None)
        self.checks.done = True
        self.signals.agreed = measured.stop
        result = self.core.update(measured)
        for event in result.events:
            self.write(event)
        rollbacks = self.state.rollbacks
        if result.problem is not None:
            self.on_nonfinite(result.problem, result.step)
            if self.state.rollbacks != rollbacks:
                return None  # the state is the checkpoint's
        self.state.batch_in_epoch += 1
        if record is None:
            record = self.step % self.log_every == 0
        return result.log(epoch=self.state.epoch) if record and result.problem is None else None

    def write(self, record: dict[str, Any]) -> None:
        """Keep ``record`` in ``history``, write it to the logs and show it to the observers."""
        self.history.append(record)
        self.log.write(record)
        for observe in self.observers:
            observe(self, record)

    # ------------------------------------------------------------------ faults

    def on_nonfinite(self, quantity: str, step: int, evaluated: bool = False, final: bool = False) -> None:
        """Apply the NaN policy to a non-finite ``quantity`` of training step ``step`` or, when
        ``evaluated``, of the evaluation after it (``final``: the run's last one, which always stops): log
        the event, then skip, roll back to the last checkpoint, or raise :class:`NonFiniteError`."""
        policy = self.nan_policy
        self.write({"step": step, "event": "non_finite", "quantity": quantity, "policy": policy.on_nan})
        self.core.zero_grad()
        checkpoint = self.checkpoints.path
        saved = checkpoint is not None and checkpoint.exists()
        action = policy.decide(saved, self.state.rollbacks, final)
        if action == "stop":
            raise policy.error(quantity, step, evaluated, final, checkpoint, self.state.rollbacks)
        if action == "rollback":
            assert checkpoint is not None  # decide() rolls back only to a saved checkpoint
            self.checkpoints.roll_back(checkpoint, policy.factor)

    def stop_if_signalled(self) -> None:
        """A signal that arrived during the final evaluations: save and stop before the run is marked
        finished (``--resume`` evaluates again). One process only: ranks would not agree on it."""
        if self.world_size == 1 and self.signals.received is not None:
            path = self.save_checkpoint()
            where = f"checkpoint saved to {path}" if path is not None else "no log_dir: no checkpoint saved"
            raise Interrupted(
                f"stopped by a signal during the final evaluation after step {self.step}; {where}; "
                "continue with `ace train CONFIG --out DIR --resume`"
            )

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        train_loader: Loader,
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
            self.validation.resolve_auto_tolerances(train_loader)
        show = self.is_main and (self.progress if self.progress is not None else sys.stderr.isatty())
        bar = tqdm(total=total, initial=self.step, disable=not show, desc="train", dynamic_ncols=True)
        state = self.state
        started = time.perf_counter() - state.wall_time
        self.signals.install()
        try:
            while self.step < total:
                rollbacks = state.rollbacks
                epoch_done = self._run_epoch(train_loader, total, bar)
                state.wall_time = time.perf_counter() - started
                if state.rollbacks != rollbacks:  # rolled back: the loop continues from the checkpoint
                    bar.n = self.step
                    continue
                if not epoch_done:
                    break
                state.epoch += 1
                state.batch_in_epoch = 0
                last = self.step >= total
                good = True  # a checkpoint after a non-finite validation would not be a good state
                if val_loader is not None and (state.epoch % eval_every == 0 or last):
                    every = self.readout_every
                    readout = last or (every > 0 and (state.epoch // eval_every) % every == 0)
                    good = self.validation.log("val", val_loader, readout=readout).get("finite", True)
                    if state.rollbacks != rollbacks:
                        bar.n = self.step
                        continue
                if good and (state.epoch % checkpoint_every == 0 or last):
                    self.save_checkpoint()
            bar.close()
            state.wall_time = time.perf_counter() - started
            self.validation.final(val_loader, test_loader)
            self.stop_if_signalled()
        finally:
            self.signals.restore()
            bar.close()
        self.save_checkpoint()
        summary = self.summary()
        if self.log_dir:
            write_json(self.log_dir / layout.SUMMARY, summary)
        if print_summary and self.is_main:
            print(self.format_balance(summary))
        return summary

    def _run_epoch(self, loader: Loader, total: int, bar: tqdm) -> bool:
        """Run the rest of the current epoch; False if ``total`` steps were reached before its end, or a
        step rolled back (``state.rollbacks`` tells)."""
        rollbacks = self.state.rollbacks
        for batch in self.checkpoints.rest_of_epoch(loader):
            record = self.train_step(
                batch, record=(self.step + 1) % self.log_every == 0 or self.step + 1 == total
            )
            if self.state.rollbacks != rollbacks:
                return False
            bar.update(1)
            if record is not None:
                self.write(record)
                bar.set_postfix(_progress_postfix(record), refresh=False)
            # one process stops after the step the signal arrived in; several after the step that agreed on it
            if self.signals.agreed or (self.world_size == 1 and self.signals.received is not None):
                path = self.save_checkpoint()
                raise Interrupted(
                    f"stopped by a signal after step {self.step}; checkpoint saved to {path}; "
                    "continue with `ace train CONFIG --out DIR --resume`"
                    if path is not None
                    else f"stopped by a signal after step {self.step} (no log_dir: no checkpoint saved)"
                )
            if self.step >= total:
                return self.state.batch_in_epoch >= len(loader)
        return True

    # ------------------------------------------------------------------ state, checkpoints, evaluation

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit (:meth:`Checkpointing.state_dict`)."""
        return self.checkpoints.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.checkpoints.load_state_dict(state)

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write ``checkpoints/last.pt`` (or ``path``) atomically, keeping the one before as ``previous.pt``;
        see :meth:`Checkpointing.save`."""
        return self.checkpoints.save(path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a checkpoint written by :meth:`save_checkpoint` (tensors only: no code runs from it)."""
        self.checkpoints.load(path)

    def evaluate(
        self, loader: Iterable, variants: Collection[str] = ("model", "eq"), readout: bool = True
    ) -> dict[str, float]:
        """Loss, metrics and deviations of the model and of f_eq (:meth:`Validation.evaluate`)."""
        return self.validation.evaluate(loader, variants, readout)

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

    def last_record(self) -> dict[str, Any]:
        """The last training record: of this process's steps, else the one a loaded checkpoint held."""
        return next((r for r in reversed(self.history) if "loss" in r), self.state.loaded_record)

    # ------------------------------------------------------------------ summary

    def summary(self) -> dict[str, Any]:
        """The final state and metrics (schema: :mod:`ace.train.summary`)."""
        state = self.state
        return records.summary(
            self.core,
            self.last_record(),
            state.last_eval,
            steps=self.step,
            epochs=state.epoch,
            wall_time=state.wall_time,
            best=state.best,
            test=state.test_scores,
            selected=state.selected,
            heldout=state.heldout,
        )

    format_balance = staticmethod(records.format_balance)

    def close(self) -> None:
        self.log.close()


def _progress_postfix(record: dict[str, Any]) -> dict[str, str]:
    post = {"loss": f"{record['loss']:.3g}"}
    mults = [v for k, v in record.items() if k.endswith("/multiplier")]
    tols = [v for k, v in record.items() if k.endswith("/tolerance")]
    if mults:
        post["max_lambda"] = f"{max(mults, key=abs):.3g}"
    if tols:
        post["eps"] = f"{tols[0]:.3g}"
    return post
