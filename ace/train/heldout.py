"""The held-out read-out: does each relaxation help on data the model did not train on?

Gates, multipliers and slacks price the *training* loss, so a branch that memorises training noise looks
as useful as one that fits a real asymmetry. This read-out compares, on held-out (validation) data, the
relaxed model with the model that lacks a relaxation, sample by sample on the same inputs:

* the whole model: the same model on transformed copies of the same data, ``loss(rho_out(g)^-1 f(g.x), y)``
  averaged over ``samples`` group elements drawn per sample. If the data distribution is invariant, ``g.x`` is
  as likely as ``x`` and *any* model, trained on anything, scores the same on both in expectation; a model
  that scores better on the data as they are than on their transformed copies has found information in the
  orientation (the pose, the signs) that the symmetry would erase: evidence that the data break it. This
  tests the data, with the model as the statistic: no comparison model is trained or assembled. Not ``f_eq``:
  the weights of a relaxed model are trained together with its branches, so removing them hurts even on
  symmetric data (on SO(3)-invariant point clouds, f_eq of a resilient run validated 25 points below the
  relaxed model). Not the orbit-averaged prediction ``P_G f`` either: averaging the predictions of an
  overconfident classifier over the group calibrates it, and that gain (Jensen's, for any convex loss) hides
  the asymmetry (upright point clouds, an unconstrained relaxed model: benefit 0.05, interval -0.47 .. 0.57
  against ``P_G f`` with 8 draws; 1.15, interval 0.60 .. 1.71 against 8 transformed copies). Without a
  symmetry, f_eq is the comparison;
* f_eq (every branch removed, key ``eq``) and each gated layer (the model with that layer's branch removed,
  the others kept): what each relaxation contributes to this model, co-adaptation included, so these rows
  describe the model rather than the data.

The Trainer's read-out scores the **training loss** on held-out data, whatever metric selects the best
steps: a per-sample loss sees a relaxation's effect on every sample, where accuracy changes only on the few
whose prediction flips. The **benefit** of a relaxation is ``loss(without) - loss(relaxed)`` (for a score
where higher is better, its negative), so > 0 means the relaxation helps. Its 95 % interval is a bootstrap
over validation samples (rows of plain batches, graphs of torch_geometric ones; the paired per-sample benefits
resampled ``boots`` times; batches of 16 where the output cannot be split by sample, as the pair scores of
the eigenvector task). Verdicts, with the margin ``m = MATERIAL * |loss(relaxed)|`` (1 % of the loss):

* ``"breaks"``: the whole interval lies above ``m``: the relaxation helps on held-out data;
* ``"symmetric"``: the whole interval lies below ``m``: at most an immaterial benefit is compatible with the
  data, so the symmetric model is as good;
* ``"undecided"``: the interval contains ``m`` (too few held-out samples to tell).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ace.nn.relaxed import equivariant, gates, reuse_outputs
from ace.symmetry.action import Symmetry, call_model
from ace.symmetry.diagnostics import orbit_average
from ace.train.selection import higher_is_better
from ace.utils.batches import batch_size, split_batch, to_device
from ace.utils.loaders import make_loader

__all__ = ["HeldOut", "heldout", "small_batches", "MATERIAL", "COMPARED_WITH", "DRAWS"]

#: the smallest benefit that matters, as a fraction of the relaxed model's metric
MATERIAL = 1e-2
#: group elements drawn per sample for the whole model's transformed copies (at least)
DRAWS = 8
#: what the whole model is compared with under a symmetry (``compared_with`` of the read-out)
COMPARED_WITH = "transformed data"


@dataclass(frozen=True)
class HeldOut:
    """The held-out benefit of one relaxation (see the module docstring)."""

    benefit: float
    low: float
    high: float
    relaxed: float  # the metric of the relaxed model
    without: float  # the metric without this relaxation

    @property
    def verdict(self) -> str:
        margin = MATERIAL * abs(self.relaxed)
        if math.isnan(self.low):
            return "undecided"
        if self.low > margin:
            return "breaks"
        if self.high < margin:
            return "symmetric"
        return "undecided"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


def small_batches(loader: Iterable, size: int = 16) -> Iterable:
    """The loader's data in batches of ``size``, or the loader itself when it has no ``dataset``: where a
    batch's output cannot be split by sample, the batch is the interval's unit, and a validation set in one or
    two batches would have no interval."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        return loader
    return make_loader(getattr(dataset, "graphs", dataset), size, shuffle=False)  # stacked graphs: their list


def _interval(
    benefits: torch.Tensor, weights: torch.Tensor, boots: int, seed: int
) -> tuple[float, float, float]:
    """Weighted mean of per-unit benefits and its bootstrap 95 % interval (NaN with one unit)."""
    mean = float((benefits * weights).sum() / weights.sum())
    if len(benefits) < 2:
        return mean, math.nan, math.nan
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(benefits), (boots, len(benefits)), generator=generator)
    means = (benefits[picks] * weights[picks]).sum(1) / weights[picks].sum(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype)).tolist()
    return mean, low, high


def _per_sample(
    score: Callable[[Any, torch.Tensor], torch.Tensor], output: Any, target: torch.Tensor, inputs: Any
) -> list[float]:
    """The score of each sample of a batch: each row of a plain batch, each graph of a torch_geometric one
    (its rows of node-level tensors). A batch whose output is not a tensor split that way is one unit."""
    n = batch_size(inputs, target)
    ptr = getattr(inputs, "ptr", None)
    bounds = ptr.tolist() if ptr is not None else list(range(n + 1))

    def rows(t: torch.Tensor, i: int) -> torch.Tensor:
        return t[i : i + 1] if t.shape[0] == n else t[bounds[i] : bounds[i + 1]]

    if n < 2 or not isinstance(output, torch.Tensor) or {output.shape[0], target.shape[0]} - {n, bounds[-1]}:
        return [float(score(output, target))]
    return [float(score(rows(output, i), rows(target, i))) for i in range(n)]


def _without(names: list[str]) -> list[tuple[str, list[str]]]:
    """(key, the gated layers kept) of each model compared: f_eq, and with more than one gate, the model
    without each layer's branch (with one gate, that layer is f_eq's comparison)."""
    if not names:
        return []
    return [
        ("eq", []),
        *((name, [n for n in names if n != name]) for name in (names if len(names) > 1 else [])),
    ]


@torch.no_grad()
def heldout(
    model: nn.Module,
    loader: Iterable,
    score: Callable[[Any, torch.Tensor], torch.Tensor],
    metric: str = "loss",
    *,
    symmetry: Symmetry | None = None,
    samples: int = DRAWS,
    boots: int = 2000,
    seed: int = 0,
    device: torch.device | str = "cpu",
    layers: bool = True,
) -> dict[str, Any]:
    """The held-out read-out of ``model`` on ``loader`` (see the module docstring), ``score(output, target)``
    being the mean of ``metric`` over the samples given (each sample is scored alone). Returns ``{"metric",
    "samples", "units" (what the interval resamples: samples, or batches where an output cannot be split by
    sample), "compared_with", "relaxed", "benefit", "low", "high", "without", "verdict", "eq": {...},
    "layers": {layer: {...}}}`` (the whole model's entry, against transformed data, at the top level); ``{}``
    for a model with neither gates nor a symmetry. ``layers=False`` (with a symmetry) computes the whole
    model's entry alone (no ``eq``, ``layers`` empty)."""
    if not layers and symmetry is None:
        raise ValueError(
            "heldout(layers=False) compares the model with transformed data: it needs a symmetry"
        )
    names = list(gates(model)) if layers else []
    if not names and symmetry is None:
        return {}
    sign = -1.0 if higher_is_better(metric) else 1.0  # benefit = sign * (without - relaxed)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    scores: dict[str, list[float]] = {}
    weights: list[float] = []
    enabled = frozenset(n for n in names if model.get_submodule(n).branch_enabled)  # closed gates: off
    with parametrize.cached():  # the weights do not change here: each bounded branch is normalised once
        for batch in loader:
            inputs, target = split_batch(to_device(batch, device))

            def scored(output: Any) -> list[float]:
                return _per_sample(score, output, target, inputs)  # noqa: B023 (called in this iteration)

            # the models compared share layers, each computed once (reuse_outputs), and one function (the same
            # branches enabled) is scored once: a closed layer's "without" is the model
            with reuse_outputs(model):
                seen = {enabled: scored(call_model(model, inputs))}
                for key, kept in _without(names):
                    function = enabled.intersection(kept)
                    if function not in seen:
                        with equivariant(model, keep=kept):
                            seen[function] = scored(call_model(model, inputs))
                    scores.setdefault(key, []).extend(seen[function])
            if symmetry is not None:  # each sample's loss on its transformed copies, averaged over the draws
                copies = [
                    scored(orbit_average(model, inputs, symmetry, 1, generator)) for _ in range(samples)
                ]
                scores.setdefault("transformed", []).extend(sum(c) / samples for c in zip(*copies))
            units = seen[enabled]
            scores.setdefault("model", []).extend(units)
            share = batch_size(inputs, target) / len(units)  # a batch scored as one unit weighs its samples
            weights.extend([share] * len(units))
    model.train(was_training)
    if not weights:
        raise ValueError("heldout() got an empty loader")
    w = torch.tensor(weights, dtype=torch.float64)
    relaxed = torch.tensor(scores.pop("model"), dtype=torch.float64)
    mean_relaxed = float((relaxed * w).sum() / w.sum())
    results = {}
    for key, values in scores.items():
        without = torch.tensor(values, dtype=torch.float64)
        benefit, low, high = _interval(sign * (without - relaxed), w, boots, seed)
        results[key] = HeldOut(benefit, low, high, mean_relaxed, float((without * w).sum() / w.sum()))
    whole = results.pop("transformed", None) or results["eq"]
    eq = results.pop("eq", None)
    per_layer = results if len(names) > 1 else ({names[0]: eq} if eq is not None else {})
    return {
        "metric": metric,
        "samples": round(sum(weights)),
        "units": len(weights),
        "compared_with": COMPARED_WITH if symmetry is not None else "f_eq",
        **whole.as_dict(),
        **({"eq": eq.as_dict()} if eq is not None else {}),
        "layers": {name: r.as_dict() for name, r in per_layer.items()},
    }
