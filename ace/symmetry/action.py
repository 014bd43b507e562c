"""How a group acts on a model's inputs and outputs.

A ``Symmetry`` names the representation ("kind") of every field a model reads or returns:

    ``"scalar"``        invariant, any width
    ``"vector"``        ``v -> R v``
    ``"pseudovector"``  ``v -> det(R) R v`` (3-D)
    ``"position"``      ``p -> R p + t``: the only kind translations move
    ``"none"``          left untouched (indices, masks, ...)
    ``"2x0e+1x1o"``     an e3nn irreps string, ``x -> D(R) x`` in e3nn's basis (3-D)

One group element acts on each sample. For plain tensors the leading dim is the batch and the
representation acts on the last dim, so a ``(B, N, 3)`` point set gets one rotation per b. For a
torch_geometric ``Data`` (one graph) or ``Batch``, one element acts on each graph: node-level fields
(first dim ``num_nodes``) use the element of their node's graph, graph-level fields (first dim
``num_graphs``) the element of their graph.

``Permutation`` reorders the set axis (dim 1) of the named ``(B, N, ...)`` tensors; tensors with
fewer than 3 dims, such as a ``(B, F)`` graph-level output, are invariant, so keep a trailing feature
dim on per-element scalars, ``(B, N, 1)``. On graphs it relabels the nodes of each graph: every
node-level attribute moves (named or not, except kind ``"none"``), ``edge_index`` (and any other
``*index`` / ``face`` attribute) is relabelled, graph-level fields are invariant.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn

from ace.symmetry.group import Group, GroupElement
from ace.symmetry.groups import Permutation

__all__ = ["Symmetry", "call_model", "is_graph"]

Spec = str | tuple[str, ...] | dict[str, str]


class _OwnAction(Protocol):
    """A group that acts on the field kinds it names in ``kinds`` itself (the grid groups' images)."""

    kinds: tuple[str, ...]

    def act(self, name: str, kind: str, x: Tensor, g: GroupElement) -> Tensor: ...


def is_graph(x: Any) -> bool:
    """Whether ``x`` is a torch_geometric ``Data`` or ``Batch`` (without importing torch_geometric)."""
    tg = sys.modules.get("torch_geometric")  # a PyG object can only exist once PyG is imported
    return tg is not None and isinstance(x, tg.data.Data)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Calls ``model`` the way ace does everywhere: ``model(*x)`` for a tuple or list, ``model(**x)``
    for a dict and ``model(x)`` for a tensor, a torch_geometric ``Data``/``Batch`` or anything else."""
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def _normalise(spec: Any, what: str) -> Spec:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, (tuple, list)) and all(isinstance(k, str) for k in spec):
        return tuple(spec)
    if isinstance(spec, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in spec.items()):
        return dict(spec)
    raise TypeError(f"{what} must be a kind string, a tuple of kinds or a dict field -> kind, got {spec!r}")


def _kinds(spec: Spec) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec.values() if isinstance(spec, dict) else spec)


def _num_graphs(data) -> int:
    if hasattr(data, "num_graphs"):
        return data.num_graphs
    return 1 if data.batch is None else int(data.batch.max()) + 1


class Symmetry:
    """The action of ``group`` on a model's inputs and output.

    Args:
        group: e.g. ``SO3()``, ``Euclidean(O3())``, ``Permutation()``.
        inputs: a kind (single tensor input), a tuple of kinds (tuple input, ``model(*x)``) or a dict
            field -> kind (dict input, ``model(**x)``, or attributes of a ``Data``/``Batch``). Fields
            not named are left untouched.
        output: a kind, a tuple of kinds or a dict of kinds, matching what the model returns.

    Example:
        >>> sym = Symmetry(Euclidean(SO3()), inputs={"pos": "position", "vel": "vector"}, output="vector")
        >>> g = sym.sample(batch, generator)
        >>> out_g = model(sym.transform_inputs(batch, g))       # ~= sym.transform_output(model(batch), g)
    """

    def __init__(self, group: Group, inputs: Spec, output: Spec):
        if not isinstance(group, Group):
            raise TypeError(f"group must be an ace.symmetry.Group such as SO3(), got {group!r}")
        self.group = group
        self.inputs = _normalise(inputs, "inputs")
        self.output = _normalise(output, "output")
        for kind in _kinds(self.inputs) + _kinds(self.output):
            if kind != "none":
                group.width(kind)  # fails now, with a message, for unknown or unsuitable kinds

    def __repr__(self) -> str:
        return f"Symmetry({self.group!r}, inputs={self.inputs!r}, output={self.output!r})"

    # ----------------------------------------------------------------------------------------------
    def sample(self, inputs: Any, generator: torch.Generator | None = None) -> GroupElement:
        """One random element per sample of ``inputs`` (per graph for ``Data``/``Batch``).

        The number of elements, the dtype, the device and, for ``Permutation``, the set sizes are read
        from ``inputs``.
        """
        tensors = self._tensors(inputs)
        floats = [x for x in tensors if x.is_floating_point()]
        dtype = floats[0].dtype if floats else torch.get_default_dtype()
        n = self.batch_size(inputs)
        if is_graph(inputs):
            batch = inputs.batch
            if batch is None:
                batch = torch.zeros(
                    inputs.num_nodes, dtype=torch.long, device=tensors[0].device if tensors else None
                )
            if isinstance(self.group, Permutation):
                g = _sample_graph_permutation(self.group, n, batch, generator)
            else:
                g = self.group.sample(n, generator, dtype=dtype, device=batch.device)
            return GroupElement(g.matrix, g.translation, g.permutation, batch)
        size = {}
        if isinstance(self.group, Permutation):
            sets = [x for x in tensors if x.dim() >= 3]
            if not sets:
                raise ValueError(f"{self!r}: Permutation needs a named input of shape (B, N, ...), got none")
            size = {"size": sets[0].shape[1]}
        return self.group.sample(n, generator, dtype=dtype, device=tensors[0].device, **size)

    def batch_size(self, inputs: Any) -> int:
        """How many elements ``sample`` draws: the graphs of a ``Data``/``Batch``, else the leading dim
        of the first named tensor."""
        if is_graph(inputs):
            return _num_graphs(inputs)
        tensors = self._tensors(inputs)
        if not tensors or tensors[0].dim() == 0:
            raise ValueError(f"{self!r}: cannot infer the batch size, no named input is a batched tensor")
        return tensors[0].shape[0]

    def _tensors(self, inputs: Any) -> list[Tensor]:
        fields = self.fields(self.inputs, inputs, "input")
        return [x for _, kind, x in fields if kind != "none" and torch.is_tensor(x)]

    def transform_inputs(self, inputs: Any, g: GroupElement) -> Any:
        """``g . x``: the inputs with every named field transformed, as a new object."""
        if is_graph(inputs) and g.permutation is not None:
            inputs = self._permute_graph(inputs, g.permutation)
        return self._map(self.inputs, inputs, g, "input", permute=not is_graph(inputs))

    def transform_output(self, output: Any, g: GroupElement) -> Any:
        """``rho_out(g) f(x)``: a model output transformed like a model of this symmetry would."""
        return self._map(self.output, output, g, "output", permute=True)

    def check(self, inputs: Any, output: Any = None) -> None:
        """Validates that ``inputs`` (and ``output``) carry every named field with the right shape,
        by transforming them with a random element.

        Raises:
            ValueError: naming the field and the expected shape, if a field is missing, its batch dim
                does not match, or its last dim does not fit its representation.
        """
        g = self.sample(inputs, torch.Generator().manual_seed(0))  # leaves the global RNG alone
        self.transform_inputs(inputs, g)
        if output is not None:
            self.transform_output(output, g)

    # ----------------------------------------------------------------------------------------------
    def fields(self, spec: Spec, value: Any, root: str) -> list[tuple[str, str, Any]]:
        """``(name, kind, value)`` for every named field, checking that the structure matches."""
        if isinstance(spec, str):
            if isinstance(value, (tuple, list, dict)) or is_graph(value):
                raise ValueError(
                    f"{root}: a single kind {spec!r} describes one tensor, got a {type(value).__name__}"
                )
            return [(root, spec, value)]
        if isinstance(spec, tuple):
            if not isinstance(value, (tuple, list)) or len(value) != len(spec):
                got = len(value) if isinstance(value, (tuple, list)) else type(value).__name__
                raise ValueError(f"{root}: kinds {spec!r} need a tuple of {len(spec)} tensors, got {got}")
            return [(f"{root}[{i}]", kind, v) for i, (kind, v) in enumerate(zip(spec, value, strict=True))]
        if not (isinstance(value, dict) or is_graph(value)):
            raise ValueError(
                f"{root}: kinds {spec!r} need a dict or a torch_geometric Data, got {type(value).__name__}"
            )
        for key, kind in spec.items():
            if key not in value:
                width = self.group.width(kind) if kind != "none" else None
                shape = f"(..., {width})" if width else "(...)"
                raise ValueError(f"field {key!r} (kind {kind!r}, shape {shape}) is missing from the {root}")
        return [(key, kind, value[key]) for key, kind in spec.items()]

    def _map(self, spec: Spec, value: Any, g: GroupElement, root: str, permute: bool) -> Any:
        reps: dict[str, Tensor] = {}  # one representation per kind and call
        new = [self._act(name, kind, x, g, reps, permute) for name, kind, x in self.fields(spec, value, root)]
        if isinstance(spec, str):
            return new[0]
        if isinstance(spec, tuple):
            return type(value)(new)
        out = dict(value) if isinstance(value, dict) else copy.copy(value)
        for key, x in zip(spec, new, strict=True):
            out[key] = x
        return out

    def _act(self, name: str, kind: str, x: Any, g: GroupElement, reps: dict, permute: bool) -> Any:
        if kind == "none":
            return x
        if not torch.is_tensor(x) or x.dim() == 0:
            raise ValueError(f"field {name!r}: kind {kind!r} needs a tensor with a batch dim, got {x!r}")
        width = self.group.width(kind)
        if width is not None and x.shape[-1] != width:
            raise ValueError(
                f"field {name!r}: kind {kind!r} under {self.group!r} needs last dim {width}, "
                f"got shape {tuple(x.shape)}"
            )
        if kind == "scalar" and g.permutation is None:  # invariant whatever its rows (nodes, edges, pairs)
            return x
        rows = None  # element of each row of x: None = row b uses element b
        if g.batch is not None:
            num_nodes, num_graphs = g.batch.shape[0], len(g)
            if x.shape[0] == num_nodes:
                rows = g.batch
                if permute and g.permutation is not None:
                    x = x[g.permutation]
            elif x.shape[0] != num_graphs:
                raise ValueError(
                    f"field {name!r}: expected first dim num_nodes={num_nodes} or num_graphs={num_graphs}, "
                    f"got shape {tuple(x.shape)}"
                )
        else:
            if x.shape[0] != len(g):
                raise ValueError(
                    f"field {name!r}: expected a leading batch dim of {len(g)} (one element per sample), "
                    f"got shape {tuple(x.shape)}"
                )
            if permute and g.permutation is not None and x.dim() >= 3:
                if x.shape[1] != g.permutation.shape[1]:
                    raise ValueError(
                        f"field {name!r}: expected shape (B, {g.permutation.shape[1]}, ...) as the other "
                        f"sets, got shape {tuple(x.shape)}"
                    )
                x = x[torch.arange(x.shape[0], device=x.device)[:, None], g.permutation]
        if kind in getattr(self.group, "kinds", ()):  # a group with its own action (the grid groups)
            return cast(_OwnAction, self.group).act(name, kind, x, g)
        if g.matrix is not None and kind != "scalar":
            if kind not in reps:
                reps[kind] = self.group.representation(kind, g)
            rho = reps[kind].to(x.dtype)
            rho = rho if rows is None else rho[rows]
            x = _apply_matrix(rho, x)
        if kind == "position" and g.translation is not None:
            t = g.translation.to(x.dtype)
            t = t if rows is None else t[rows]
            x = x + t.view(t.shape[0], *([1] * (x.dim() - 2)), t.shape[1])
        return x

    def _permute_graph(self, data, perm: Tensor):
        """Relabels the nodes: node i of the result is node ``perm[i]`` of ``data``."""
        out = copy.copy(data)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.shape[0], device=perm.device)
        named = self.inputs.items() if isinstance(self.inputs, dict) else ()
        untouched = {"batch", "ptr"} | {key for key, kind in named if kind == "none"}
        for key, value in data.items():
            if key in untouched or not torch.is_tensor(value) or value.dim() == 0:
                continue
            if "index" in key or key == "face":
                out[key] = inverse[value]
            elif value.shape[0] == perm.shape[0]:
                out[key] = value[perm]
        return out


def _sample_graph_permutation(group: Permutation, n: int, batch: Tensor, generator) -> GroupElement:
    perm = group.sample(n, generator, device=batch.device, size=torch.bincount(batch, minlength=n))
    # perm shuffles graphs stored one after another; map it through the sorted node order so that
    # it also holds when a graph's nodes are not contiguous.
    order = batch.argsort(stable=True)
    actual = torch.empty_like(order)
    actual[order] = order[perm.permutation]
    return GroupElement(permutation=actual)


def _apply_matrix(rho: Tensor, x: Tensor) -> Tensor:
    """``rho[n] @ x[n, ..., :]`` for every sample n, as one batched matmul: the same bmm that
    ``einsum("nij,n...j->n...i", rho, x)`` plans, bit for bit, without its 7 permutes and views around it
    (the step's fixed cost on a small model is mostly per-operator overhead)."""
    n, j = x.shape[0], x.shape[-1]
    return torch.bmm(x.reshape(n, -1, j), rho.transpose(1, 2)).view(*x.shape[:-1], rho.shape[1])
