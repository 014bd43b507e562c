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
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ace.runs.checkpoint import load as read_checkpoint
from ace.runs.checkpoint import save_atomic

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
                # the record that selected it: the variant's validation scores need no second evaluation
                self.steps[variant] = {"step": step, "value": value, "val": own(record, variant, "val")}
                state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                path = self.path(variant)
                if path is None:
                    self._memory[variant] = state
                else:
                    save_atomic({"step": step, "model": state}, path, previous=None)
                improved.append(variant)
        return improved

    def restored(self, device: torch.device, only: list[str] | None = None) -> Generator[tuple[str, int]]:
        """Load each variant's (or each of ``only``'s) best weights in turn, yielding ``(variant, step)``; the
        current weights come back afterwards."""
        current = copy.deepcopy(self.model.state_dict())
        try:
            for variant, best in self.steps.items():
                if only is not None and variant not in only:
                    continue
                path = self.path(variant)
                if path is None:
                    state = self._memory.get(variant)
                else:
                    state = read_checkpoint(path, device)["model"] if path.exists() else None
                if state is None:  # e.g. a run resumed in another process without a run directory
                    continue
                self.model.load_state_dict(state)
                yield variant, best["step"]
        finally:
            self.model.load_state_dict(current)

    def evaluate(
        self,
        evaluate: Callable[..., dict[str, float]],
        loaders: dict[str, Any],
        device: torch.device,
        final: dict[str, dict[str, Any]] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """``{variant: {"step", "val": {...}, "test": {...}}}``: each variant's own metrics (``eq/`` keys for
        f_eq, without the prefix) at its best validation step, on every loader given.

        No checkpoint is evaluated twice: the validation scores are those of the record that selected the
        step; a variant whose best step is the final one reads ``final`` (``{split: record}`` of the final
        weights, with their ``step``); the variants that share a best step are evaluated together, and only
        the variants asked for. ``evaluate(loader, variants=...)`` is :func:`ace.train.evaluation.evaluate`.
        """
        final = final or {}
        out: dict[str, dict[str, Any]] = {}
        pending: dict[int, list[str]] = {}  # best step -> variants still to evaluate there
        for variant, best in self.steps.items():
            entry: dict[str, Any] = {
                "step": best["step"],
                "selected_on": f"val/{VARIANTS[variant]}{self.metric}",
            }
            for split in loaders:
                if split == "val" and "val" in best:
                    entry["val"] = best["val"]
                elif final.get(split, {}).get("step") == best["step"]:
                    entry[split] = own(final[split], variant, split)
            out[variant] = entry
            if any(split not in entry for split in loaders):
                pending.setdefault(best["step"], []).append(variant)
        for _, step in self.restored(device, only=[vs[0] for vs in pending.values()]):
            variants = pending[step]
            for split, loader in loaders.items():
                if any(split not in out[v] for v in variants):
                    scores = {f"{split}/{k}": v for k, v in evaluate(loader, variants=variants).items()}
                    for v in variants:
                        out[v].setdefault(split, own(scores, v, split))
        # a variant whose weights are gone (resumed in another process without a run directory) is left out
        return {v: entry for v, entry in out.items() if all(split in entry for split in loaders)}


def own(record: dict[str, Any], variant: str, split: str) -> dict[str, Any]:
    """A variant's scores in an evaluation record of ``split``: ``split/eq/...`` for f_eq, the rest (without
    ``eq/``) for the model; keys without their prefixes."""
    prefix = f"{split}/{VARIANTS[variant]}"
    return {
        k[len(prefix) :]: v
        for k, v in record.items()
        if k.startswith(prefix) and (variant != "model" or not k.startswith(f"{split}/eq/"))
    }
