"""Clear errors for batches that do not fit the model, the loss or the symmetry (checked on the first)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ace.symmetry.action import Symmetry
from ace.utils.batches import batch_size, float_fields

__all__ = ["BatchChecks"]


class BatchChecks:
    """Checks of the first batch (and of every batch for emptiness), with messages that name the field."""

    def __init__(self, model: nn.Module, symmetry: Symmetry | None) -> None:
        self.model, self.symmetry = model, symmetry
        self.done = False

    def batch(self, inputs: Any, target: torch.Tensor, step: int) -> None:
        """Empty batches (always), input dtypes that differ from the model's, missing fields, wrong shapes."""
        if batch_size(inputs, target) == 0:
            raise ValueError(f"empty batch in step {step}: the loader yielded a batch with no samples")
        if self.done:
            return
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        for name, tensor in float_fields(inputs):
            if dtype is not None and tensor.dtype != dtype:
                raise ValueError(
                    f"input field '{name}' has dtype {tensor.dtype}, but the model's parameters are {dtype}"
                )
        self.output(inputs, None)  # missing fields and wrong shapes, before the model trips on them

    def loss_of(self, loss_fn: Callable, inputs: Any, output: Any, target: torch.Tensor) -> torch.Tensor:
        """``loss_fn(output, target)``; on the first batch with clear errors for an output that does not fit
        the symmetry, a target that does not fit the model's output and a loss that is not a scalar."""
        if self.done:
            return loss_fn(output, target)
        self.output(inputs, output)
        try:
            loss = loss_fn(output, target)
        except (RuntimeError, ValueError) as err:
            if (
                isinstance(output, torch.Tensor)
                and target.is_floating_point()
                and output.shape != target.shape
            ):
                lead = output.dim() > 0 and target.dim() > 0 and output.shape[0] == target.shape[0]
                shape = lambda t: str(("B", *t.shape[1:]) if lead else tuple(t.shape)).replace("'", "")  # noqa: E731
                raise ValueError(
                    f"target shape {shape(target)} does not match model output {shape(output)}"
                ) from err
            raise
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"the loss must return a scalar tensor, got {got}: reduce it (e.g. .mean())")
        return loss

    def output(self, inputs: Any, output: Any) -> None:
        """Named fields present with the right shapes, output (unless None) fitting its representation."""
        if self.symmetry is None:
            return
        try:
            self.symmetry.check(inputs, output)
        except ValueError as err:
            raise ValueError(f"the batch does not fit the symmetry {self.symmetry!r}: {err}") from err
