"""Every constraint kind and method trains a float32 and a float64 model (and under bfloat16 autocast)."""

import pytest
import torch
from torch import nn

import ace
from ace.tasks.toy import RadialVectorLayer, RadialVectorNet, target

SO2 = ace.Symmetry(ace.groups.SO2(), inputs="vector", output="vector")

CONSTRAINTS = {
    "ace": dict(tolerance=0.0, equality=True),
    "scheduled": dict(tolerance=ace.schedules.Linear(start=1.0, end=0.0, steps=8)),
    "ace_resilient": dict(resilient=True, rho=1.0),
    "penalty": dict(tolerance=0.0, penalty=0.5),
}


def relaxed_net(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 2, dtype=dtype)
    net = RadialVectorNet(hidden=8, layers=2).to(dtype)
    return ace.relax(net, where=lambda n, m: isinstance(m, RadialVectorLayer), hidden=8, example=x)


def train(model, constraint, dtype, formulation, steps=6, autocast=False):
    torch.manual_seed(1)
    x = torch.randn(32, 2, dtype=dtype)
    y = target(x)
    core = ace.PrimalDual(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-2),
        [constraint],
        symmetry=SO2,
        dual=ace.DualSettings(formulation=formulation),
    )
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(steps):
        with core.cached(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
            result = core.step(nn.functional.mse_loss(out.float(), y.float()), inputs=x, output=out)
        assert result.problem is None
    moved = any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    return core, result, moved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", list(CONSTRAINTS))
@pytest.mark.parametrize("kind", ["gate", "deviation"])
@pytest.mark.parametrize("formulation", ["lagrangian", "augmented"])
def test_every_constraint_trains_in_the_models_dtype(dtype, method, kind, formulation):
    model = (
        relaxed_net(dtype) if kind == "gate" else nn.Sequential(nn.Linear(2, 8), nn.SiLU(), nn.Linear(8, 2))
    )
    model.to(dtype)
    make = ace.GateConstraint if kind == "gate" else ace.DeviationConstraint
    core, result, moved = train(model, make(**CONSTRAINTS[method]), dtype, formulation)
    assert moved
    assert torch.isfinite(result.loss)
    for weight in core.duals.weights():
        assert weight.dtype == dtype  # float64 multipliers for a float64 model
    for u in core.slacks.values():
        assert u.dtype == dtype


@pytest.mark.parametrize("kind", ["gate", "deviation"])
def test_bfloat16_autocast_trains(kind):
    model = relaxed_net(torch.float32) if kind == "gate" else nn.Sequential(nn.Linear(2, 8), nn.Linear(8, 2))
    make = ace.GateConstraint if kind == "gate" else ace.DeviationConstraint
    _, result, moved = train(
        model, make(tolerance=0.0, equality=kind == "gate"), torch.float32, "augmented", autocast=True
    )
    assert moved and torch.isfinite(result.loss)


def test_float64_trainer_fit_under_a_deviation_constraint():
    # the regression of the fast Lagrangian: float32 multipliers met float64 violations
    torch.manual_seed(0)
    model = nn.Linear(2, 2).double()
    x = torch.randn(64, 2, dtype=torch.float64)
    trainer = ace.Trainer(
        model,
        nn.functional.mse_loss,
        torch.optim.Adam(model.parameters()),
        symmetry=SO2,
        constraints=[ace.DeviationConstraint(tolerance=0.1)],
    )
    summary = trainer.fit([(x, x)], epochs=2)
    assert summary["final"]["loss"] == pytest.approx(summary["final"]["loss"])  # a number, not NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_capped_slacks_of_ace_heldout_hold_at_zero_in_the_models_dtype_with_a_summed_loss(dtype):
    model = relaxed_net(dtype)
    torch.manual_seed(1)
    x = torch.randn(32, 2, dtype=dtype)
    core = ace.PrimalDual(  # one optimiser over all parameters, gates included
        model,
        torch.optim.Adam(model.parameters(), lr=1e-2),
        [ace.GateConstraint(resilient=True)],
        symmetry=SO2,
    )
    core.cap_slacks("gate", torch.tensor([0.0, float("inf")]))  # float32 caps for any model
    for _ in range(6):
        with core.cached():
            result = core.step(nn.functional.mse_loss(model(x), target(x), reduction="sum"))
        assert result.problem is None
    slack = core.slacks["gate"]
    assert slack.dtype == dtype and slack[0].item() == 0.0 and slack[1].item() > 0.0
