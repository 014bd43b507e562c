"""Model selection as the papers report it: test at the best validation step, per variant.

A relaxed model has two variants to deploy: the model as trained (``f_eq + gamma f_neq``) and ``f_eq``
alone (gates dropped). Each is selected on its own validation metric: the step where the relaxed
model validates best need not be the one where ``f_eq`` does. :class:`BestCheckpoints` keeps, per
variant, the weights of the best validation step (``checkpoints/best_<variant>.pt`` in a run
directory, in memory otherwise) and evaluates them on the test set at the end of training.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load as read_checkpoint
from .checkpoint import save_atomic

__all__ = ["BestCheckpoints", "VARIANTS", "higher_is_better"]

#: variant name -> prefix of its keys in an evaluation record ("eq/" = f_eq, gates dropped)
VARIANTS = {"model": "", "eq": "eq/"}


def higher_is_better(metric: str) -> bool:
    """Accuracy-like metrics are maximised, losses and errors minimised."""
    return "accuracy" in metric or metric.endswith("auc")


class BestCheckpoints:
    """Weights of the best validation step of each variant.

    Args:
        model: the model whose ``state_dict`` is kept.
        metric: the validation metric that selects (a key of ``Trainer.evaluate``'s result, e.g. ``"loss"``
            or ``"accuracy"``); each variant reads its own (``"eq/accuracy"`` for f_eq).
        folder: where ``best_<variant>.pt`` go (``None``: kept in memory).
        variants: the variants to track (``("model",)`` for a model without gates).
    """

    def __init__(self, model: nn.Module, metric: str, folder: Path | None, variants: tuple[str, ...]) -> None:
        self.model, self.metric, self.folder, self.variants = model, metric, folder, variants
        self.higher = higher_is_better(metric)
        self.steps: dict[str, dict[str, Any]] = {}  # variant -> {"step", "value"}, saved in checkpoints
        self._memory: dict[str, dict[str, torch.Tensor]] = {}

    def path(self, variant: str) -> Path | None:
        return self.folder / f"best_{variant}.pt" if self.folder is not None else None

    def update(self, record: dict[str, Any], step: int) -> list[str]:
        """Keep the weights for every variant whose validation ``record`` (``val/...`` keys) improved."""
        improved = []
        for variant in self.variants:
            value = record.get(f"val/{VARIANTS[variant]}{self.metric}")
            if value is None or not math.isfinite(value):
                continue
            best = self.steps.get(variant)
            if best is None or (value > best["value"] if self.higher else value < best["value"]):
                self.steps[variant] = {"step": step, "value": value}
                state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                if self.folder is None:
                    self._memory[variant] = state
                else:
                    save_atomic({"step": step, "model": state}, self.path(variant), previous=None)
                improved.append(variant)
        return improved

    def restored(self, device: torch.device) -> Iterator[tuple[str, int]]:
        """Load each variant's best weights in turn, yielding ``(variant, step)``; the current weights
        come back afterwards."""
        current = copy.deepcopy(self.model.state_dict())
        try:
            for variant, best in self.steps.items():
                if self.folder is None:
                    state = self._memory.get(variant)
                else:
                    path = self.path(variant)
                    state = read_checkpoint(path, device)["model"] if path.exists() else None
                if state is None:  # e.g. a run resumed in another process without a run directory
                    continue
                self.model.load_state_dict(state)
                yield variant, best["step"]
        finally:
            self.model.load_state_dict(current)

    def evaluate(
        self, evaluate: Callable[[Any], dict[str, float]], loaders: dict[str, Any], device: torch.device
    ) -> dict[str, dict[str, Any]]:
        """``{variant: {"step", "val": {...}, "test": {...}}}``: each variant's own metrics (``eq/`` keys for
        f_eq, without the prefix) at its best validation step, on every loader given."""
        out = {}
        for variant, step in self.restored(device):
            prefix = VARIANTS[variant]
            entry: dict[str, Any] = {"step": step, "selected_on": f"val/{prefix}{self.metric}"}
            for split, loader in loaders.items():
                scores = evaluate(loader)
                entry[split] = {
                    k[len(prefix) :]: v
                    for k, v in scores.items()
                    if k.startswith(prefix) and (prefix or not k.startswith("eq/"))
                }
            out[variant] = entry
        return out
