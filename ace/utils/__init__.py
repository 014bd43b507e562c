"""Helpers every layer may use: batches as loaders yield them, process groups, stacked graph loaders.

Imports nothing from the rest of ``ace``.
"""

from ace.utils.batches import batch_size, float_fields, split_batch, to_device
from ace.utils.loaders import StackedGraphLoader, StackedGraphs, stackable

__all__ = [
    "StackedGraphLoader",
    "StackedGraphs",
    "batch_size",
    "float_fields",
    "split_batch",
    "stackable",
    "to_device",
]
