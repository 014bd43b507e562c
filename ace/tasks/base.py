"""The contract every built-in task fulfils: data, model, symmetry, loss and metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ace.symmetry.action import Symmetry
from ace.utils.loaders import MapDataset

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Batch-mean classification accuracy of ``logits`` (the arg-max class) against integer ``target``."""
    return (logits.argmax(-1) == target).float().mean()


@dataclass
class Task:
    """A runnable experiment: three splits, a plain model and the symmetry the deviation measures.

    Attributes:
        train, val, test: datasets whose items are ``(inputs, target)`` pairs or torch_geometric
            ``Data`` objects carrying the target in ``.y``.
        model: the plain (unrelaxed) model.
        symmetry: how the group acts on the model's inputs and output.
        loss: ``(output, target) -> scalar`` training loss.
        metrics: batch-mean evaluation metrics by name, e.g. ``{"mse": ...}``.
        relax_where: which submodules ``ace.relax`` gates; ``None`` if the task has no gated layers.
        relax_branch: factory ``(name, module) -> f_neq``; ``None`` uses relax's default MLP branch.
        example: a small batch of inputs used to size lazily built branches.
        layer_symmetries: per submodule name, the action on that layer's own inputs and output, for the
            per-layer audit of ``ace probe`` (:func:`ace.diagnostics.audit`); ``None``: not declared.
    """

    train: MapDataset
    val: MapDataset
    test: MapDataset
    model: nn.Module
    symmetry: Symmetry
    loss: Metric
    metrics: dict[str, Metric] = field(default_factory=dict)
    relax_where: Callable[[str, nn.Module], bool] | None = None
    relax_branch: Callable[[str, nn.Module], nn.Module] | None = None
    example: Any = None
    layer_symmetries: dict[str, Any] | None = None
