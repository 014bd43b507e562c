"""The trainer reaches known primal and dual solutions, and resumes bit for bit."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ace


class Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


class One(nn.Module):
    def forward(self, x):
        return torch.ones_like(x)


# the Lagrangian in units of the loss, the optimiser stepping the gate: ace < 0.2's defaults
CLASSIC = dict(formulation="lagrangian", update="simultaneous", scale="none")


def gate_problem(constraint, dual_lr=0.2, steps=800, dtype=torch.float32, loss_scale=1.0, **kw):
    """min a (gamma - 1)^2 with f_eq = 0 and f_neq = 1, so the model output is gamma itself.

    Solved by the constrained step alone (ace.PrimalDual, which Trainer.fit runs bit for bit, see
    test_primal_dual.py): a loader and records would only add time. ``kw`` are DualSettings, over CLASSIC's,
    and ``step_gates``.
    """
    torch.manual_seed(0)
    model = ace.relax(nn.Sequential(Zero()), where=["0"], branch=lambda name, m: One()).to(dtype)
    step_gates = kw.pop("step_gates", False)
    core = ace.PrimalDual(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        [constraint],
        dual=ace.DualSettings(**{**CLASSIC, "lr": dual_lr, **kw}),
        slack_lr=0.1,
        gate_lr=0.1,
        step_gates=step_gates,
    )
    x, y = torch.zeros(1, 1, dtype=dtype), torch.ones(1, 1, dtype=dtype)
    for _ in range(steps):
        core.step(loss_scale * nn.functional.mse_loss(model(x), y))
    gate = model[0].gate.item()
    return core, gate, core.multipliers()[constraint.name].item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equality_gate_reaches_zero_with_known_multiplier(dtype):
    # L = (g-1)^2 + lam g  ->  g* = 0, lam* = 2
    core, gate, lam = gate_problem(ace.GateConstraint(tolerance=0.0, equality=True), dtype=dtype)
    assert gate == pytest.approx(0.0, abs=1e-4)
    assert lam == pytest.approx(2.0, abs=1e-3)
    assert core.multipliers()["gate"].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss_scale", [1.0, 8.0])
def test_in_units_of_the_loss_scale_the_multiplier_is_a_relative_price(dtype, loss_scale):
    # L = a (g-1)^2 + s (lam g + c/2 g^2) with s = 2a  ->  g* = 0, lam* = 2a / s = 1, whatever a;
    # the core steps the gate (ace's default) by -eta grad / s
    core, gate, lam = gate_problem(
        ace.GateConstraint(tolerance=0.0, equality=True),
        dtype=dtype,
        loss_scale=loss_scale,
        scale=2.0 * loss_scale,
        formulation="augmented",
        update="alternating",
        step_gates=True,
    )
    assert gate == pytest.approx(0.0, abs=1e-4)
    assert lam == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("rho", [0.5, 2.0])
def test_resilient_rho_is_relative_to_the_loss_scale(rho):
    # min a (g-1)^2 / s + rho/2 u^2 s.t. |g| <= u with s = a  ->  u* = 2/(2+rho), lam* = rho u*, whatever a
    for a in (1.0, 100.0):
        constraint = ace.GateConstraint(resilient=True, rho=rho)
        core, gate, lam = gate_problem(constraint, steps=1500, loss_scale=a, scale=a, step_gates=True)
        assert core.slacks["gate"].item() == pytest.approx(2 / (2 + rho), abs=1e-3)
        assert lam == pytest.approx(rho * 2 / (2 + rho), abs=1e-3)


def test_inequality_gate_reaches_tolerance():
    # |g| <= 0.3 active: g* = 0.3, lam* = 2 (1 - 0.3)
    _, gate, lam = gate_problem(ace.GateConstraint(tolerance=0.3))
    assert gate == pytest.approx(0.3, abs=1e-4)
    assert lam == pytest.approx(1.4, abs=1e-3)


def test_resilient_gate_keeps_the_optimal_slack():
    # min (g-1)^2 + rho/2 u^2 s.t. |g| <= u  ->  u* = 2/(2+rho), lam* = rho u*
    rho = 2.0
    core, gate, lam = gate_problem(ace.GateConstraint(resilient=True, rho=rho), steps=1500)
    slack = core.slacks["gate"].item()
    assert slack == pytest.approx(2 / (2 + rho), abs=1e-3)
    assert gate == pytest.approx(slack, abs=1e-3)
    assert lam == pytest.approx(rho * slack, abs=1e-3)


def test_fixed_penalty_has_no_dual_step():
    # (g-1)^2 + w |g| with w = 1  ->  g* = 1 - w/2
    _, gate, lam = gate_problem(ace.GateConstraint(penalty=1.0, equality=True))
    assert gate == pytest.approx(0.5, abs=1e-4)
    assert lam == 1.0


@pytest.mark.parametrize(
    "settings, dual_lr, steps",
    [
        (dict(optimizer="nupi", kp=0.5), 0.2, 1000),
        (dict(optimizer="adam"), 0.02, 800),  # Adam's steps do not shrink with the violation: a small lr
        (dict(update="alternating"), 0.2, 1000),
        (dict(formulation="augmented", update="alternating"), 0.2, 1000),
    ],
)
def test_other_dual_settings_reach_the_same_solution(settings, dual_lr, steps):
    _, gate, lam = gate_problem(ace.GateConstraint(equality=True), steps=steps, dual_lr=dual_lr, **settings)
    assert gate == pytest.approx(0.0, abs=1e-3)
    assert lam == pytest.approx(2.0, abs=1e-2)


def test_inequality_multipliers_stay_nonnegative_and_equality_ones_take_either_sign():
    # equality with target g = 0 when the loss pulls gamma to -1: multiplier -2
    torch.manual_seed(0)
    model = ace.relax(nn.Sequential(Zero()), where=["0"], branch=lambda name, m: One())
    data = DataLoader(TensorDataset(torch.zeros(1, 1), -torch.ones(1, 1)), batch_size=1)
    for constraint, sign in ((ace.GateConstraint(equality=True), -1), (ace.GateConstraint(tolerance=0.5), 1)):
        model[0].gate.data.fill_(1.0)
        trainer = ace.Trainer(
            model,
            nn.functional.mse_loss,
            torch.optim.SGD(model.parameters(), lr=0.1),
            constraints=[constraint],
            dual=ace.DualSettings(lr=0.2, **CLASSIC),
            step_gates=False,
            log_every=1,
            progress=False,
        )
        trainer.fit(data, max_steps=600, print_summary=False)
        multipliers = [
            r[f"constraint/{constraint.name}.0/multiplier"] for r in trainer.history if "loss" in r
        ]
        if sign > 0:
            assert min(multipliers) >= 0.0
        else:
            assert multipliers[-1] == pytest.approx(-2.0, abs=1e-2)


def test_gate_constraint_without_gates_is_refused():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="ace.relax"):
        ace.Trainer(
            model,
            nn.functional.mse_loss,
            torch.optim.SGD(model.parameters(), lr=0.1),
            constraints=[ace.GateConstraint()],
        )


def test_optimizer_missing_the_gates_is_refused_when_it_should_step_them():
    model = nn.Sequential(nn.Linear(2, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ace.relax(model, where=["0"])
    with pytest.raises(ValueError, match="does not hold"):
        ace.Trainer(
            model, nn.functional.mse_loss, optimizer, constraints=[ace.GateConstraint()], step_gates=False
        )
    ace.Trainer(
        model, nn.functional.mse_loss, optimizer, constraints=[ace.GateConstraint()]
    )  # ace steps them


def test_resilient_equality_is_refused():
    with pytest.raises(ValueError, match="resilient"):
        ace.GateConstraint(equality=True, resilient=True)


def test_a_gate_step_is_bounded_at_any_loss_scale():
    # one plain-SGD gate step at loss scale 1e4 would throw the gate far past 0 (the toy task with three
    # layers diverged this way); the trust region caps each step at gate_max_step
    torch.manual_seed(0)
    model = ace.relax(nn.Sequential(Zero()), where=["0"], branch=lambda name, m: One())
    data = DataLoader(TensorDataset(torch.zeros(1, 1), torch.ones(1, 1)), batch_size=1)
    trainer = ace.Trainer(
        model,
        lambda out, y: 1e4 * nn.functional.mse_loss(out, -y),
        torch.optim.SGD(model.parameters(), lr=0.05),
        constraints=[ace.GateConstraint(tolerance=0.0, equality=True)],
        gate_max_step=0.1,
        log_every=1,
        progress=False,
    )
    trainer.fit(data, max_steps=3, print_summary=False)
    gates = [1.0] + [r["gate/0"] for r in trainer.history if "loss" in r][1:] + [model[0].gate.item()]
    assert all(abs(a - b) <= 0.1 + 1e-6 for a, b in zip(gates, gates[1:]))
    assert gates[-1] == pytest.approx(0.7)  # the loss pulls the gate down at the full allowed speed


def test_auto_tolerance_start_is_the_mean_over_several_batches():
    torch.manual_seed(0)
    x = torch.randn(64, 2) * torch.linspace(0.1, 3.0, 64).unsqueeze(1)  # batches of very different deviation
    loader = DataLoader(TensorDataset(x, x), batch_size=8)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
    sym = ace.Symmetry(ace.groups.SO2(), inputs="vector", output="vector")
    constraint = ace.DeviationConstraint(tolerance=ace.schedules.Linear("auto", 0.0, steps=10))
    trainer = ace.Trainer(
        model,
        nn.functional.mse_loss,
        torch.optim.SGD(model.parameters(), lr=0.0),
        symmetry=sym,
        constraints=[constraint],
        eval_samples=2,
        progress=False,
    )
    per_batch = []
    generator = torch.Generator().manual_seed(2)  # the trainer's seed (0) + 2
    with torch.no_grad():
        for xb, _ in loader:
            per_batch.append(ace.equivariance_deviation(model, xb, sym, 2, False, generator).item())
    trainer.fit(loader, max_steps=1, print_summary=False)
    start = trainer.tolerance_starts["deviation"]
    assert start == pytest.approx(sum(per_batch) / len(per_batch), rel=1e-5)
    assert max(per_batch) > 3 * min(per_batch)  # one batch alone would have set a very different start
