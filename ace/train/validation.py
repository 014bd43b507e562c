"""The Trainer's evaluations: validation and test records, their non-finite checks, the best step of each
variant (:mod:`ace.train.selection`) and the tolerance starts measured before the first step."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Collection, Iterable
from typing import Any

import torch

from ace.train.evaluation import evaluate, initial_value, track_best
from ace.train.heldout import heldout, small_batches
from ace.utils import distributed
from ace.utils.batches import split_batch, to_device

__all__ = ["RunEvaluation"]


class RunEvaluation:
    """Evaluation of :class:`ace.Trainer` (a part of it, not used alone)."""

    def evaluate(
        self, loader: Iterable, variants: Collection[str] = ("model", "eq"), readout: bool = True
    ) -> dict[str, float]:
        """Loss, metrics and deviations of the model and of f_eq, see :func:`ace.train.evaluation.evaluate`;
        the
        per-layer deviations (on ``readout_batches``) only with ``readout``."""
        return evaluate(
            self.model,
            loader,
            self.loss_fn,
            metrics=self.metrics,
            symmetry=self.symmetry,
            gate_names=list(self.gates),
            samples=self.eval_samples,
            seed=self.seed + 1,
            device=self.device,
            variants=variants,
            layer_batches=self.readout_batches if readout else 0,
        )

    def _log_eval(
        self, split: str, loader: Iterable, final: bool = False, readout: bool = True
    ) -> dict[str, Any]:
        """Evaluate and log ``split`` (the per-layer deviations with ``readout``). Non-finite losses or
        weights are handled by ``on_nan`` (``skip``: this evaluation is not tracked and its checkpoint not
        written); at the end of a run (``final``) they always raise: a run that ends non-finite is not
        finished. Returns the record, with ``finite: False`` (not logged) after a skipped one."""
        record, problem = {}, None
        if self.is_main:  # evaluation needs no collective: rank 0 does it while the others wait
            scores = self.evaluate(loader, readout=readout)
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
                track_best(self.best, record, self.step)
                self.selection.update(record, self.step)
                self.last_eval = record
            elif problem is None:
                self.test_scores = record
            self._write(record)
        if distributed.any_rank(problem is not None, self.device):  # every rank takes the same way out
            self._handle_nonfinite(problem or "evaluation (rank 0)", self.step, evaluated=True, final=final)
            return {**record, "finite": False}
        if split == "val":
            self._val_step = self.step  # on every rank (last_eval is rank 0's): the final pass agrees on it
        return record

    def _resolve_auto_tolerances(self, train_loader: Iterable, batches: int = 8) -> None:
        """Fill ``start="auto"`` schedules with the value measured on the first ``batches`` training batches
        before the first step (:func:`ace.train.evaluation.initial_value`), averaged over ranks."""
        if not any(getattr(c.tolerance, "needs_start", False) for c in self.constraints):
            return
        inputs = [split_batch(to_device(b, self.device))[0] for b in itertools.islice(train_loader, batches)]
        generator = torch.Generator(device=self.device).manual_seed(self.seed + 2)
        self.core.resolve_tolerances(
            lambda c: distributed.mean(
                initial_value(c, self.model, self.symmetry, inputs, self.eval_samples, generator), self.device
            )
        )

    def _final_evaluations(self, val_loader: Iterable | None, test_loader: Iterable | None) -> None:
        """The end of a run: validation at the last step (unless just done), test, and each variant's test
        at its best validation step (``self.selected``)."""
        # a loader's iterator draws a seed from torch's generator: the final evaluations leave it as training
        # did, so every checkpoint from here on (and a resumed finished run's) holds the same state
        if val_loader is not None and self._val_step != self.step:
            with torch.random.fork_rng(devices=[]):
                self._log_eval("val", val_loader, final=True)
        if test_loader is not None:
            self._stop_if_signalled()
            with torch.random.fork_rng(devices=[]):
                self._log_eval("test", test_loader, final=True)
        if self.is_main and val_loader is not None:
            splits = {"val": val_loader, **({"test": test_loader} if test_loader is not None else {})}
            final = {"val": self.last_eval, "test": self.test_scores}  # the final weights' records
            with torch.random.fork_rng(devices=[]):
                self.selected = self.selection.evaluate(self.evaluate, splits, self.device, final)
                self.heldout = self.read_out(val_loader)

    def read_out(self, val_loader: Iterable) -> dict[str, Any]:
        """The held-out read-out (:mod:`ace.train.heldout`) of the best relaxed model on the validation
        set."""
        metric = self.selection.metric
        score = self.loss_fn if metric == "loss" else self.metrics[metric]
        args = (small_batches(val_loader), score, metric)
        kwargs = dict(
            symmetry=self.symmetry, samples=self.eval_samples, seed=self.seed + 3, device=self.device
        )
        best = self.selection.restored(self.device, only=["model"])
        with contextlib.closing(best):  # the final weights come back on closing
            next(best, None)  # the best step's weights, where they were kept (else the final ones)
            return heldout(self.model, *args, **kwargs)
