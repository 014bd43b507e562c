"""Symmetry diagnostics: how symmetric are the data, which layer breaks a symmetry, how many dimensions.

* :func:`symmetrization_gap` (Petrache & Trivedi, NeurIPS 2023): the loss of the orbit-averaged model
  ``P_G f(x) = E_g rho_out(g)^-1 f(g.x)`` minus that of ``f``. For a loss convex in the output, a
  G-invariant input distribution and an equivariant target, ``P_G f`` is never worse (Jensen), so the gap is
  <= 0; a clearly positive gap says the data break the symmetry (the fitted model uses the asymmetry).
* :func:`audit`: the local equivariance deviation of chosen submodules, each with its own declared action on
  its inputs and output, from the inputs they receive on real data (forward hooks): the layer that breaks the
  symmetry is named even when the layers before it are equivariant.
* :func:`intrinsic_dimension` (TwoNN, Facco et al., Sci. Rep. 2017) and :func:`gram_invariants` (the
  configuration up to rotations, reflections and translations: the quotient by E(d)), and
  :func:`power_law` (test error ~ C n^-alpha from a sample-size sweep, Perera et al.'s exponent).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ace.symmetry.action import Symmetry, call_model
from ace.symmetry.deviation import equivariance_deviation, mean_squared_norm
from ace.symmetry.group import GroupElement
from ace.utils.batches import split_batch, to_device

__all__ = [
    "SymmetrizationGap",
    "symmetrization_gap",
    "inverse",
    "orbit_average",
    "audit",
    "intrinsic_dimension",
    "gram_invariants",
    "distance_invariants",
    "PowerLaw",
    "power_law",
]

_Z95 = 1.959964  # two-sided 95 % normal quantile
#: a symmetrisation gap smaller than this fraction of the loss is immaterial
NEGLIGIBLE = 1e-3


def inverse(g: GroupElement) -> GroupElement:
    """``g^-1`` element by element: ``(R, t)^-1 = (R^T, -R^T t)`` (orthogonal ``R``), inverse permutations."""
    matrix = g.matrix.transpose(-1, -2) if g.matrix is not None else None
    translation = None
    if g.translation is not None:
        t = g.translation.unsqueeze(-1)
        translation = -(matrix @ t).squeeze(-1) if matrix is not None else -g.translation
    permutation = None
    if g.permutation is not None:
        permutation = torch.empty_like(g.permutation)
        if g.permutation.dim() == 2:
            permutation.scatter_(
                1,
                g.permutation,
                torch.arange(g.permutation.shape[1], device=g.permutation.device).expand_as(g.permutation),
            )
        else:
            permutation[g.permutation] = torch.arange(g.permutation.numel(), device=g.permutation.device)
    return GroupElement(matrix, translation, permutation, g.batch)


@dataclass(frozen=True)
class SymmetrizationGap:
    """``gap = symmetrized_loss - loss`` with a 95 % interval ``[low, high]`` over batches (normal
    approximation; NaN with a single batch), and the relative deviation of ``f`` on the same data."""

    gap: float
    low: float
    high: float
    loss: float
    symmetrized_loss: float
    relative_deviation: float
    batches: int
    samples: int

    @property
    def verdict(self) -> str:
        """A gap below ``NEGLIGIBLE`` (0.1 %) of the loss is no evidence either way, whatever its sign."""
        if math.isnan(self.low):
            return "undetermined (one batch: no interval)"
        if abs(self.gap) < NEGLIGIBLE * abs(self.loss):
            return "no material asymmetry (the gap is below 0.1 % of the loss)"
        if self.low > 0:
            return "the data break the symmetry (orbit averaging makes the fitted model worse)"
        if self.high < 0:
            return "consistent with symmetric data (orbit averaging helps)"
        return "no detectable asymmetry (the interval contains 0)"


@torch.no_grad()
def symmetrization_gap(
    model: nn.Module,
    loader: Iterable,
    symmetry: Symmetry,
    loss: Callable[[Any, Tensor], Tensor],
    samples: int = 8,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> SymmetrizationGap:
    """The symmetrisation gap of a trained ``model`` on ``loader`` (see the module docstring).

    ``P_G f`` averages ``samples`` (k) group elements per input: the gap of the k-sample average, which is
    at most the infinite-k gap's value plus O(1/k) (an estimate, unbiased in the orbit average's limit).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    gaps, losses, averaged_losses, deviations, weights = [], [], [], [], []
    for batch in loader:
        inputs, target = split_batch(to_device(batch, device))
        output = call_model(model, inputs)
        averaged = orbit_average(model, inputs, symmetry, samples, generator)
        plain, sym = float(loss(output, target)), float(loss(averaged, target))
        deviation = equivariance_deviation(model, inputs, symmetry, samples, False, generator, output)
        losses.append(plain)
        averaged_losses.append(sym)
        gaps.append(sym - plain)
        deviations.append(float(deviation / mean_squared_norm(symmetry, output)))
        weights.append(symmetry.batch_size(inputs))
    model.train(was_training)
    if not gaps:
        raise ValueError("symmetrization_gap() got an empty loader")
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    mean = lambda xs: float((torch.tensor(xs, dtype=torch.float64) * w).sum())  # noqa: E731
    gap = mean(gaps)
    if len(gaps) > 1:
        half = _Z95 * float(torch.tensor(gaps, dtype=torch.float64).std()) / math.sqrt(len(gaps))
    else:
        half = math.nan
    return SymmetrizationGap(
        gap, gap - half, gap + half, mean(losses), mean(averaged_losses), mean(deviations), len(gaps), samples
    )


def orbit_average(model: nn.Module, inputs: Any, symmetry: Symmetry, samples: int, generator=None) -> Any:
    """``P_G f(x) = mean_g rho_out(g)^-1 f(g.x)`` over ``samples`` group elements drawn from ``generator``."""
    outputs = []
    for _ in range(samples):
        g = symmetry.sample(inputs, generator)
        outputs.append(
            symmetry.transform_output(call_model(model, symmetry.transform_inputs(inputs, g)), inverse(g))
        )
    return _mean(outputs)


def _mean(outputs: list[Any]) -> Any:
    first = outputs[0]
    if isinstance(first, dict):
        return {k: _mean([o[k] for o in outputs]) for k in first}
    if isinstance(first, tuple):
        return tuple(_mean(list(parts)) for parts in zip(*outputs))
    return torch.stack(outputs).mean(0)


@torch.no_grad()
def audit(
    model: nn.Module,
    inputs: Any,
    layers: dict[str, Symmetry],
    samples: int = 4,
    seed: int = 0,
) -> list[tuple[str, float]]:
    """``[(layer, relative deviation), ...]`` ranked from the largest: each submodule named in ``layers``
    (``model.get_submodule`` names) is tested on the inputs it receives when ``model`` runs on ``inputs``,
    under the action ``layers[name]`` declares on its own inputs and output (``Symmetry(group, inputs=...,
    output=...)`` with the package's field kinds or e3nn irreps strings).

    The deviation is local, ``E || layer(g.h) - rho_out(g) layer(h) ||^2 / E || layer(h) ||^2`` with ``h`` the
    layer's recorded input, so an equivariant layer scores ~0 whatever comes before it.
    """
    modules = {}
    for name in layers:
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError as err:
            known = [n for n, _ in model.named_modules() if n][:20]
            raise ValueError(f"audit: the model has no submodule {name!r}; some it has: {known}") from err
    recorded: dict[str, Any] = {}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in recorded:  # the first call (a layer reused in a loop is tested on its first input)
                recorded[name] = kwargs if kwargs and not args else (args[0] if len(args) == 1 else args)

        return hook

    handles = [m.register_forward_pre_hook(recorder(n), with_kwargs=True) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    generator = torch.Generator().manual_seed(seed)
    ranked = []
    for name, module in modules.items():
        if name not in recorded:
            raise ValueError(f"audit: submodule {name!r} was not called when the model ran on the inputs")
        deviation = equivariance_deviation(module, recorded[name], layers[name], samples, True, generator)
        ranked.append((name, float(deviation)))
    model.train(was_training)
    return sorted(ranked, key=lambda item: -item[1])


def intrinsic_dimension(x: Tensor, discard: float = 0.1) -> float:
    """TwoNN estimate of the intrinsic dimension of the point cloud ``x`` (n points, flattened to vectors).

    For each point, ``mu = r2 / r1`` (distances to its second and first nearest neighbours) follows a Pareto
    law ``F(mu) = 1 - mu^-d`` on a locally uniform d-dimensional manifold; ``d`` is the slope through the
    origin of ``-log(1 - F_emp(mu))`` against ``log mu``, the largest ``discard`` fraction of ``mu`` left out
    (Facco et al.). Duplicate points (``r1 = 0``) are dropped.
    """
    x = torch.as_tensor(x).reshape(len(x), -1).to(torch.float64)
    if len(x) < 20:
        raise ValueError(f"intrinsic_dimension needs at least 20 points, got {len(x)}")
    distances = torch.cdist(x, x)
    distances.fill_diagonal_(math.inf)
    r = distances.topk(2, dim=1, largest=False).values
    keep = r[:, 0] > 0
    if int(keep.sum()) < 20:
        raise ValueError("intrinsic_dimension: fewer than 20 distinct points")
    mu = (r[keep, 1] / r[keep, 0]).sort().values
    n = len(mu)
    used = int(n * (1 - discard))
    empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
    lx = mu.log()[:used]
    ly = -torch.log1p(-empirical)[:used]
    return float((lx * ly).sum() / (lx * lx).sum())


def gram_invariants(x: Tensor, center: bool = True) -> Tensor:
    """The configuration of each sample's vectors up to rotations and reflections (and translations when
    ``center``): the upper triangle of the Gram matrix of ``x`` (shape ``(n, points, d)``), a complete
    invariant of the O(d) (E(d)) action: coordinates on the quotient, shape (n, P (P + 1) / 2)."""
    if x.dim() != 3:
        raise ValueError(f"gram_invariants expects (samples, points, dim), got shape {tuple(x.shape)}")
    if center:
        x = x - x.mean(dim=1, keepdim=True)
    gram = x @ x.transpose(1, 2)
    i, j = torch.triu_indices(x.shape[1], x.shape[1])
    return gram[:, i, j]


def distance_invariants(x: Tensor) -> Tensor:
    """Each sample's pairwise distances between its points, sorted: invariant to rotations, reflections,
    translations *and* the order of the points (a point cloud as a set), shape (n, P (P - 1) / 2). Not a
    complete invariant (some non-congruent sets share their distances), but it removes the labelling of the
    points, which the Gram matrix keeps."""
    if x.dim() != 3:
        raise ValueError(f"distance_invariants expects (samples, points, dim), got shape {tuple(x.shape)}")
    i, j = torch.triu_indices(x.shape[1], x.shape[1], offset=1)
    return (x[:, i] - x[:, j]).norm(dim=-1).sort(dim=1).values


@dataclass(frozen=True)
class PowerLaw:
    """``error ~ C n^-alpha``, fitted by least squares in log-log, with a 95 % interval on ``alpha``."""

    alpha: float
    low: float
    high: float
    C: float


def power_law(sizes: Iterable[float], errors: Iterable[float]) -> PowerLaw:
    """Fit ``error = C n^-alpha`` to a sample-size sweep (at least 3 sizes; several seeds per size may be
    passed as repeated sizes). The interval uses the slope's standard error and Student's t."""
    n = torch.as_tensor(list(sizes), dtype=torch.float64)
    e = torch.as_tensor(list(errors), dtype=torch.float64)
    if len(n) != len(e) or len(torch.unique(n)) < 3 or len(n) < 3:
        raise ValueError("power_law needs matching sizes and errors with at least 3 distinct sizes")
    if (n <= 0).any() or (e <= 0).any():
        raise ValueError("power_law needs positive sizes and errors")
    x, y = n.log(), e.log()
    xm, ym = x.mean(), y.mean()
    slope = float(((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum())
    intercept = float(ym - slope * xm)
    dof = len(x) - 2
    if dof > 0:
        residual = y - (intercept + slope * x)
        se = math.sqrt(float((residual**2).sum()) / dof / float(((x - xm) ** 2).sum()))
        half = _student_t95(dof) * se
    else:
        half = math.nan
    return PowerLaw(-slope, -slope - half, -slope + half, math.exp(intercept))


def _student_t95(dof: int) -> float:
    """Two-sided 95 % quantile of Student's t (table up to 30 degrees of freedom, then the normal's)."""
    table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]
    return table[dof - 1] if dof <= len(table) else (2.042 if dof <= 30 else _Z95)
