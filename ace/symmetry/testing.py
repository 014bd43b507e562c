"""An equivariance check for users' own tests, in the spirit of ``e3nn.util.test.assert_equivariant``."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ace.symmetry.action import Symmetry, call_model, is_graph

__all__ = ["assert_equivariant", "TOLERANCES"]

#: Default ``(atol, rtol)`` by the dtype the check runs in.
TOLERANCES = {torch.float64: (1e-9, 1e-7), torch.float32: (1e-4, 1e-4)}


def assert_equivariant(
    model: nn.Module,
    inputs: Any,
    symmetry: Symmetry,
    samples: int = 4,
    atol: float | None = None,
    rtol: float | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> float:
    """Asserts ``f(g . x) = rho_out(g) f(x)`` for ``samples`` random group elements.

    A deep copy of the model and the floating inputs are cast to ``dtype`` (float64 by default, so that
    only true symmetry breaking, not round-off, fails) and evaluated without gradients. The check
    passes when, for every output field,

        max |f(g.x) - rho_out(g) f(x)| <= atol + rtol * max |rho_out(g) f(x)|

    with ``atol, rtol`` defaulting to ``TOLERANCES[dtype]``.

    Returns:
        The largest absolute error measured.

    Raises:
        AssertionError: naming the model, the symmetry, the field and the measured error.
    """
    default_atol, default_rtol = TOLERANCES[dtype]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    if isinstance(model, nn.Module):
        model = copy.deepcopy(model).to(dtype)
    inputs = cast(inputs, dtype)
    worst = 0.0
    with torch.no_grad():
        output = call_model(model, inputs)
        for _ in range(samples):
            g = symmetry.sample(inputs, generator)
            got = symmetry.fields(
                symmetry.output, call_model(model, symmetry.transform_inputs(inputs, g)), "output"
            )
            expected = symmetry.fields(symmetry.output, symmetry.transform_output(output, g), "output")
            for (name, kind, x), (_, _, y) in zip(got, expected, strict=True):
                if kind == "none" or not y.numel():
                    continue
                error = (x - y).abs().max().item()
                worst = max(worst, error)
                bound = atol + rtol * y.abs().max().item()
                if not error <= bound:
                    raise AssertionError(
                        f"{type(model).__name__} is not equivariant under {symmetry!r}: "
                        f"max |f(g.x) - rho(g) f(x)| = {error:.3e} in {name!r} exceeds "
                        f"atol + rtol * max|rho(g) f(x)| = {bound:.3e} ({dtype}, {samples} samples)"
                    )
    return worst


def cast(x: Any, dtype: torch.dtype) -> Any:
    if torch.is_tensor(x):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(cast(v, dtype) for v in x)
    if isinstance(x, dict):
        return {key: cast(v, dtype) for key, v in x.items()}
    if is_graph(x):
        out = copy.copy(x)
        for key, value in x.items():
            out[key] = cast(value, dtype)
        return out
    return x
