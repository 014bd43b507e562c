"""Diagnostics: known answers for the symmetrisation gap, the per-layer audit, TwoNN and the power-law fit."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ace
from ace.symmetry import SO2, SO3, Euclidean, Permutation
from ace.symmetry.diagnostics import (
    audit,
    distance_invariants,
    gram_invariants,
    intrinsic_dimension,
    inverse,
    power_law,
    symmetrization_gap,
)
from ace.tasks.toy import RadialVectorLayer, RadialVectorNet, target

PLANE = ace.Symmetry(SO2(), inputs="vector", output="vector")


def test_inverse_undoes_the_element():
    g = Euclidean(SO3()).sample(5, torch.Generator().manual_seed(0), dtype=torch.float64)
    identity = g @ inverse(g)
    assert torch.allclose(identity.matrix, torch.eye(3, dtype=torch.float64).expand(5, 3, 3), atol=1e-12)
    assert torch.allclose(identity.translation, torch.zeros(5, 3, dtype=torch.float64), atol=1e-12)
    p = Permutation().sample(4, torch.Generator().manual_seed(1), size=7)
    assert torch.equal((p @ inverse(p)).permutation, torch.arange(7).expand(4, 7))


def test_an_equivariant_model_is_its_own_orbit_average():
    torch.manual_seed(0)
    model = RadialVectorNet(hidden=16, layers=2).double()
    x = torch.randn(64, 2, dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, target(x, breaking=0.5)), batch_size=16)
    gap = symmetrization_gap(model, loader, PLANE, nn.functional.mse_loss, samples=4)
    assert abs(gap.gap) < 1e-12 and gap.relative_deviation < 1e-20
    assert gap.batches == 4 and gap.samples == 4


def fitted_mlp(breaking):
    """An MLP fitted to the planar field with the given symmetry breaking, and its validation loader."""
    torch.manual_seed(0)
    x, xv = torch.randn(1024, 2), torch.randn(512, 2)
    y = target(x, breaking=breaking)
    model = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(250):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, DataLoader(TensorDataset(xv, target(xv, breaking=breaking)), batch_size=64)


def test_the_gap_is_positive_only_when_the_data_break_the_symmetry():
    broken, symmetric = (
        symmetrization_gap(*fitted_mlp(b), PLANE, nn.functional.mse_loss, samples=8) for b in (0.5, 0.0)
    )
    assert broken.low > 0 and "break" in broken.verdict
    assert symmetric.gap < 0.05 * broken.gap and "break" not in symmetric.verdict
    assert broken.relative_deviation > 10 * symmetric.relative_deviation


class ComponentwiseTanh(nn.Module):
    """A classic silent bug: an elementwise non-linearity applied to vector components."""

    def forward(self, v):
        return torch.tanh(v)


def test_audit_names_the_broken_layer():
    torch.manual_seed(0)
    model = nn.Sequential(
        RadialVectorLayer(1, 4, 16), ComponentwiseTanh(), RadialVectorLayer(4, 1, 16)
    ).double()
    x = torch.randn(32, 1, 2, dtype=torch.float64)
    ranked = audit(model, x, {"0": PLANE, "1": PLANE, "2": PLANE})
    assert ranked[0][0] == "1" and ranked[0][1] > 1e-3
    assert all(value < 1e-20 for _, value in ranked[1:])
    with pytest.raises(ValueError, match="no submodule 'layers.9'"):
        audit(model, x, {"layers.9": PLANE})


def on_sphere(n, generator):
    p = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    return p / p.norm(dim=1, keepdim=True)


def on_torus(n, generator):
    a, b = 2 * math.pi * torch.rand(2, n, generator=generator, dtype=torch.float64)
    return torch.stack([(2 + a.cos()) * b.cos(), (2 + a.cos()) * b.sin(), a.sin()], dim=1)


@pytest.mark.parametrize(
    "points, dim",
    [
        (on_sphere, 2),
        (on_torus, 2),
        (lambda n, g: torch.randn(n, 5, generator=g, dtype=torch.float64), 5),
    ],
)
def test_two_nn_recovers_known_dimensions_embedded_in_r10(points, dim):
    g = torch.Generator().manual_seed(0)
    manifold = points(2000, g)
    embedding = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))[0][
        :, : manifold.shape[1]
    ]
    x = manifold @ embedding.T + 3.0  # a rotated, shifted copy in R^10
    assert intrinsic_dimension(x) == pytest.approx(dim, rel=0.1)


def test_gram_invariants_forget_rotations_and_translations_only():
    g = Euclidean(SO3()).sample(4, torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    moved = torch.einsum("nij,npj->npi", g.matrix, x) + g.translation[:, None]
    assert torch.allclose(gram_invariants(x), gram_invariants(moved), atol=1e-12)
    assert not torch.allclose(gram_invariants(x), gram_invariants(x * 1.1))
    assert gram_invariants(x).shape == (4, 21)


def test_distance_invariants_also_forget_the_order_of_the_points():
    g = Euclidean(SO3()).sample(4, torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    moved = torch.einsum("nij,npj->npi", g.matrix, x) + g.translation[:, None]
    shuffled = moved[:, torch.randperm(6, generator=torch.Generator().manual_seed(1))]
    assert torch.allclose(distance_invariants(x), distance_invariants(shuffled), atol=1e-12)
    assert not torch.allclose(gram_invariants(x), gram_invariants(x[:, [1, 0, 2, 3, 4, 5]]))
    assert not torch.allclose(distance_invariants(x), distance_invariants(x * 1.1))
    assert distance_invariants(x).shape == (4, 15)


def test_power_law_recovers_the_exponent():
    g = torch.Generator().manual_seed(0)
    sizes = [250, 500, 1000, 2000, 4000] * 3
    errors = [3.0 * n**-0.5 * math.exp(0.05 * torch.randn(1, generator=g).item()) for n in sizes]
    fit = power_law(sizes, errors)
    assert fit.low < 0.5 < fit.high and fit.high - fit.low < 0.1
    assert fit.C == pytest.approx(3.0, rel=0.3)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="at least 20 points"):
        intrinsic_dimension(torch.randn(5, 3))
    with pytest.raises(ValueError, match="at least 3 distinct sizes"):
        power_law([100, 200], [0.1, 0.05])
    with pytest.raises(ValueError, match="samples, points, dim"):
        gram_invariants(torch.randn(5, 3))


def test_probe_reports_every_section_of_a_run(runs, capsys):
    from ace.cli import main

    gated, plain = runs
    assert main(["probe", str(gated), "--samples", "2"]) == 0
    text = capsys.readouterr().out
    assert "symmetrisation gap" in text and "95 % interval" in text
    assert "| layers.0 " in text and "local: the layer on its own recorded inputs" in text
    assert "| Gram invariants (quotient by O(d) and translations; the task's group: SO2()) | 1 " in text
    assert main(["probe", str(plain), "--samples", "2"]) == 0
    assert "declares no layer actions" in capsys.readouterr().out


def test_probe_names_a_run_without_a_model(runs, tmp_path, capsys):
    from ace.cli import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text((runs[1] / "config.yaml").read_text())
    assert main(["probe", str(tmp_path / "run")]) == 1
    assert "has no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "group"),
    [
        ("nbody_field:unconstrained", "Euclidean(O3"),
        ("spectral_partial:unconstrained", "SignFlip"),
        ("images:strict", None),
    ],
)
def test_probe_reads_runs_of_the_other_tasks(tmp_path, capsys, config, group):
    from run_kit import CONFIGS

    from ace.cli import main
    from ace.config import load_config
    from ace.experiment import run

    sizes = [
        "data.train_size=24",
        "data.val_size=8",
        "data.test_size=8",
        "train.batch_size=8",
        "train.epochs=1",
    ]
    name, method = config.split(":")
    cache = [f"data.cache_dir={tmp_path}"] if name.startswith("nbody") else []
    overrides = [*sizes, *cache, "log.progress=false", f"method={method}"]
    run(load_config(CONFIGS / f"{name}.yaml", overrides), tmp_path / "run")
    capsys.readouterr()
    assert main(["probe", str(tmp_path / "run"), "--samples", "2"]) == 0
    text = capsys.readouterr().out
    assert "symmetrisation gap" in text and "| inputs " in text
    assert (f"the task's group: {group}" in text) == (group is not None)  # images: no vector field
