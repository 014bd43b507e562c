"""Evaluation of a (relaxed) model: loss, metrics and measured deviation, of the model and of f_eq."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ace.constrained.constraints import Constraint, DeviationConstraint, GateConstraint
from ace.nn.relaxed import equivariant, gates, reuse_outputs
from ace.symmetry.action import Symmetry, call_model
from ace.symmetry.deviation import equivariance_deviation, mean_squared_norm
from ace.symmetry.diagnostics import orbit_average
from ace.train.selection import higher_is_better
from ace.utils.batches import batch_size, split_batch, to_device

__all__ = ["evaluate", "initial_value", "track_best"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    loss: Callable[[Any, torch.Tensor], torch.Tensor],
    *,
    metrics: dict[str, Callable] | None = None,
    symmetry: Symmetry | None = None,
    gate_names: Sequence[str] = (),
    samples: int = 4,
    seed: int = 0,
    device: torch.device | str = "cpu",
    variants: Collection[str] = ("model", "eq"),
    layer_batches: int | None = None,
) -> dict[str, float]:
    """Loss and metrics of the model and, for gated models, of f_eq (keys ``eq/...``), averaged over samples.

    With a symmetry, also the measured deviation ``deviation`` (absolute, ``samples`` group elements per
    batch from a generator seeded with ``seed``, so evaluations are comparable, the same elements for every
    variant) and ``relative_deviation``
    (divided by the mean squared norm of the output). For gated models (``gate_names``): ``eq/deviation``
    (0 up to rounding when f_eq is exactly equivariant) and, per gated layer, ``deviation/<layer>`` and
    ``relative_deviation/<layer>``: the deviation of the model with only that layer's branch enabled, the
    measured read-out of how much symmetry that layer gives up, and, with more than one gated layer,
    ``heldout/<layer>``: how much lower the loss is with that layer's branch than without it (the others kept)
    on the same batches, the held-out value of each relaxation (:mod:`ace.train.heldout` gives it with an
    interval, at the end of a run); with one, ``eq/loss - loss`` is that value. With a symmetry, on the same
    batches, ``heldout/transformed``: how much higher the model's loss is on a transformed copy of each batch
    (one group element a batch, from its own generator) than on the batch as it is, the whole model's
    held-out read-out.

    ``variants`` limits the work to what is asked for: ``"model"`` (the model, and its per-layer deviations)
    and ``"eq"`` (f_eq); a variant's scores do not depend on whether the other is evaluated.
    ``layer_batches`` measures the per-layer deviations on the first batches only (``0``: not at all;
    ``None``: every batch): each gated layer costs ``1 + samples`` forward passes a batch, as much as the
    model's own loss and deviation. Variants that compute one function (a closed gate's layer, whose branch
    is off, relaxed alone is f_eq) are evaluated once, and each reads the same numbers it would alone.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    # the read-out's transformed copies draw from their own generator: the deviations' draws stay as they were
    turns = torch.Generator(device=device).manual_seed(seed + 1)
    metrics = metrics or {}
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}

    def add(name: str, value: float, n: int) -> None:
        """Accumulate a batch's mean ``value`` of ``n`` samples into the evaluation's mean of ``name``."""
        totals[name] = totals.get(name, 0.0) + value * n
        counts[name] = counts.get(name, 0) + n

    whole = _enabled(model, gate_names)  # the model's own function, scored first on every batch

    def scores(known: dict[str, Any], keys: list[str], inputs: Any, target: Any, draws: torch.Tensor) -> None:
        """Compute the scores ``keys`` of the model as it is now into ``known``, which holds those already
        computed for the same function on this batch (and its output)."""
        if "output" not in known:
            known["output"] = call_model(model, inputs)
        output = known["output"]
        for key in keys:
            if key in known:
                continue
            if key == "loss":
                known[key] = loss(output, target)
            elif key == "deviation":
                assert symmetry is not None, "the deviation is measured under a symmetry"
                generator.set_state(draws)  # the same group elements for every variant
                known[key] = equivariance_deviation(
                    model, inputs, symmetry, samples, False, generator, output
                )
            elif key == "relative_deviation":
                assert symmetry is not None, "the deviation is measured under a symmetry"
                known[key] = known["deviation"] / mean_squared_norm(symmetry, output)
            else:
                known[key] = metrics[key](output, target)

    # the weights do not change here: each bounded branch is normalised once for the whole evaluation
    with parametrize.cached():
        for index, batch in enumerate(loader):
            inputs, target = split_batch(to_device(batch, device))
            n = batch_size(inputs, target)
            per_layer = symmetry is not None and (layer_batches is None or index < layer_batches)
            draws = generator.get_state()  # every variant sees the same group elements: comparable deviations
            # variants that compute one function (the same branches enabled: closed gates) are evaluated once,
            # and each reuses the layers it shares with those before it (f_eq's first layers, reuse_outputs)
            seen: dict[frozenset[str], dict[str, Any]] = {}
            with reuse_outputs(model):
                for prefix, suffix, enabled, context in _variants(model, gate_names, per_layer, variants):
                    keys = [] if suffix else ["loss", *metrics]
                    if prefix == "heldout/":
                        keys = ["loss"]  # the loss without one branch: a benefit, below
                    elif symmetry is not None:
                        keys += ["deviation"] if prefix == "eq/" else ["deviation", "relative_deviation"]
                    known = seen.setdefault(enabled, {})
                    with context:
                        scores(known, keys, inputs, target, draws)
                    for key in keys:
                        name, value = prefix + key + suffix, float(known[key])
                        if prefix == "heldout/":  # a branch's benefit: the loss without it less the model's
                            name, value = prefix + suffix[1:], value - float(seen[whole]["loss"])
                        add(name, value, n)
            if per_layer and "model" in variants:  # the model on a transformed copy, less as it is
                assert symmetry is not None, "the read-out is measured under a symmetry"
                turned = orbit_average(model, inputs, symmetry, 1, turns)
                value = float(loss(turned, target)) - float(seen[whole]["loss"])
                add("heldout/transformed", value, n)
    model.train(was_training)
    if not counts:
        raise ValueError("evaluate() got an empty loader")
    return {k: v / counts[k] for k, v in totals.items()}


def _variants(model: nn.Module, gate_names: Sequence[str], per_layer: bool, variants: Collection[str]):
    """(key prefix, key suffix, the branches enabled, context): the model, f_eq, and the model relaxed at one
    layer only."""
    enabled = _enabled(model, gate_names)
    if "model" in variants:
        yield "", "", enabled, contextlib.nullcontext()
    if gate_names and "eq" in variants:
        yield "eq/", "", frozenset(), equivariant(model)
    if gate_names and per_layer and "model" in variants:
        for name in gate_names:
            yield "", f"/{name}", enabled & {name}, equivariant(model, keep=[name])
        if len(gate_names) > 1:  # with one gated layer, f_eq is the model without its branch
            for name in gate_names:
                kept = [n for n in gate_names if n != name]
                yield "heldout/", f"/{name}", enabled.intersection(kept), equivariant(model, keep=kept)


def _enabled(model: nn.Module, gate_names: Sequence[str]) -> frozenset[str]:
    """The gated layers whose branch is computed (not closed for good)."""
    return frozenset(n for n in gate_names if getattr(model.get_submodule(n), "branch_enabled", True))


def track_best(best: dict[str, dict[str, float]], record: dict[str, Any], step: int) -> None:
    """Update ``best[key] = {value, step}`` with each metric of ``record`` that improved (not the held-out
    benefits)."""
    for key, value in record.items():
        if key in ("step", "epoch") or "heldout/" in key or not isinstance(value, float) or math.isnan(value):
            continue  # a held-out benefit describes the model, it has no best
        higher = higher_is_better(key)
        old = best.get(key)
        if old is None or (value > old["value"] if higher else value < old["value"]):
            best[key] = {"value": value, "step": step}


@torch.no_grad()
def initial_value(
    c: Constraint,
    model: nn.Module,
    symmetry: Symmetry | None,
    inputs: list,
    samples: int,
    generator: torch.Generator,
) -> float:
    """A constraint's value before training, the start of a ``start="auto"`` tolerance: the largest
    ``|gate|``, or the deviation averaged over the batches ``inputs`` (one batch's estimate is noisy, and a
    start below the typical deviation makes a tightening constraint active from step 1), with at least
    ``samples`` group elements per batch."""
    if isinstance(c, GateConstraint):
        return c.value(torch.stack(list(gates(model).values()))).abs().max().item()
    assert isinstance(c, DeviationConstraint), "a constraint bounds the gates or the deviation"
    assert symmetry is not None, "check_setup refuses a deviation constraint without a symmetry"
    k = max(c.samples, samples)
    measured = [equivariance_deviation(model, x, symmetry, k, c.relative, generator) for x in inputs]
    return torch.stack(measured).mean().item()
