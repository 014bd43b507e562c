"""Scale-free dynamics: the loss multiplied by a > 0 changes no gate, slack or multiplier trajectory."""

import warnings

import pytest
import torch
from torch import nn

import ace
from ace.constrained.scale import WARMUP, LossScale
from ace.tasks.toy import RadialVectorLayer, RadialVectorNet, target

SO2 = ace.Symmetry(ace.groups.SO2(), inputs="vector", output="vector")


def relaxed(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    net = RadialVectorNet(hidden=16, layers=2).to(dtype)
    example = torch.randn(4, 2, dtype=dtype)
    return ace.relax(net, where=lambda n, m: isinstance(m, RadialVectorLayer), hidden=16, example=example)


def trajectory(scale, constraint, steps, dtype=torch.float32, eps=1e-8, seed=0, **kw):
    """The natural call: one Adam over model.parameters(), ace's defaults; the mse times ``scale``."""
    model = relaxed(dtype, seed)
    torch.manual_seed(seed + 1)
    x = torch.randn(256, 2, dtype=dtype)
    y = target(x) + kw.pop("breaking", 0.0) * torch.tensor([1.0, 0.0], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ace steps the gates itself"
        core = ace.PrimalDual(
            model, torch.optim.Adam(model.parameters(), lr=3e-3, eps=eps), [constraint], symmetry=SO2, **kw
        )
    records = []
    for step in range(steps):
        batch = slice(32 * (step % 8), 32 * (step % 8 + 1))
        with core.cached():
            out = model(x[batch])
            result = core.step(scale * nn.functional.mse_loss(out, y[batch]), inputs=x[batch], output=out)
        records.append(
            (
                torch.stack(list(result.gates.values())),
                result.multipliers[constraint.name].clone(),
                *(u.clone() for u in result.slacks.values()),
            )
        )
    return records, core


@pytest.mark.parametrize("constraint", ["ace", "ace_resilient"])
def test_trajectories_are_bit_for_bit_equal_at_power_of_two_loss_scales_in_float64(constraint):
    # powers of two scale every float exactly, and Adam without eps is scale-free: the design is exact here
    make = {
        "ace": lambda: ace.GateConstraint(tolerance=0.0, equality=True),
        "ace_resilient": lambda: ace.GateConstraint(resilient=True),
    }[constraint]
    reference, _ = trajectory(1.0, make(), 40, torch.float64, eps=0.0)
    for scale in (2.0**-7, 2.0**10):
        scaled, _ = trajectory(scale, make(), 40, torch.float64, eps=0.0)
        for a, b in zip(reference, scaled, strict=True):
            for p, q in zip(a, b, strict=True):
                assert torch.equal(p, q)


def test_in_units_of_the_loss_the_same_dynamics_would_differ():
    # the test above would pass for a trivially scale-free update: scale='none' must break it
    unscaled = dict(dual=ace.DualSettings(scale="none"), eps=0.0)
    a, _ = trajectory(1.0, ace.GateConstraint(equality=True), 20, torch.float64, **unscaled)
    b, _ = trajectory(64.0, ace.GateConstraint(equality=True), 20, torch.float64, **unscaled)
    assert not torch.equal(a[-1][0], b[-1][0])


@pytest.mark.parametrize("scale", [1e-2, 1e4])  # the extremes; every scale: benchmarks/out_of_the_box.py
def test_the_natural_call_closes_the_gates_at_any_loss_scale(scale):
    records, _ = trajectory(scale, ace.GateConstraint(tolerance=0.0, equality=True), 240)
    gates = torch.stack([r[0] for r in records]).abs()
    assert gates.max() <= 1.5
    assert gates[-1].max() <= 1e-2


def test_resilient_verdicts_are_the_same_at_loss_scales_1_and_100():
    finals = {}
    for scale in (1.0, 100.0):
        for breaking in (0.0, 1.0):
            records, core = trajectory(scale, ace.GateConstraint(resilient=True), 240, breaking=breaking)
            finals[scale, breaking] = records[-1][2]  # the slacks
    for breaking in (0.0, 1.0):
        torch.testing.assert_close(finals[1.0, breaking], finals[100.0, breaking], rtol=0.05, atol=1e-4)
    # and they tell broken from symmetric data apart
    assert finals[1.0, 1.0].max() >= 4 * finals[1.0, 0.0].max()  # ~5x at 240 steps (the toy task: 15x at 480)


def test_the_scale_is_the_mean_loss_of_the_first_steps_then_fixed():
    scale = LossScale("initial", torch.device("cpu"), torch.float64)
    losses = torch.linspace(3.0, 1.0, WARMUP + 10, dtype=torch.float64)
    values = [scale.update(loss).item() for loss in losses]
    assert values[0] == 3.0
    assert values[WARMUP - 1] == pytest.approx(losses[:WARMUP].mean().item(), rel=1e-12)
    assert values[-1] == values[WARMUP - 1]
    scale.restore()  # after the warm-up a step changes nothing, so a dropped one restores nothing
    assert scale.value() == values[-1]


def test_a_dropped_step_leaves_the_scale_as_it_was():
    scale = LossScale("initial", torch.device("cpu"), torch.float32)
    scale.update(torch.tensor(2.0))
    scale.update(torch.tensor(float("nan")))
    scale.restore()
    assert scale.value() == 2.0 and scale.steps == 1


@pytest.mark.parametrize("bad", ["loss", 0.0, -1.0, float("inf"), True])
def test_a_bad_scale_is_refused(bad):
    with pytest.raises(ValueError, match="dual.scale"):
        ace.DualSettings(scale=bad)


def test_the_users_optimiser_skips_the_gates_and_says_so_once():
    model = relaxed()
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0)
    with pytest.warns(UserWarning, match="steps the 2 gates itself"):
        core = ace.PrimalDual(model, optimizer, [ace.GateConstraint(equality=True)], symmetry=SO2)
    x = torch.randn(8, 2)
    before = {n: g.item() for n, g in ace.gates(model).items()}
    core.step(nn.functional.mse_loss(model(x), target(x)))
    for name, gate in ace.gates(model).items():
        assert abs(gate.item() - before[name]) < 0.5  # not Adam's step of lr = 1
        assert gate not in optimizer.state
    # ace.weights lists the rest, for an optimiser that never sees the gates
    assert len(ace.weights(model)) == len(list(model.parameters())) - 2


def test_the_natural_call_through_the_trainer_closes_the_gates_at_a_large_loss_scale():
    model = relaxed()
    torch.manual_seed(1)
    x = torch.randn(256, 2)
    batches = [(x[i : i + 32], target(x[i : i + 32])) for i in range(0, 256, 32)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ace steps the gates itself"
        trainer = ace.Trainer(
            model,
            lambda out, y: 1e4 * nn.functional.mse_loss(out, y),
            torch.optim.Adam(model.parameters(), lr=3e-3),
            symmetry=SO2,
            constraints=[ace.GateConstraint(tolerance=0.0, equality=True)],
            progress=False,
        )
    summary = trainer.fit(batches, epochs=30, print_summary=False)
    assert max(abs(g) for g in summary["gates"].values()) <= 1e-2
    assert 1e3 < summary["loss_scale"] < 1e4  # the untrained model's mse (O(0.1 - 1)) times 1e4


def test_a_deviation_constraint_is_priced_in_units_of_the_loss_scale_too():
    # a plain network under D <= eps: the weights see grad l + s lambda grad D, so l -> a l changes nothing
    def run(scale):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Linear(16, 2)).double()
        x = torch.randn(64, 2, dtype=torch.float64)
        core = ace.PrimalDual(
            model,
            torch.optim.Adam(model.parameters(), lr=1e-2, eps=0.0),
            [ace.DeviationConstraint(tolerance=1e-3, relative=True)],
            symmetry=SO2,
        )
        out = []
        for _ in range(20):
            prediction = model(x)
            result = core.step(
                scale * nn.functional.mse_loss(prediction, target(x)), inputs=x, output=prediction
            )
            out.append((result.values["deviation"], result.multipliers["deviation"].clone()))
        return out

    reference = run(1.0)
    assert reference[-1][1].item() > 0  # the constraint acted
    for a, b in zip(reference, run(2.0**9), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
