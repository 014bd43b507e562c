"""A trained model out of a run directory: f_eq or the relaxed model, with bounded branches baked in."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__all__ = ["export", "ExportError"]


class ExportError(ValueError):
    """A run whose model cannot be exported the way asked."""


def _bake(model: nn.Module) -> nn.Module:
    """Replace every parametrization of ``model`` (the bounded branches' spectral norm) by its current value,
    in place: torch cannot pickle a parametrized module. (In place because removing a parametrization from a
    deep copy also strips the original, whose class the copy shares.)"""
    from torch.nn import ModuleDict
    from torch.nn.utils import parametrize

    for m in model.modules():
        if parametrize.is_parametrized(m):
            assert isinstance(m.parametrizations, ModuleDict)  # what is_parametrized checks for
            for name in list(m.parametrizations):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)
    return model


def export(
    run_dir: str | Path, out_path: str | Path, equivariant: bool = False, batches: int = 3, samples: int = 4
) -> dict[str, float]:
    """Save a run's trained model and measure its equivariance error in float64.

    Rebuilds the model from the run's config, loads ``checkpoints/last.pt`` and, with ``equivariant``,
    strips it to f_eq. Writes the whole module to ``out_path`` (load with
    ``torch.load(path, weights_only=False)``, ace importable), with the bounded branches' spectral norm
    baked into plain weights (torch cannot pickle parametrized modules), and its ``state_dict`` next to it
    (``<stem>.state_dict.pt``, loads with ``weights_only=True``). The error is measured on the first
    ``batches`` validation batches with ``samples`` group elements each.

    Returns:
        ``{"max_abs_error": max |f(g.x) - rho(g) f(x)|, "deviation": D, "relative_deviation": D_rel}``.
    """
    import torch

    from ace.experiment import trained_run
    from ace.nn.relaxed import gates, strip
    from ace.symmetry.deviation import equivariance_deviation
    from ace.symmetry.testing import assert_equivariant, cast
    from ace.utils.batches import split_batch

    cfg, trainer, loaders = trained_run(run_dir, "export")
    model = trainer.model
    if equivariant:
        if not gates(model) and cfg.method != "strict":
            raise ExportError(
                f"{run_dir}: the model has no gated layers, so it has no exactly equivariant part f_eq to "
                "export; export it without --equivariant"
            )
        model = strip(model)
    model = _bake(model.eval())  # a model built for this export only
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, out_path)
    torch.save(model.state_dict(), out_path.with_name(out_path.stem + ".state_dict.pt"))

    symmetry = trainer.symmetry
    assert symmetry is not None  # every built-in task has one
    probe = copy.deepcopy(model).to(torch.float64)
    generator = torch.Generator().manual_seed(cfg.seed)
    worst = 0.0
    deviations: list[torch.Tensor] = []
    relatives: list[torch.Tensor] = []
    with torch.no_grad():
        for batch in itertools.islice(loaders["val"], batches):
            inputs = cast(split_batch(batch)[0], torch.float64)
            state = generator.get_state()
            worst = max(
                worst,
                assert_equivariant(probe, inputs, symmetry, samples, atol=math.inf, generator=generator),
            )
            for relative, sink in ((False, deviations), (True, relatives)):
                generator.set_state(state)
                sink.append(equivariance_deviation(probe, inputs, symmetry, samples, relative, generator))
    return {
        "max_abs_error": worst,
        "deviation": float(torch.stack(deviations).mean()),
        "relative_deviation": float(torch.stack(relatives).mean()),
    }
