"""``ace probe RUN``: how symmetric the data of a run are, which layer breaks the symmetry, how many
dimensions the inputs have with and without the symmetry (see :mod:`ace.diagnostics`)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch

from ace.nn.relaxed import equivariant, gates
from ace.runs.metrics import format_table
from ace.symmetry.action import Symmetry
from ace.symmetry.diagnostics import (
    SymmetrizationGap,
    audit,
    distance_invariants,
    gram_invariants,
    intrinsic_dimension,
    symmetrization_gap,
)
from ace.utils.batches import split_batch

__all__ = ["probe", "data_symmetry", "input_clouds"]


def _load(run_dir: str | Path):
    """``(config, trainer with the run's last model, task, validation loader)`` of a run directory."""
    from ace.experiment import build_task, trained_run
    from ace.utils.loaders import make_loader

    cfg, trainer, _ = trained_run(run_dir, "probe")
    task = build_task(cfg)
    return cfg, trainer, task, make_loader(task.val, 32, shuffle=False)  # the gap's interval is over batches


def data_symmetry(run_dir: str | Path, samples: int = 8) -> SymmetrizationGap:
    """The symmetrisation gap of a run's last model on its validation set (probe a flexible model)."""
    cfg, trainer, _, val = _load(run_dir)
    return symmetrization_gap(trainer.model, val, trainer.symmetry, trainer.loss_fn, samples, cfg.seed)


def probe(run_dir: str | Path, samples: int = 8, points: int = 2000) -> str:
    """The probe report of a finished (or checkpointed) run, as markdown."""
    cfg, trainer, task, val = _load(run_dir)
    model, symmetry = trainer.model, trainer.symmetry
    lines = [f"# probe: {Path(run_dir).name}", "", f"method `{cfg.method}`, task `{cfg.task.name}`", ""]

    gap = symmetrization_gap(model, val, symmetry, trainer.loss_fn, samples, cfg.seed)
    lines += [
        "## Data symmetry (symmetrisation gap, validation set)",
        "",
        f"loss of the orbit-averaged model minus the model's: {gap.gap:.4g} "
        f"(95 % interval {gap.low:.4g} .. {gap.high:.4g}; loss {gap.loss:.4g} -> {gap.symmetrized_loss:.4g}, "
        f"{gap.batches} batches x {gap.samples} group elements): {gap.verdict}. Relative deviation of the "
        f"model: {gap.relative_deviation:.3g}.",
    ]
    if gap.relative_deviation < 1e-6:
        lines.append(
            "The model is (nearly) exactly equivariant, so the gap says nothing about the data: probe a "
            "flexible model (unconstrained, or a relaxed one) instead."
        )
    lines.append("")

    batch = next(iter(val))
    inputs = split_batch(batch)[0]
    lines += ["## Per-layer audit", ""]
    rows: list[list[Any]] = []
    if task.layer_symmetries:
        rows = [
            [name, value, "local: the layer on its own recorded inputs"]
            for name, value in audit(model, inputs, task.layer_symmetries, samples, cfg.seed)
        ]
    elif gates(model):
        from ace.symmetry.deviation import equivariance_deviation

        generator = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():
            for name in gates(model):
                with equivariant(model, keep=[name]):
                    value = float(equivariance_deviation(model, inputs, symmetry, samples, True, generator))
                rows.append([name, value, "the model with only this layer's branch on"])
        rows.sort(key=lambda r: -r[1])
    if rows:
        lines += [format_table(["layer", "relative deviation", "measured as"], rows), ""]
        lines.append(
            f"largest: `{rows[0][0]}`" if rows[0][1] > 1e-5 else "every layer is symmetric (<= 1e-5)"
        )
    else:
        lines.append(
            f"task `{cfg.task.name}` declares no layer actions (Task.layer_symmetries) and the model has "
            "no gated layers: nothing to audit"
        )
    lines += ["", "## Intrinsic dimension (TwoNN)", ""]
    raw, invariant, distances = input_clouds(task.train, symmetry, points)
    dims = [["inputs", raw.shape[1], intrinsic_dimension(raw)]]
    if invariant is not None:
        # Gram matrices forget every orthogonal map, so they quotient by at least the task's group
        name = f"Gram invariants (quotient by O(d) and translations; the task's group: {symmetry.group!r})"
        dims.append([name, invariant.shape[1], intrinsic_dimension(invariant)])
    if distances is not None:
        name = "sorted distances (also forgets the order of the points)"
        dims.append([name, distances.shape[1], intrinsic_dimension(distances)])
    lines += [
        format_table(["of", "ambient dim", "intrinsic dim"], dims),
        "",
        f"on {len(raw)} training inputs",
    ]
    return "\n".join(lines)


def input_clouds(
    dataset: Any, symmetry: Symmetry, limit: int = 2000
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(raw, invariants, distances)``: each input flattened; its fields' configuration up to the group's
    rotations and translations (Gram matrix of the centred position fields and the vector fields, plus the
    scalar fields; None when no field is a vector or a position); and, for graphs (whose node order is
    arbitrary), the sorted pairwise distances of the first position or vector field's points
    (:func:`ace.diagnostics.distance_invariants`; None for other inputs)."""
    raws, invariants, distances = [], [], []
    for item in itertools.islice(iter(dataset), limit):
        graph = hasattr(item, "num_nodes")
        inputs = item if graph else split_batch(item)[0]
        fields = symmetry.fields(symmetry.inputs, inputs, "input")
        tensors = [torch.as_tensor(x, dtype=torch.float64) for _, kind, x in fields if kind != "none"]
        raws.append(torch.cat([t.reshape(-1) for t in tensors]))
        vectors, scalars = [], []
        for _, kind, x in fields:
            x = torch.as_tensor(x, dtype=torch.float64)
            if kind in ("vector", "position"):
                points = x.reshape(-1, x.shape[-1])
                vectors.append(points - points.mean(0) if kind == "position" else points)
            elif kind == "scalar":
                scalars.append(x.reshape(-1))
        if vectors:
            gram = gram_invariants(torch.cat(vectors)[None], center=False)[0]
            invariants.append(torch.cat([gram, *scalars]))
            if graph and len(vectors[0]) > 1:
                distances.append(distance_invariants(vectors[0][None])[0])
    if len(raws) < 20:
        raise ValueError(
            f"probe needs at least 20 training inputs for the intrinsic dimension, got {len(raws)}"
        )
    stacked = lambda rows: torch.stack(rows) if rows else None  # noqa: E731
    return torch.stack(raws), stacked(invariants), stacked(distances)
