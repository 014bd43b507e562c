"""A Trainer's evaluations: validation and test records, their non-finite checks, the best step of each
variant (:mod:`ace.train.selection`), the held-out read-out, and the tolerance starts measured before the
first step."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any

import torch

from ace.train.evaluation import evaluate, initial_value, track_best
from ace.train.heldout import DRAWS, heldout, small_batches
from ace.utils import distributed
from ace.utils.batches import split_batch, to_device

if TYPE_CHECKING:
    from ace.train.trainer import Trainer

__all__ = ["Validation"]


class Validation:
    """The evaluations of ``trainer``; what they find goes to ``trainer.state``."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def evaluate(
        self, loader: Iterable, variants: Collection[str] = ("model", "eq"), readout: bool = True
    ) -> dict[str, float]:
        """Loss, metrics and deviations of the model and of f_eq, see :func:`ace.train.evaluation.evaluate`;
        the per-layer deviations (on ``readout_batches``) only with ``readout``."""
        t = self.trainer
        return evaluate(
            t.model,
            loader,
            t.loss_fn,
            metrics=t.metrics,
            symmetry=t.symmetry,
            gate_names=list(t.gates),
            samples=t.eval_samples,
            seed=t.seed + 1,
            device=t.device,
            variants=variants,
            layer_batches=t.readout_batches if readout else 0,
        )

    def log(self, split: str, loader: Iterable, final: bool = False, readout: bool = True) -> dict[str, Any]:
        """Evaluate and log ``split`` (the per-layer deviations with ``readout``). Non-finite losses or
        weights go to the trainer's NaN policy (``skip``: this evaluation is not tracked and its checkpoint
        not written); at the end of a run (``final``) they always raise. Returns the record, with
        ``finite: False`` (not logged) after a skipped or rolled-back one."""
        t, state = self.trainer, self.trainer.state
        record: dict[str, Any] = {}
        problem = None
        if t.is_main:  # evaluation needs no collective: rank 0 does it while the others wait
            scores = self.evaluate(loader, readout=readout)
            record = {"step": t.step, "epoch": state.epoch, **{f"{split}/{k}": v for k, v in scores.items()}}
            losses = [k for k, v in scores.items() if k.split("/")[-1] == "loss" and not math.isfinite(v)]
            weights = [p.detach().reshape(-1) for p in t.model.parameters()]
            if losses:
                problem = f"{split} {losses[0]}"
            elif weights and not torch.isfinite(torch.cat(weights)).all():
                problem = "weights"
            if problem is None and split == "val":
                track_best(state.best, record, t.step)
                t.selection.update(record, t.step)
                state.last_eval = record
            elif problem is None:
                state.test_scores = record
            t.write(record)
        if distributed.any_rank(problem is not None, t.device):  # every rank takes the same way out
            t.on_nonfinite(problem or "evaluation (rank 0)", t.step, evaluated=True, final=final)
            return {**record, "finite": False}
        if split == "val":
            state.val_step = t.step  # on every rank (last_eval is rank 0's): the final pass agrees on it
        return record

    def resolve_auto_tolerances(self, train_loader: Iterable, batches: int = 8) -> None:
        """Fill ``start="auto"`` schedules with the value measured on the first ``batches`` training batches
        before the first step (:func:`ace.train.evaluation.initial_value`), averaged over ranks."""
        t = self.trainer
        if not t.core.needs_tolerance_starts():
            return
        inputs = [split_batch(to_device(b, t.device))[0] for b in itertools.islice(train_loader, batches)]
        generator = torch.Generator(device=t.device).manual_seed(t.seed + 2)
        t.core.resolve_tolerances(
            lambda c: distributed.mean(
                initial_value(c, t.model, t.symmetry, inputs, t.eval_samples, generator), t.device
            )
        )

    def final(self, val_loader: Iterable | None, test_loader: Iterable | None) -> None:
        """The end of a run: validation at the last step (unless just done), test, each variant's test at its
        best validation step (``state.selected``) and the held-out read-out (``state.heldout``)."""
        t, state = self.trainer, self.trainer.state
        # a loader's iterator draws a seed from torch's generator: the final evaluations leave it as training
        # did, so every checkpoint from here on (and a resumed finished run's) holds the same state
        if val_loader is not None and state.val_step != t.step:
            with torch.random.fork_rng(devices=[]):
                self.log("val", val_loader, final=True)
        if test_loader is not None:
            t.stop_if_signalled()
            with torch.random.fork_rng(devices=[]):
                self.log("test", test_loader, final=True)
        if t.is_main and val_loader is not None:
            splits = {"val": val_loader, **({"test": test_loader} if test_loader is not None else {})}
            final = {"val": state.last_eval, "test": state.test_scores}  # the final weights' records
            with torch.random.fork_rng(devices=[]):
                state.selected = t.selection.evaluate(self.evaluate, splits, t.device, final)
                state.heldout = self.read_out(val_loader, test_loader)

    def read_out(self, val_loader: Iterable, test_loader: Iterable | None = None) -> dict[str, Any]:
        """The held-out read-out (:mod:`ace.train.heldout`) of the best relaxed model on validation data and,
        under a symmetry with a test split, the whole model's on the test data too (key ``test``): the best
        step was chosen on the validation data, and the seeds of a task often share them, so a verdict about
        the data is worth confirming on data that chose nothing."""
        t = self.trainer
        kw: dict[str, Any] = {
            "symmetry": t.symmetry,
            "samples": max(t.eval_samples, DRAWS),
            "device": t.device,
        }
        best = t.selection.restored(t.device, only=["model"])
        with contextlib.closing(best):  # the final weights come back on closing
            next(best, None)  # the best step's weights, where they were kept (else the final ones)
            read = heldout(t.model, small_batches(val_loader), t.loss_fn, seed=t.seed + 3, **kw)
            if read and test_loader is not None and t.symmetry is not None:
                test = heldout(
                    t.model, small_batches(test_loader), t.loss_fn, seed=t.seed + 5, layers=False, **kw
                )
                read["test"] = {
                    k: test[k] for k in ("samples", "relaxed", "without", "benefit", "low", "high", "verdict")
                }
            return read
