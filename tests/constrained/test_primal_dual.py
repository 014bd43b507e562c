"""PrimalDual on its own: a plain loop equals Trainer.fit bit for bit; the state round trips."""

import copy
import json

import pytest
import torch
from run_kit import ROOT
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ace
from ace.tasks.toy import RadialVectorLayer, RadialVectorNet, target

SYMMETRY = ace.Symmetry(ace.groups.SO2(), inputs="vector", output="vector")


def setup(seed=0):
    """A relaxed toy network, its optimisers, constraints (gate equality and resilient deviation) and data."""
    torch.manual_seed(seed)
    x = torch.randn(96, 2)
    loader = DataLoader(TensorDataset(x, target(x, breaking=0.3)), batch_size=32, shuffle=True)
    model = ace.relax(
        RadialVectorNet(hidden=16, layers=2),
        where=lambda n, m: isinstance(m, RadialVectorLayer),
        example=x[:4],
    )
    weights = [p for n, p in model.named_parameters() if not n.endswith("gate")]
    optimizers = [
        torch.optim.Adam(weights, lr=3e-3),
        torch.optim.SGD(list(ace.gates(model).values()), lr=0.05),
    ]
    constraints = [
        ace.GateConstraint(tolerance=0.0, equality=True),
        ace.DeviationConstraint(tolerance=0.01, resilient=True, rho=10.0, samples=2),
    ]
    settings = dict(
        symmetry=SYMMETRY,
        dual=ace.DualSettings(formulation="augmented", update="alternating", lr=0.1),
        slack_lr=0.05,
        grad_clip=1.0,
        lr_schedule=ace.schedules.lr_schedule("cosine", total_steps=9, warmup=2),
    )
    return model, optimizers, constraints, settings, loader


def test_own_loop_equals_trainer_fit_bit_for_bit():
    model, optimizers, constraints, settings, loader = setup()
    trainer = ace.Trainer(
        model,
        nn.functional.mse_loss,
        optimizers,
        constraints=constraints,
        log_every=1,
        progress=False,
        **settings,
    )
    trainer.fit(loader, epochs=3, print_summary=False)

    mine, optimizers, constraints, settings, loader = setup()
    core = ace.PrimalDual(mine, optimizers, constraints, **settings)
    records = []
    for _ in range(3):
        for x, y in loader:
            with core.cached():
                out = mine(x)
                records.append(core.step(nn.functional.mse_loss(out, y), inputs=x, output=out).log())
    for (name, a), b in zip(model.state_dict().items(), mine.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(torch.equal(a, b) for a, b in zip(trainer.multipliers().values(), core.multipliers().values()))
    assert torch.equal(trainer.slacks["deviation"], core.slacks["deviation"])
    assert records == [{k: v for k, v in r.items() if k != "epoch"} for r in trainer.history if "loss" in r]


def test_state_dict_round_trip_continues_identically():
    """6 steps == 3 steps + state_dict/load_state_dict into a fresh core + 3 steps."""

    def run(split):
        model, optimizers, constraints, settings, loader = setup()
        core = ace.PrimalDual(model, optimizers, constraints, **settings)
        batches = list(loader) + list(loader)
        for i, (x, y) in enumerate(batches):
            if i == split:
                state = {
                    "core": core.state_dict(),
                    "model": model.state_dict(),
                    "opt": [o.state_dict() for o in optimizers],
                }
                model, optimizers, constraints, settings, _ = setup(seed=1)  # other weights, then restored
                model.load_state_dict(state["model"])
                core = ace.PrimalDual(model, optimizers, constraints, **settings)
                core.load_state_dict(state["core"])
            with core.cached():
                out = model(x)
                core.step(nn.functional.mse_loss(out, y), inputs=x, output=out)
        return model, core

    a, core_a = run(split=None)
    b, core_b = run(split=3)
    assert core_b.step_count == 6
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert all(
        torch.equal(p, q) for p, q in zip(core_a.multipliers().values(), core_b.multipliers().values())
    )


def test_step_result_is_the_log_record():
    model, optimizers, constraints, settings, loader = setup()
    core = ace.PrimalDual(model, optimizers, constraints, **settings)
    x, y = next(iter(loader))
    gates_before = {n: g.item() for n, g in ace.gates(model).items()}
    result = core.step(nn.functional.mse_loss(model(x), y), inputs=x, output=model(x))
    record = result.log(epoch=0)
    assert result.step == record["step"] == 1 and result.problem is None
    assert {k: record[f"gate/{k}"] for k in gates_before} == gates_before  # what the step saw
    assert record["constraint/deviation/slack"] == 0.0
    assert set(record) >= {
        "loss",
        "lagrangian",
        "constraint/gate.layers.0/multiplier",
        "constraint/deviation/deviation",
    }


def test_deviation_constraint_needs_the_batch():
    model, optimizers, constraints, settings, loader = setup()
    core = ace.PrimalDual(model, optimizers, constraints, **settings)
    x, y = next(iter(loader))
    with pytest.raises(ValueError, match="deviation constraint 'deviation' needs the batch"):
        core.step(nn.functional.mse_loss(model(x), y))


@pytest.mark.parametrize("formulation, c", [("lagrangian", 1.0), ("augmented", 3.0), ("augmented", 0.8)])
@pytest.mark.parametrize("seed", range(5))
def test_primal_lagrangian_equals_coopers_bit_for_bit(formulation, c, seed):
    """The step computes the Lagrangian itself (no per-step cooper objects): the same number as cooper's, and
    backpropagating ``objective + w^T v`` (one dot per constraint) gives cooper's gradient, bit for bit."""
    import cooper

    from ace.constrained.lagrangian import multiplier_weights, primal_lagrangian
    from ace.constrained.multipliers import make_problem

    constraints = [
        ace.GateConstraint(tolerance=0.0, equality=True, name="eq"),
        ace.GateConstraint(tolerance=0.1, name="ineq"),
    ]
    dual = ace.DualSettings(formulation=formulation, penalty_coefficient=c)
    _, made = make_problem(constraints, {"eq": 3, "ineq": 3}, dual, torch.device("cpu"))
    torch.manual_seed(seed)
    for constraint in made.values():  # multipliers of both signs, violations on both sides of 0
        constraint.multiplier.weight.data = torch.randn(3).abs() * torch.tensor([1.0, 0.0, 2.0])
    theta = torch.randn(4, requires_grad=True)
    objective = theta.pow(2).sum()
    violations = {"eq": theta[:3] - 0.5, "ineq": theta[1:].sin()}
    multipliers = {k: c.multiplier.weight.detach() for k, c in made.items()}
    ours = primal_lagrangian(objective, violations, multipliers, made)
    state = cooper.CMPState(
        loss=objective,
        observed_constraints={made[k]: cooper.ConstraintState(violation=v) for k, v in violations.items()},
    )
    theirs = state.compute_primal_lagrangian().lagrangian
    assert torch.equal(ours, theirs)
    weights = multiplier_weights(violations, made)
    surrogate = objective + sum(torch.dot(w, violations[k]) for k, w in weights.items())
    (g_ours,) = torch.autograd.grad(surrogate, theta, retain_graph=True)
    (g_theirs,) = torch.autograd.grad(theirs, theta)
    assert torch.equal(g_ours, g_theirs)


def test_plain_sgd_dual_step_equals_torch_sgd_and_coopers_projection():
    """The SGD dual step is applied directly: the same multipliers as torch's SGD (maximize) + cooper."""
    from ace.constrained.multipliers import dual_step, make_optimizer, make_problem

    constraints = [
        ace.GateConstraint(tolerance=0.0, equality=True, name="eq"),
        ace.GateConstraint(tolerance=0.1, name="ineq"),
    ]
    dual = ace.DualSettings(lr=0.37)

    def fresh():
        cmp, made = make_problem(constraints, {"eq": 3, "ineq": 3}, dual, torch.device("cpu"))
        primal = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        for c in made.values():
            c.multiplier.weight.data = torch.tensor([0.3, 0.2, 0.05])
        return make_optimizer(cmp, [primal], dual), made

    (optimizer, ours), (reference_optimizer, reference) = fresh(), fresh()
    torch.manual_seed(0)
    violations = {"eq": torch.randn(3), "ineq": torch.tensor([0.4, -1.0, -0.01])}  # one clipped at 0
    dual_step(optimizer, ours, violations, dual)
    for name, c in reference.items():
        c.multiplier.weight.grad = violations[name].clone()
    reference_optimizer.dual_step()
    for name in violations:
        assert torch.equal(ours[name].multiplier.weight, reference[name].multiplier.weight)
    assert ours["ineq"].multiplier.weight[1] == 0  # projected onto lambda >= 0


@pytest.mark.parametrize("update", ["simultaneous", "alternating"])
def test_the_reported_lagrangian_uses_the_multipliers_of_the_primal_step(update):
    """The Lagrangian is computed only when read: from the multipliers before the dual step (simultaneous) or
    after it (alternating), with the slack cost of the step's slacks."""

    model, optimizers, constraints, settings, loader = setup()
    settings["dual"] = ace.DualSettings(formulation="augmented", update=update, lr=0.1)
    core = ace.PrimalDual(model, optimizers, constraints, **settings)
    for x, y in loader:
        with core.cached():
            out = model(x)
            result = core.step(nn.functional.mse_loss(out, y), inputs=x, output=out)
    used = result.multipliers if update == "simultaneous" else core.multipliers()
    if update == "alternating":  # the dual step before the primal one moved them
        assert not torch.equal(used["gate"], result.multipliers["gate"])
    slack = result.slacks["deviation"]
    scale = core.scale.mean  # every term but the loss is in units of the loss's initial scale
    objective = result.loss + scale * (0.5 * constraints[1].rho * slack.pow(2).sum())
    from ace.constrained.lagrangian import primal_lagrangian

    expected = primal_lagrangian(objective, result.violations, used, core.duals.constraints, scale)
    torch.testing.assert_close(result.lagrangian, expected, rtol=1e-6, atol=0)


def _toy_trainer(*overrides):

    from ace.config import load_config
    from ace.experiment import prepare_run

    config = ROOT / "configs" / "toy_relaxed.yaml"
    trainer, loaders = prepare_run(load_config(config, ["data.train_size=64", *overrides]), None)
    return trainer, next(iter(loaders["train"]))


def test_a_negative_gate_violates_its_inequality_by_its_size():
    """``|gamma| <= eps`` constrains the gate's size: a gate at -0.5 under eps = 0.2 violates by 0.3 (a
    mutant that dropped the abs survived the suite: no test drove a gate negative)."""
    trainer, batch = _toy_trainer("method=scheduled", "constraint.tolerance=0.2")
    with torch.no_grad():
        for gate in trainer.gates.values():
            gate.fill_(-0.5)
    record = trainer.train_step(batch, record=True)
    for name in trainer.gates:
        assert record[f"constraint/gate.{name}/violation"] == pytest.approx(0.3)
    assert all(m > 0 for m in trainer.core.multipliers()["gate"].tolist())  # priced, not free


def test_a_slack_stepped_below_zero_is_projected_back():
    """A slack step that overshoots (slack_lr * rho > 1, from u = 0.5, no multiplier yet) lands on u = 0."""
    trainer, batch = _toy_trainer("method=ace_resilient", "optim.slack_lr=1.0", "constraint.rho=4.0")
    with torch.no_grad():
        for gate in trainer.gates.values():
            gate.zero_()
        trainer.slacks["gate"].fill_(0.5)
    trainer.train_step(batch)
    assert torch.equal(trainer.slacks["gate"], torch.zeros_like(trainer.slacks["gate"]))


def test_slack_caps_are_kept_in_the_state_and_a_restored_core_steps_bit_for_bit():
    def core_and_batches():
        model, optimizers, constraints, settings, loader = setup()
        return model, optimizers, ace.PrimalDual(model, optimizers, constraints, **settings), list(loader)

    def steps(model, core, batches):
        for x, y in batches:
            with core.cached():
                out = model(x)
                core.step(torch.nn.functional.mse_loss(out, y), inputs=x, output=out)

    model, optimizers, core, batches = core_and_batches()
    steps(model, core, batches)
    before = copy.deepcopy(core.state_dict())
    core.cap_slacks("deviation", torch.zeros(1))
    core.load_state_dict(before)  # a rollback to a state from before the cap: no cap
    assert core.slack_caps() == {}
    core.cap_slacks("deviation", torch.zeros(1))
    assert core.slacks["deviation"].item() == 0.0
    state = copy.deepcopy([core.state_dict(), model.state_dict(), [o.state_dict() for o in optimizers]])
    steps(model, core, batches)
    other_model, other_optimizers, other, _ = core_and_batches()
    other_model.load_state_dict(state[1])
    for o, saved in zip(other_optimizers, state[2]):
        o.load_state_dict(saved)
    other.load_state_dict(state[0])
    assert json.dumps({k: v.tolist() for k, v in other.slack_caps().items()}) == '{"deviation": [0.0]}'
    steps(other_model, other, batches)
    for a, b in zip(model.parameters(), other_model.parameters()):
        assert torch.equal(a, b)
    assert core.slacks["deviation"].item() == other.slacks["deviation"].item() == 0.0


def test_an_adam_dual_step_moves_every_multiplier_by_the_rate_whatever_its_violation():
    """Adam's first step is ``lr * sign(v)`` (plain SGD's would be ``lr * v``): the dual optimiser asked for
    is the one that steps."""
    from ace.constrained.multipliers import dual_step, make_optimizer, make_problem

    dual = ace.DualSettings(optimizer="adam", lr=0.1)
    cmp, made = make_problem([ace.GateConstraint(equality=True)], {"gate": 3}, dual, torch.device("cpu"))
    optimizer = make_optimizer(cmp, [torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)], dual)
    dual_step(optimizer, made, {"gate": torch.tensor([0.01, -5.0, 2.0])}, dual)
    torch.testing.assert_close(made["gate"].multiplier.weight, torch.tensor([0.1, -0.1, 0.1]))


def test_the_loss_scale_multiplies_every_constraint_term_of_the_lagrangian():
    from ace.constrained.multipliers import make_problem, primal_lagrangian

    constraints = [ace.GateConstraint(equality=True, name="eq"), ace.GateConstraint(name="ineq")]
    for formulation in ("lagrangian", "augmented"):
        dual = ace.DualSettings(formulation=formulation)
        _, made = make_problem(constraints, {"eq": 2, "ineq": 2}, dual, torch.device("cpu"), torch.float64)
        violations = {"eq": torch.tensor([0.5, -1.0]).double(), "ineq": torch.tensor([0.25, -2.0]).double()}
        multipliers = {"eq": torch.tensor([1.0, 2.0]).double(), "ineq": torch.tensor([3.0, 0.5]).double()}
        objective = torch.tensor(7.0, dtype=torch.float64)
        terms = primal_lagrangian(objective, violations, multipliers, made) - objective
        scaled = primal_lagrangian(objective, violations, multipliers, made, torch.tensor(4.0).double())
        assert terms != 0 and scaled - objective == 4 * terms


def test_an_auto_tolerance_starts_at_the_measured_value_once_and_a_resume_keeps_that_start():
    model, optimizers, constraints, settings, _ = setup()
    constraints[1].tolerance = ace.schedules.Linear("auto", 0.0, steps=10)
    core = ace.PrimalDual(model, optimizers, constraints, **settings)
    measured = []
    core.resolve_tolerances(lambda c: measured.append(c.name) or 0.5)
    core.resolve_tolerances(lambda c: measured.append(c.name) or 0.9)  # kept: no second measurement
    assert measured == ["deviation"] and core.tolerances() == {"gate": 0.0, "deviation": 0.5}
    core.rates.factor = 0.25
    state = core.state_dict()
    model, optimizers, constraints, settings, _ = setup()
    constraints[1].tolerance = ace.schedules.Linear("auto", 0.0, steps=10)
    fresh = ace.PrimalDual(model, optimizers, constraints, **settings)
    fresh.load_state_dict(state)
    assert fresh.tolerances() == {"gate": 0.0, "deviation": 0.5} and fresh.rates.factor == 0.25
    del state["lr_factor"]  # a checkpoint from before rollbacks: the full rate
    fresh.load_state_dict(state)
    assert fresh.rates.factor == 1.0


def test_a_measured_start_that_makes_the_tolerance_negative_is_refused_with_its_value():
    model, optimizers, constraints, settings, _ = setup()
    constraints[1].tolerance = ace.schedules.Linear("auto", 0.0, steps=10)
    core = ace.PrimalDual(model, optimizers, constraints, **settings)
    with pytest.raises(ValueError, match=r"constraint 'deviation' \(measured start -0.5\): .* down to -0.5"):
        core.resolve_tolerances(lambda c: -0.5)


def test_a_checkpoint_with_other_slacks_is_refused_naming_both():
    model, optimizers, constraints, settings, _ = setup()
    state = ace.PrimalDual(model, optimizers, constraints, **settings).state_dict()
    state["slacks"] = {"other": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"checkpoint slacks \['other'\] != \['deviation'\]"):
        ace.PrimalDual(model, optimizers, constraints, **settings).load_state_dict(state)


def test_multipliers_beyond_the_ceiling_are_clamped_on_both_sides_with_one_event_per_constraint():
    from ace.constrained.multipliers import clamp_multipliers, make_problem

    constraints = [ace.GateConstraint(equality=True, name="eq"), ace.GateConstraint(name="ineq")]
    _, made = make_problem(constraints, {"eq": 3, "ineq": 1}, ace.DualSettings(), torch.device("cpu"))
    made["eq"].multiplier.weight.data = torch.tensor([3.0, -5.0, 0.5])
    warned, events = set(), []
    with pytest.warns(UserWarning, match="'eq' reached the ceiling 2 at step 7"):
        clamp_multipliers(made, 2.0, warned, 7, events)
    assert made["eq"].multiplier.weight.tolist() == [2.0, -2.0, 0.5]
    assert [{k: v for k, v in e.items() if k != "message"} for e in events] == [
        {"step": 7, "event": "multiplier_ceiling", "constraint": "eq"}
    ]
    assert "may be infeasible" in events[0]["message"] and warned == {"eq"}
    made["eq"].multiplier.weight.data = torch.tensor([4.0, 0.0, 0.0])
    clamp_multipliers(made, 2.0, warned, 8, events)  # clamped again, said once
    assert made["eq"].multiplier.weight.tolist() == [2.0, 0.0, 0.0] and len(events) == 1


def test_the_ceiling_warning_is_said_once_across_a_rollback_and_a_resume_and_closed_gates_stay_closed():
    import warnings

    def core_of():
        model, optimizers, constraints, settings, loader = setup()
        return ace.PrimalDual(model, optimizers, constraints, max_multiplier=1e-9, **settings), model, loader

    def step(core, model, loader):
        x, y = next(iter(loader))
        with core.cached():
            out = model(x)
            core.step(nn.functional.mse_loss(out, y), inputs=x, output=out)

    core, model, loader = core_of()
    before = core.state_dict()
    with pytest.warns(UserWarning, match="reached the ceiling"):
        step(core, model, loader)
    core.closed.close("layers.0")
    after = core.state_dict()
    core.load_state_dict(before)  # a rollback to before the warning keeps it said
    fresh, fresh_model, _ = core_of()
    fresh.load_state_dict(after)  # a resume reads it from the checkpoint
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ceiling")
        step(core, model, loader)
        step(fresh, fresh_model, loader)
    assert fresh.closed.names == {"layers.0"} and not fresh_model.layers[0].branch_enabled


def test_dual_settings_accept_every_optimiser_and_refuse_a_zero_rate_naming_the_field():
    for optimizer in ("sgd", "nupi", "adam"):
        ace.DualSettings(optimizer=optimizer)
    for kw, message in (
        ({"optimizer": "rmsprop"}, r"dual.optimizer must be one of \('sgd', 'nupi', 'adam'\), got 'rmsprop'"),
        ({"lr": 0.0}, "dual.lr must be > 0, got 0.0"),
        ({"penalty_coefficient": 0.0}, "dual.penalty_coefficient must be > 0, got 0.0"),
        ({"kp": float("inf")}, "dual.kp must be a finite number, got inf"),
    ):
        with pytest.raises(ValueError, match=message):
            ace.DualSettings(**kw)


def test_a_model_without_parameters_lives_on_the_cpu_in_the_default_dtype():
    from ace.constrained.primal_dual import module_device, module_dtype

    assert module_device(nn.ReLU()) == torch.device("cpu") and module_dtype(nn.ReLU()) == torch.float32
    assert module_dtype(nn.Linear(2, 2).double()) == torch.float64


def test_gates_left_to_the_users_optimiser_take_its_step_and_each_step_is_bounded_by_gate_max_step():
    model, optimizers, constraints, settings, loader = setup()
    del settings["lr_schedule"]
    x, y = next(iter(loader))
    core = ace.PrimalDual(model, optimizers, constraints, step_gates=False, gate_max_step=None, **settings)
    before = {n: g.detach().clone() for n, g in core.gates.items()}
    with core.cached():
        out = model(x)
        core.step(nn.functional.mse_loss(out, y), inputs=x, output=out)
    for name, gate in core.gates.items():  # the SGD of setup() at lr 0.05, on the clipped gradient
        assert gate.grad is not None and torch.equal(gate.detach(), before[name].add(gate.grad, alpha=-0.05))
    model, optimizers, constraints, settings, loader = setup()
    core = ace.PrimalDual(model, optimizers, constraints, gate_lr=100.0, gate_max_step=1e-3, **settings)
    before = {n: g.detach().clone() for n, g in core.gates.items()}
    with core.cached():
        out = model(x)
        core.step(nn.functional.mse_loss(out, y), inputs=x, output=out)
    moves = torch.stack([(g.detach() - before[n]).abs() for n, g in core.gates.items()])
    torch.testing.assert_close(moves, torch.full_like(moves, 1e-3))  # a large push stops at the bound


def test_no_warning_when_the_optimiser_holds_only_the_weights_and_scheduled_gates_follow_their_schedule():
    import warnings

    model, _, _, settings, loader = setup()
    x, y = next(iter(loader))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ace.PrimalDual(model, [torch.optim.Adam(ace.weights(model))], [ace.GateConstraint()], **settings)
    del settings["symmetry"]
    core = ace.PrimalDual(
        model, [torch.optim.Adam(ace.weights(model))], [], gate_schedule=lambda t: 0.5**t, **settings
    )
    for _ in range(3):
        core.step(nn.functional.mse_loss(model(x), y))
    assert all(g.item() == 0.5**3 for g in core.gates.values())
