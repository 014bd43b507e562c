"""The measured equivariance deviation of any model, differentiable w.r.t. its parameters."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ace.symmetry.action import Symmetry, call_model, is_graph

__all__ = ["equivariance_deviation", "mean_squared_norm"]

_EPS = 1e-12  # keeps the relative deviation finite when f(x) = 0


def equivariance_deviation(
    model: nn.Module,
    inputs: Any,
    symmetry: Symmetry,
    samples: int = 1,
    relative: bool = False,
    generator: torch.Generator | None = None,
    output: Any = None,
) -> Tensor:
    r"""Monte-Carlo estimate of how far ``model`` is from equivariance on ``inputs``.

    $$
    D = \frac{1}{k} \sum_{j=1}^{k} \operatorname{mean}_{b}
        \big\| f(g_{jb} \cdot x_b) - \rho_{out}(g_{jb}) f(x_b) \big\|^2,
    \qquad D_{rel} = \frac{D}{\operatorname{mean}_b \| f(x_b) \|^2 + 10^{-12}}
    $$

    with ``g_{jb}`` drawn independently for every sample (graph) b and copy j. The squared norm is
    summed over the last (feature) dim and averaged over every other dim (samples, set elements,
    nodes); for a tuple or dict output the terms of its fields are added (fields of kind ``"none"``
    are skipped).

    The k transformed copies go through the model in ONE forward pass: plain tensors are concatenated
    along dim 0 (every input tensor whose leading dim is the batch size is repeated k times), a
    torch_geometric ``Batch`` of B graphs becomes a ``Batch`` of k*B graphs. A single ``Data`` (one
    graph; the model may not expect a batch vector) is evaluated in a loop over the k copies.

    Args:
        model: the model; called through ``ace.symmetry.call_model``.
        inputs: a batch of inputs as described by ``symmetry.inputs``.
        symmetry: the group action on inputs and output.
        samples: k, the number of group elements per sample.
        relative: divide by the mean squared norm of ``f(x)``.
        generator: source of the group elements (for reproducibility).
        output: ``f(x)``, if the caller already has it (saves a forward pass).

    Returns:
        A scalar tensor, differentiable w.r.t. the model's parameters (and ``output``).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if output is None:
        output = call_model(model, inputs)
    if is_graph(inputs) and inputs.batch is None:
        terms = []
        for _ in range(samples):
            g = symmetry.sample(inputs, generator)
            out_g = call_model(model, symmetry.transform_inputs(inputs, g))
            terms.append(_squared_norm(symmetry, out_g, symmetry.transform_output(output, g)))
        deviation = torch.stack(terms).mean()
    else:
        repeated = _repeat_inputs(inputs, samples, symmetry)
        g = symmetry.sample(repeated, generator)
        out_g = call_model(model, symmetry.transform_inputs(repeated, g))
        target = symmetry.transform_output(_repeat_output(output, samples), g)
        deviation = _squared_norm(symmetry, out_g, target)
    if relative:
        deviation = deviation / mean_squared_norm(symmetry, output)
    return deviation


def mean_squared_norm(symmetry: Symmetry, output: Any) -> Tensor:
    """``mean_b ||f(x_b)||^2 + 1e-12``: the denominator of the relative deviation (same field rules)."""
    return _squared_norm(symmetry, output) + _EPS


def _squared_norm(symmetry: Symmetry, a: Any, b: Any = None) -> Tensor:
    """``sum over fields of mean ||a - b||^2`` (squared norm over the last dim, mean over the rest)."""
    total = None
    fields = symmetry.fields(symmetry.output, a, "output")
    others = symmetry.fields(symmetry.output, b, "output") if b is not None else [None] * len(fields)
    for (_, kind, x), other in zip(fields, others, strict=True):
        if kind == "none":
            continue
        sq = (x if other is None else x - other[2]).square()
        term = (sq.sum(-1) if sq.dim() >= 2 else sq).mean()
        total = term if total is None else total + term
    return torch.as_tensor(0.0) if total is None else total


def _repeat_output(output: Any, k: int) -> Any:
    if k == 1:
        return output
    if torch.is_tensor(output):
        return torch.cat([output] * k)
    if isinstance(output, (tuple, list)):
        return type(output)(_repeat_output(o, k) for o in output)
    if isinstance(output, dict):
        return {key: _repeat_output(o, k) for key, o in output.items()}
    return output


def _repeat_inputs(inputs: Any, k: int, symmetry: Symmetry) -> Any:
    """k copies of a batch, copy j occupying samples ``j*B ... (j+1)*B - 1``."""
    if k == 1:
        return inputs
    if is_graph(inputs):
        return _repeat_graph(inputs, k, symmetry.batch_size(inputs))
    n = symmetry.batch_size(inputs)

    def rep(x):
        return torch.cat([x] * k) if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == n else x

    if isinstance(inputs, (tuple, list)):
        return type(inputs)(rep(x) for x in inputs)
    if isinstance(inputs, dict):
        return {key: rep(x) for key, x in inputs.items()}
    return rep(inputs)


def _repeat_graph(batch, k: int, num_graphs: int):
    """A batch of k*B graphs (k copies of ``batch``), built from its tensors with offset indices."""
    num_nodes = batch.num_nodes
    out = copy.copy(batch)
    for key, value in batch.items():
        dim = batch.__cat_dim__(key, value)
        if not torch.is_tensor(value) or isinstance(dim, tuple):
            from torch_geometric.data import Batch  # rare attributes: let PyG collate them

            return Batch.from_data_list(batch.to_data_list() * k)
        if key == "ptr":
            out[key] = torch.cat([value[:-1] + j * num_nodes for j in range(k)] + [value[-1:] * k])
            continue
        inc = num_graphs if key == "batch" else batch.__inc__(key, value)
        out[key] = torch.cat([value + j * inc if inc else value for j in range(k)], 0 if dim is None else dim)
    if hasattr(batch, "_slice_dict"):  # keep to_data_list() working
        out._num_graphs = k * num_graphs
        out._slice_dict = {
            key: torch.cat([s[:-1] + j * s[-1] for j in range(k)] + [s[-1:] * k])
            for key, s in batch._slice_dict.items()
        }
        out._inc_dict = {
            key: torch.cat([inc + j * batch.__inc__(key, batch[key]) for j in range(k)])
            for key, inc in batch._inc_dict.items()
        }
    return out
