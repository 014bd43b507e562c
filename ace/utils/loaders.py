"""Loaders for a data set: :func:`make_loader` picks one; graphs that share their nodes and edges get a loader
that collates the data set once and indexes batches.

torch_geometric's DataLoader builds every batch with ``Batch.from_data_list``, a Python loop over graphs
and attributes, a visible share of an N-body step (docs/performance.md). When all graphs have the same number
of nodes ``n`` and the same ``edge_index`` (N-body: 5 particles, complete graph), each attribute can be
stacked once into a ``(num_graphs, ...)`` tensor, and the batch of graphs ``i_0, ..., i_{B-1}`` is

    x = stacked_x[i].flatten(0, 1),        edge_index = [edge_index + b n  for b = 0, ..., B - 1],
    batch = [b repeated n times],           ptr = [0, n, 2 n, ..., B n],

the ``Batch`` that ``Batch.from_data_list`` makes of the same graphs, down to ``num_graphs`` and the
slice and increment records that ``get_example`` reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized
from typing import Any, Protocol, TypeGuard, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["make_loader", "Loader", "MapDataset", "StackedGraphLoader", "StackedGraphs", "stackable"]

MapDataset = Dataset[Any] | Sequence[Any]


class Loader(Protocol):
    """What a training loop reads: an epoch's batches, and how many there are (a DataLoader, or a list)."""

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...


"""A map-style data set, ``data[i]`` and ``len(data)``: a torch ``Dataset`` or a plain list of samples."""


def _layout(graph: Any) -> dict[str, tuple[int | None, int]] | None:
    """``key -> (cat_dim, inc)`` for each attribute of ``graph`` as torch_geometric collates it, or None
    when one is not a tensor concatenated along dim 0 as it is (``inc == 0``) or a shared index tensor
    concatenated along its last dim and incremented by ``inc > 0`` per graph."""
    layout = {}
    for key, value in graph.items():
        if key in ("batch", "ptr") or type(value) is not Tensor or value.layout != torch.strided:
            return None
        cat_dim, inc = graph.__cat_dim__(key, value), graph.__inc__(key, value)
        if type(inc) is not int:
            return None
        stacked = inc == 0 and cat_dim in (0, None)
        shared = inc > 0 and value.dim() > 0 and cat_dim in (-1, value.dim() - 1)
        if not (stacked or shared):
            return None
        layout[key] = (cat_dim, inc)
    return layout


def stackable(graphs: Any) -> TypeGuard[list[Any] | tuple[Any, ...]]:
    """Whether ``graphs`` is a non-empty list of torch_geometric ``Data`` of one class that
    :class:`StackedGraphs` batches exactly like ``Batch.from_data_list``: the same attributes, plain
    tensors of equal shape, dtype and device, the same number of nodes, and index attributes
    (``edge_index``) equal in every graph."""
    from torch_geometric.data import Batch, Data

    if not isinstance(graphs, (list, tuple)) or not graphs:
        return False
    first = graphs[0]
    if not isinstance(first, Data) or isinstance(first, Batch):
        return False
    layout, num_nodes = _layout(first), first.num_nodes
    if layout is None or num_nodes is None:
        return False
    for graph in graphs:
        values = dict(graph.items())
        if type(graph) is not type(first) or values.keys() != layout.keys() or graph.num_nodes != num_nodes:
            return False
        for key, (_, inc) in layout.items():
            value, like = values[key], first[key]
            if not (
                type(value) is Tensor
                and (value.layout, value.shape, value.dtype, value.device)
                == (like.layout, like.shape, like.dtype, like.device)
                and (inc == 0 or torch.equal(value, like))
            ):
                return False
    return True


class StackedGraphs(Dataset):
    """:func:`stackable` graphs, collated once. ``dataset[i]`` is graph ``i``;
    ``dataset.__getitems__([i, j, ...])``, what a DataLoader fetches for one batch, is their ``Batch``.

    Args:
        graphs: the graphs; raises ValueError unless :func:`stackable`.
    """

    def __init__(self, graphs: Sequence) -> None:
        if not stackable(graphs):
            raise ValueError("StackedGraphs needs Data graphs with equal nodes, attributes and edge_index")
        first, layout = graphs[0], _layout(graphs[0])
        assert layout is not None, "stackable graphs have a layout"
        self.graphs = graphs
        self.num_nodes: int = first.num_nodes
        self._cls = type(first)
        self._inc = {key: inc for key, (_, inc) in layout.items()}
        self._values = {}
        for key, (cat_dim, inc) in layout.items():
            if inc:  # a shared index attribute, as it is
                self._values[key] = first[key].clone()
            else:  # (num_graphs, rows, ...): rows along the concatenated dim, a new one for scalars
                self._values[key] = torch.stack(
                    [g[key] if cat_dim == 0 and g[key].dim() else g[key][None] for g in graphs]
                )
        self._device = first[next(iter(layout))].device

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, index: int) -> Any:
        return self.graphs[index]

    def __getitems__(self, indices: list[int]) -> Any:
        from torch_geometric.data import Batch

        size, device = len(indices), self._device
        index = torch.as_tensor(indices, device=device)
        graph = torch.arange(size + 1)  # slice and increment records on the CPU, as torch_geometric has them
        out = Batch(_base_cls=self._cls)
        slices, incs = {}, {}
        for key, value in self._values.items():
            inc = self._inc[key]
            if inc == 0:
                out[key] = value[index].flatten(0, 1)
                slices[key], incs[key] = graph * value.size(1), torch.zeros(size, dtype=torch.long)
            else:
                offsets = graph[:-1].to(device=device, dtype=value.dtype) * inc
                out[key] = (value.unsqueeze(-2) + offsets[:, None]).flatten(-2)
                slices[key], incs[key] = graph * value.size(-1), graph[:-1] * inc
        out.batch = torch.arange(size, device=device).repeat_interleave(self.num_nodes)
        out.ptr = graph.to(device) * self.num_nodes
        out._num_graphs, out._slice_dict, out._inc_dict = size, slices, incs
        return out


def _as_is(batch: Any) -> Any:
    return batch


class StackedGraphLoader(DataLoader):
    """torch_geometric's DataLoader for :func:`stackable` graphs, without collating each batch.

    A ``torch.utils.data.DataLoader`` with the same arguments over a :class:`StackedGraphs` of the same
    length: it builds the same sampler, so it draws the same random numbers and yields equal batches in
    the same order.
    """

    def __init__(self, graphs: Sequence, batch_size: int = 1, shuffle: bool = False, **kwargs: Any) -> None:
        super().__init__(StackedGraphs(graphs), batch_size, shuffle, collate_fn=_as_is, **kwargs)


def make_loader(
    dataset: MapDataset, batch_size: int, shuffle: bool, distributed: bool = False, seed: int = 0
) -> DataLoader:
    """A DataLoader, or torch_geometric's when the items are graphs.

    Graphs that all have the same nodes and edges (:func:`stackable`, checked once here)
    get a :class:`~StackedGraphLoader` instead: the same batches from the same random
    numbers, collated once rather than every step.

    With ``distributed``, each rank reads its shard through a DistributedSampler (reshuffled each epoch
    from ``seed``) and ``batch_size`` is the global batch, split evenly over the ranks.
    """
    if not isinstance(dataset, Sized):
        raise TypeError(
            f"make_loader needs a dataset with a length (map-style), got {type(dataset).__name__}"
        )
    if len(dataset) == 0:
        raise ValueError("cannot make a loader over an empty dataset")
    # torch's loader and sampler read any map-style data set, a list too; their stubs ask for a Dataset
    as_dataset = cast(Dataset[Any], dataset)
    kwargs: dict[str, Any] = {"batch_size": batch_size, "shuffle": shuffle}
    if distributed:
        world = dist.get_world_size()
        if batch_size % world:
            raise ValueError(f"train.batch_size: {batch_size} does not split evenly over {world} processes")
        kwargs = {
            "batch_size": batch_size // world,
            "sampler": DistributedSampler(as_dataset, shuffle=shuffle, seed=seed),
        }
    if hasattr(dataset[0], "num_nodes"):
        from torch_geometric.loader import DataLoader as GraphLoader

        if stackable(dataset):
            return StackedGraphLoader(dataset, **kwargs)
        return GraphLoader(dataset, **kwargs)
    return DataLoader(as_dataset, **kwargs)
