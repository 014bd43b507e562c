"""Batches as loaders yield them: ``(inputs, target)`` pairs or torch_geometric ``Data``/``Batch``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["split_batch", "to_device", "batch_size", "float_fields"]


def split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """``(inputs, target)`` from a loader item: a pair, or a torch_geometric batch with ``.y``."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if hasattr(batch, "y") and hasattr(batch, "num_nodes"):
        return batch, batch.y
    raise TypeError(
        "a training batch must be an (inputs, target) pair or a torch_geometric Data/Batch with .y, "
        f"got {type(batch).__name__}"
    )


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move tensors inside tuples, lists, dicts and torch_geometric objects to ``device``."""
    if isinstance(obj, torch.Tensor) or hasattr(obj, "num_nodes"):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def batch_size(inputs: Any, target: torch.Tensor) -> int:
    """Number of samples in a batch: graphs for torch_geometric batches, else the target's first dim."""
    return int(getattr(inputs, "num_graphs", None) or target.shape[0])


def float_fields(inputs: Any, name: str = "inputs") -> Iterable[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every floating-point tensor in a batch of inputs."""
    if isinstance(inputs, torch.Tensor):
        if inputs.is_floating_point():
            yield name, inputs
    elif isinstance(inputs, (tuple, list)):
        for i, v in enumerate(inputs):
            yield from float_fields(v, f"{name}[{i}]")
    elif isinstance(inputs, dict):
        for k, v in inputs.items():
            yield from float_fields(v, str(k))
    elif hasattr(inputs, "num_nodes"):
        for k, v in inputs.items():
            yield from float_fields(v, k)
