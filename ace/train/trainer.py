"""The Trainer: a training loop around :class:`ace.PrimalDual`, with evaluation, logs and checkpoints.

Each step: forward pass, task loss, ``PrimalDual.step`` (constraint values, primal-dual update); every
``log_every`` steps a record; every ``eval_every`` epochs an evaluation of the model and of f_eq (the best
validation step of each is kept, :mod:`ace.train.selection`) and a checkpoint from which the run continues
bit for
bit. Faults (:mod:`ace.train.faults`): NaN/Inf are handled by ``on_nan``, SIGINT/SIGTERM stop the run between
steps with a checkpoint. Under ``torch.distributed`` rank 0 writes; see :mod:`ace.utils.distributed`.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ace.constrained.constraints import Constraint
from ace.constrained.dual import DualSettings
from ace.constrained.primal_dual import PrimalDual, module_device
from ace.runs import layout as run_dir
from ace.runs.metrics import MetricsLog, write_json
from ace.symmetry.action import call_model
from ace.train import summary as records
from ace.train.batch_checks import BatchChecks
from ace.train.checkpointing import RunState
from ace.train.faults import NAN_POLICIES, Interrupted, RolledBack, catch_signals
from ace.train.selection import BestCheckpoints
from ace.train.validation import RunEvaluation
from ace.utils import distributed
from ace.utils.batches import split_batch, to_device

__all__ = ["Trainer"]


class Trainer(RunState, RunEvaluation):
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
        symmetry: Any = None,
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
        if on_nan not in NAN_POLICIES:
            raise ValueError(f"on_nan must be one of {NAN_POLICIES}, got {on_nan!r}")
        self.model, self.loss_fn, self.symmetry = model, loss, symmetry
        self.metrics = dict(metrics or {})
        self.eval_samples, self.log_every, self.progress = eval_samples, log_every, progress
        self.readout_every, self.readout_batches = readout_every, readout_batches
        self.config, self.seed = config, seed
        self.on_nan, self.max_rollbacks, self.rollback_lr_factor = on_nan, max_rollbacks, rollback_lr_factor
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
            run_dir.claim(self.log_dir, overwrite)
        self.log = MetricsLog(
            self.log_dir / run_dir.METRICS if self.log_dir else None,
            self.log_dir / "tensorboard" if (self.log_dir and tensorboard) else None,
        )
        self.history: list[dict[str, Any]] = []
        #: called as ``observer(trainer, record)`` after every record is written (a pruner, a live plot);
        #: an exception it raises ends ``fit`` there, the records and the last checkpoint kept
        self.observers: list[Callable[[Trainer, dict[str, Any]], None]] = []
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best: dict[str, dict[str, float]] = {}
        variants = ("model", "eq") if self.gates else ("model",)
        self.selection = BestCheckpoints(
            model, select, run_dir.checkpoints(self.log_dir) if self.log_dir else None, variants
        )
        self.last_eval: dict[str, float] = {}
        self.test_scores: dict[str, float] = {}
        self.selected: dict[str, Any] = {}
        self.heldout: dict[
            str, Any
        ] = {}  # the held-out read-out of the final evaluations (ace.train.heldout)
        self._val_step: int | None = None  # the step of the last finite validation
        self.wall_time = 0.0
        self._epoch_rng: dict | None = None
        self._loaded_record: dict[str, Any] = {}  # the last training record of a loaded checkpoint
        self.rollbacks = 0
        self._stop_signal: int | None = None
        self._stop_agreed = False

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
        violations, gates, slacks and multipliers.

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
            measured = self.core.measure(loss, inputs, output, stop=self._stop_signal is not None)
        self.checks.done = True
        self._stop_agreed = measured.stop
        result = self.core.update(measured)
        for event in result.events:
            self._write(event)
        if result.problem is not None:
            self._handle_nonfinite(result.problem, result.step)  # raises, unless the step is skipped
        self.batch_in_epoch += 1
        if record is None:
            record = self.step % self.log_every == 0
        if result.problem is None and record:
            return result.log(epoch=self.epoch)
        return None

    def _write(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self.log.write(record)
        for observe in self.observers:
            observe(self, record)

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
        self._stop_signal, self._stop_agreed = None, False  # a new fit() after an Interrupted starts afresh
        restore_signals = catch_signals(lambda signum: setattr(self, "_stop_signal", signum))
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
                        every = self.readout_every
                        readout = last or (every > 0 and (self.epoch // eval_every) % every == 0)
                        good = self._log_eval("val", val_loader, readout=readout).get("finite", True)
                except RolledBack:
                    bar.n = self.step
                    continue
                if good and (self.epoch % checkpoint_every == 0 or last):
                    self.save_checkpoint()
            bar.close()
            self.wall_time = time.perf_counter() - started
            self._final_evaluations(val_loader, test_loader)
            self._stop_if_signalled()
        finally:
            restore_signals()
            bar.close()
        self.save_checkpoint()
        summary = self.summary()
        if self.log_dir:
            write_json(self.log_dir / run_dir.SUMMARY, summary)
        if print_summary and self.is_main:
            print(self.format_balance(summary))
        return summary

    def _run_epoch(self, loader: Iterable, total: int, bar) -> bool:
        """Run the rest of the current epoch; False if ``total`` steps were reached before its end."""
        for batch in self._rest_of_epoch(loader):
            record = self.train_step(
                batch, record=(self.step + 1) % self.log_every == 0 or self.step + 1 == total
            )
            bar.update(1)
            if record is not None:
                self._write(record)
                bar.set_postfix(_progress_postfix(record), refresh=False)
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

    # ------------------------------------------------------------------ summary

    def summary(self) -> dict[str, Any]:
        """The final state and metrics (schema: :mod:`ace.train.summary`)."""
        return records.summary(
            self.core,
            self.last_record(),
            self.last_eval,
            steps=self.step,
            epochs=self.epoch,
            wall_time=self.wall_time,
            best=self.best,
            test=self.test_scores,
            selected=self.selected,
            heldout=self.heldout,
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
