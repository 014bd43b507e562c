"""The NaN policies (stop, skip, rollback) on every quantity a step or an evaluation reads, and the
multiplier ceiling."""

import math

import pytest
import torch
from fault_kit import (
    ARGS,
    OLD_DUAL,
    TOY,
    ConstantField,
    Net,
    checkpoint,
    cli,
    events,
    loader,
    make_trainer,
    nan_trainer,
)
from torch import nn

import ace
from ace.config import load_config
from ace.experiment import run
from ace.runs import read_metrics
from ace.train import NonFiniteError
from ace.train.faults import NanPolicy

# --------------------------------------------------------------------------------------- NaN policies


def test_nan_stop_names_quantity_and_step_and_keeps_the_checkpoint(tmp_path):
    trainer = nan_trainer([7], tmp_path)
    with pytest.raises(NonFiniteError, match=r"non-finite loss in step 7 \(train.on_nan=stop\).*last.pt"):
        trainer.fit(loader(), epochs=3, print_summary=False)
    assert checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 4
    assert events(trainer)[-1] == {"step": 7, "event": "non_finite", "quantity": "loss", "policy": "stop"}
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["event"] == "non_finite"


@pytest.mark.parametrize(
    "quantity, setup",
    [
        ("constraint 'deviation'", "deviation"),
        ("gradient", "gradient"),
        ("multiplier", "multiplier"),
    ],
)
def test_nan_stop_detects_each_quantity(monkeypatch, quantity, setup):
    loss = nn.functional.mse_loss
    if setup == "deviation":
        deviation = ace.constrained.constraints.equivariance_deviation
        monkeypatch.setattr(
            ace.constrained.constraints,
            "equivariance_deviation",
            lambda *a, **k: deviation(*a, **k) * float("inf"),
        )
    elif setup == "gradient":  # d sqrt(s)/ds = inf at s = 0, times ds/dout = 0: a NaN gradient
        loss = lambda out, y: nn.functional.mse_loss(out, y) + (out * 0).sum().sqrt()  # noqa: E731
    trainer = make_trainer(loss=loss)
    if setup == "multiplier":
        poison_dual_step(trainer, {1}, monkeypatch)
    with pytest.raises(NonFiniteError, match=f"non-finite {quantity} in step 1 .*no checkpoint was written"):
        trainer.fit(loader(), epochs=1, print_summary=False)


def poison_dual_step(trainer, at, monkeypatch):
    """The dual step of the steps in ``at`` (counted from 1) leaves an Inf multiplier."""
    dual_step = ace.constrained.multipliers.dual_step

    def poisoned(optimizer, constraints, violations, dual):
        dual_step(optimizer, constraints, violations, dual)
        if trainer.step + 1 in at:
            for c in constraints.values():
                c.multiplier.weight.data.fill_(float("inf"))

    monkeypatch.setattr(ace.constrained.multipliers, "dual_step", poisoned)


def test_nan_skip_undoes_a_bad_dual_step(monkeypatch):
    trainer = make_trainer(on_nan="skip")
    poison_dual_step(trainer, {2, 3}, monkeypatch)
    trainer.fit(loader(), epochs=1, print_summary=False)
    assert [e["quantity"] for e in events(trainer)] == ["multiplier", "multiplier"]
    multipliers = [r["constraint/deviation/multiplier"] for r in trainer.history if "loss" in r]
    assert len(multipliers) == 2 and all(map(math.isfinite, multipliers))  # steps 1 and 4
    assert torch.isfinite(trainer.multipliers()["deviation"]).all()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_the_step_check_reads_the_numbers_and_forgets_a_bad_gradient_after_reporting_it():
    """One sync reads the small quantities and flags a non-finite gradient once: the flag persists between
    steps (no allocation per step), so it must be reset when read, or every later step would be dropped."""
    from ace.constrained.step_check import StepCheck

    weights = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))]
    check = StepCheck(weights, torch.device("cpu"))
    quantities = {"loss": [torch.tensor(0.5)], "multiplier": [torch.tensor([1.0, -2.0])]}
    for grads, finite in [
        ((1.0, 2.0), True),
        ((math.nan, 2.0), False),
        ((1.0, math.inf), False),
        ((1.0, 2.0), True),
    ]:
        for w, g in zip(weights, grads):
            w.grad = torch.full_like(w, g)
        numbers, ok = check(quantities)
        assert numbers == {"loss": [0.5], "multiplier": [1.0, -2.0]} and ok is finite
        for w, g in zip(weights, grads):  # the check changes no value
            torch.testing.assert_close(w.grad, torch.full_like(w, g), rtol=0, atol=0, equal_nan=True)


def test_nan_rollback_reloads_halves_the_lr_and_finishes(tmp_path):
    # the same step fails twice: two rollbacks to the step-4 checkpoint
    trainer = nan_trainer([7, 7], tmp_path, on_nan="rollback")
    summary = trainer.fit(loader(), epochs=3, print_summary=False)
    assert summary["steps"] == 12 and trainer.state.rollbacks == 2
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)  # halved each time
    assert [(e["step"], e["policy"]) for e in events(trainer)] == [(7, "rollback"), (7, "rollback")]
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 13))  # the records of the undone steps 5-6 are gone
    assert checkpoint(tmp_path / "checkpoints" / "last.pt")["rollbacks"] == 2


def test_nan_rollback_gives_up_and_needs_a_checkpoint(tmp_path):
    trainer = nan_trainer([7] * 5, tmp_path, on_nan="rollback", max_rollbacks=2)
    with pytest.raises(NonFiniteError, match="rollback gave up after 2 rollbacks"):
        trainer.fit(loader(), epochs=3, print_summary=False)
    trainer = nan_trainer([2], on_nan="rollback")
    with pytest.raises(
        NonFiniteError, match="step 2 .rollback needs a checkpoint.; no checkpoint was written"
    ):
        trainer.fit(loader(), epochs=1, print_summary=False)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_through_a_config(tmp_path, capsys, policy):
    out = tmp_path / "run"  # plain SGD with a huge learning rate diverges within a few steps
    code = cli(
        "train", TOY, "--out", str(out), *ARGS, "optim.name=sgd", "optim.lr=1.0e30", f"train.on_nan={policy}"
    )
    assert code == 1  # skip drops the non-finite steps, but the weights are gone: the run is not finished
    assert "ace: error: non-finite" in capsys.readouterr().err
    assert read_metrics(out / "metrics.jsonl")[-1]["event"] == "non_finite"
    assert not (out / "summary.json").exists() and not (out / "checkpoints" / "last.pt").exists()
    if policy == "skip":
        assert any(r.get("policy") == "skip" for r in read_metrics(out / "metrics.jsonl"))


class FailingEval:
    """The trainer's evaluations with a NaN loss at the evaluations after the steps in ``steps``."""

    def __init__(self, trainer, *steps):
        self.evaluate, self.steps, self.trainer = trainer.validation.evaluate, list(steps), trainer
        trainer.validation.evaluate = self

    def __call__(self, loader, *args, **kwargs):
        scores = self.evaluate(loader, *args, **kwargs)
        if self.trainer.step in self.steps:
            self.steps.remove(self.trainer.step)
            scores["loss"] = float("nan")
        return scores


@pytest.mark.parametrize("policy", ["stop", "skip", "rollback"])
def test_a_non_finite_validation_writes_no_checkpoint(tmp_path, policy):
    trainer = make_trainer(tmp_path, on_nan=policy)
    FailingEval(trainer, 8)
    if policy == "rollback":  # back to the step-4 checkpoint with half the learning rate, then on to the end
        summary = trainer.fit(loader(), loader(), epochs=3, print_summary=False)
        assert summary["steps"] == 12 and trainer.state.rollbacks == 1
        assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05)
        assert [e["quantity"] for e in events(trainer)] == ["val loss"]
        return
    saved = []
    save = trainer.save_checkpoint
    trainer.save_checkpoint = lambda path=None: (saved.append(trainer.step), save(path))[1]
    if policy == "stop":
        with pytest.raises(NonFiniteError, match=r"non-finite val loss after step 8 .*last.pt"):
            trainer.fit(loader(), loader(), epochs=3, print_summary=False)
        assert saved == [4]
    else:  # skip: no checkpoint of that epoch, the run goes on and ends well
        trainer.fit(loader(), loader(), epochs=3, print_summary=False)
        assert saved == [4, 12, 12]
        assert trainer.state.best["val/loss"]["step"] != 8
    assert events(trainer)[0] == {"step": 8, "event": "non_finite", "quantity": "val loss", "policy": policy}


@pytest.mark.parametrize("policy", ["stop", "skip", "rollback"])
def test_weights_that_become_non_finite_without_a_non_finite_loss(tmp_path, policy):
    # an infinite learning rate: the one step sees finite weights, the model after it is NaN
    model = Net()
    trainer = make_trainer(tmp_path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=math.inf))
    trainer.nan_policy = NanPolicy(policy)
    with pytest.raises(
        NonFiniteError,
        match=r"non-finite (val loss|weights) after step 1 \((train.on_nan|rollback needs|at the end)",
    ):
        trainer.fit(loader(n=8), loader(n=8), epochs=1, print_summary=False)
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "checkpoints" / "last.pt").exists()


def test_a_non_finite_test_evaluation_is_not_a_finished_run(tmp_path):
    trainer = make_trainer(tmp_path, on_nan="skip")
    FailingEval(trainer, 8)  # the last step's evaluations are the final validation and the test
    trainer.validation.evaluate.steps = [8, 8]
    with pytest.raises(NonFiniteError, match="non-finite val loss after step 8 .at the end of the run"):
        trainer.fit(loader(), loader(), epochs=2, test_loader=loader(), print_summary=False)
    assert not (tmp_path / "summary.json").exists()


def test_infeasible_constraint_hits_the_multiplier_ceiling(tmp_path):
    trainer = make_trainer(tmp_path, model=ConstantField(), dual=OLD_DUAL, max_multiplier=2.0)
    with pytest.warns(UserWarning, match="reached the ceiling 2 .*may be infeasible"):
        trainer.fit(loader(), epochs=3, print_summary=False)
    assert trainer.multipliers()["deviation"].item() == 2.0
    logged = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("event") == "multiplier_ceiling"]
    assert len(logged) == 1 and logged[0]["constraint"] == "deviation"
    assert all(r["constraint/deviation/multiplier"] <= 2.0 for r in trainer.history if "loss" in r)


def test_max_multiplier_through_a_config(tmp_path):
    cfg = load_config(TOY, [*ARGS, "method=ace", "dual.max_multiplier=1.0e-3", "dual.lr=100.0"])
    with pytest.warns(UserWarning, match="ceiling 0.001"):
        run(cfg, tmp_path / "run")
    assert any(
        r.get("event") == "multiplier_ceiling" for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
    )


def test_the_nan_policy_rolls_back_only_to_a_saved_checkpoint_within_its_budget_and_stops_at_the_end():
    from ace.train.faults import NanPolicy

    rollback = NanPolicy("rollback", max_rollbacks=2)
    assert [rollback.decide(saved=True, rollbacks=n, final=False) for n in (0, 1, 2)] == ["rollback"] * 2 + [
        "stop"
    ]
    assert rollback.decide(saved=False, rollbacks=0, final=False) == "stop"
    assert NanPolicy("skip").decide(saved=False, rollbacks=9, final=False) == "skip"
    assert {
        NanPolicy(p).decide(saved=True, rollbacks=0, final=True) for p in ("stop", "skip", "rollback")
    } == {"stop"}
    with pytest.raises(ValueError, match="on_nan must be one of"):
        NanPolicy("explode")
