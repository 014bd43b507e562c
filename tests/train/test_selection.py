"""Test at the best validation step, per variant, without evaluating any checkpoint twice."""

import torch
from torch import nn

import ace
from ace.tasks.toy import RadialVectorLayer, RadialVectorNet, target
from ace.train import evaluate

SO2 = ace.Symmetry(ace.groups.SO2(), inputs="vector", output="vector")


def trainer(**kw):
    torch.manual_seed(0)
    model = ace.relax(
        RadialVectorNet(hidden=16, layers=2),
        where=lambda n, m: isinstance(m, RadialVectorLayer),
        hidden=16,
        example=torch.randn(4, 2),
    )
    t = ace.Trainer(
        model,
        nn.functional.mse_loss,
        torch.optim.Adam(ace.weights(model), lr=3e-3),
        symmetry=SO2,
        constraints=[ace.GateConstraint(tolerance=0.0, equality=True)],
        progress=False,
        eval_samples=2,
        **kw,
    )
    calls = []
    original = t.validation.evaluate

    def counted(loader, variants=("model", "eq"), readout=True):
        calls.append(tuple(variants))
        return original(loader, variants, readout)

    t.validation.evaluate = counted
    return t, calls


def data(seed, n=64):
    torch.manual_seed(seed)
    x = torch.randn(n, 2)
    return [(x[i : i + 16], target(x[i : i + 16])) for i in range(0, n, 16)]


def test_a_best_step_that_is_the_final_one_is_not_evaluated_again():
    t, calls = trainer()
    t.fit(data(1), data(2), epochs=6, test_loader=data(3), print_summary=False)
    assert {v["step"] for v in t.state.selected.values()} == {t.step}  # the loss fell to the end
    # one validation per epoch and the final test: nothing for the selection
    assert len(calls) == 6 + 1
    for variant, prefix in (("model", ""), ("eq", "eq/")):
        assert t.state.selected[variant]["test"]["loss"] == t.state.test_scores[f"test/{prefix}loss"]


def test_an_earlier_best_step_is_evaluated_once_for_the_variants_that_chose_it(monkeypatch):
    t, calls = trainer()
    # the validation loss rises after the second evaluation: both variants choose step 8
    rising = iter([3.0, 1.0, 2.0, 4.0, 5.0])
    original = t.selection.update

    def update(record, step):
        value = next(rising)
        return original({**record, "val/loss": value, "val/eq/loss": value}, step)

    monkeypatch.setattr(t.selection, "update", update)
    t.fit(data(1), data(2), epochs=5, test_loader=data(3), print_summary=False)
    assert {v["step"] for v in t.state.selected.values()} == {8}
    assert calls[6:] == [("model", "eq")]  # after 5 validations and the final test: one evaluation of step 8
    # the same numbers as a fresh evaluation of the restored weights
    for variant, _ in t.selection.restored(torch.device("cpu")):
        fresh = evaluate(
            t.model,
            data(3),
            nn.functional.mse_loss,
            symmetry=SO2,
            gate_names=list(t.gates),
            samples=2,
            seed=1,
        )
        prefix = "eq/" if variant == "eq" else ""
        assert t.state.selected[variant]["test"]["loss"] == fresh[f"{prefix}loss"]
        assert t.state.selected[variant]["val"]["loss"] == 1.0  # the record that selected it


def test_a_variant_alone_is_evaluated_with_the_same_scores_as_with_the_other():
    t, _ = trainer()
    t.fit(data(1), epochs=2, print_summary=False)
    both = t.evaluate(data(2))
    eq_only = t.evaluate(data(2), variants=("eq",))
    model_only = t.evaluate(data(2), variants=("model",))
    assert eq_only == {k: v for k, v in both.items() if k.startswith("eq/")}
    assert model_only == {k: v for k, v in both.items() if not k.startswith("eq/")}
    assert "deviation/layers.0" in model_only  # the per-layer read-out belongs to the model variant


def test_a_loss_keeps_its_smallest_value_and_an_accuracy_its_largest():
    from ace.train.selection import BestCheckpoints

    model = nn.Linear(1, 1)
    for metric, values, best in (("loss", [3.0, 1.0, 2.0], 2), ("accuracy", [0.5, 0.9, 0.7], 2)):
        selection = BestCheckpoints(model, metric, None, ("model",))
        for step, value in enumerate(values, 1):
            selection.update({f"val/{metric}": value}, step)
        assert selection.steps["model"]["step"] == best and selection.steps["model"]["value"] == values[1]


def stepped(folder=None, variants=("model", "eq"), metric="loss"):
    """A BestCheckpoints over a one-weight model whose weight is set to the step before each update."""
    from ace.train.selection import BestCheckpoints

    model = nn.Linear(1, 1, bias=False)
    selection = BestCheckpoints(model, metric, folder, variants)

    def update(step, **values):
        with torch.no_grad():
            model.weight.fill_(step)
        return selection.update({f"val/{k.replace('_', '/')}": v for k, v in values.items()}, step)

    return model, selection, update


def test_ties_keep_the_earliest_step_and_missing_or_nan_values_are_skipped_per_variant():
    _, selection, update = stepped()
    assert update(1, loss=2.0, eq_loss=float("nan")) == ["model"]
    assert update(2, eq_loss=1.0) == ["eq"]  # the model's value missing: eq still updates
    assert update(3, loss=2.0, eq_loss=1.0) == []  # equal is not better
    assert {v: b["step"] for v, b in selection.steps.items()} == {"model": 1, "eq": 2}
    _, selection, update = stepped(metric="accuracy")
    update(1, accuracy=0.5)
    update(2, accuracy=0.5)
    assert selection.steps["model"]["step"] == 1


def test_an_auc_is_maximised():
    from ace.train.selection import higher_is_better

    assert higher_is_better("auc") and higher_is_better("eq/auc") and not higher_is_better("loss")


def test_each_variant_restores_its_own_weights_and_the_current_ones_come_back(tmp_path):
    for folder in (None, tmp_path):
        model, selection, update = stepped(folder)
        update(1, loss=1.0, eq_loss=5.0)
        update(2, loss=2.0, eq_loss=3.0)
        update(3, loss=4.0, eq_loss=4.0)  # the current weights: 3
        seen = {v: (step, model.weight.item()) for v, step in selection.restored(torch.device("cpu"))}
        assert seen == {"model": (1, 1.0), "eq": (2, 2.0)}
        assert model.weight.item() == 3.0
        only = [v for v, _ in selection.restored(torch.device("cpu"), only=["eq"])]
        assert only == ["eq"]
    # best files only: the run's own previous.pt is not touched; each file says which step it holds
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_eq.pt", "best_model.pt"]
    assert torch.load(tmp_path / "best_eq.pt")["step"] == 2
    assert selection.path("eq") == tmp_path / "best_eq.pt" and stepped()[1].path("eq") is None


def test_a_variant_whose_best_file_is_gone_is_skipped(tmp_path):
    _, selection, update = stepped(tmp_path)
    update(1, loss=1.0, eq_loss=1.0)
    (tmp_path / "best_model.pt").unlink()
    assert [v for v, _ in selection.restored(torch.device("cpu"))] == ["eq"]


def test_evaluate_asks_only_for_the_pending_variants_and_returns_each_its_own_scores():
    model, selection, update = stepped()
    update(1, loss=1.0, eq_loss=9.0)
    update(2, loss=5.0, eq_loss=2.0)  # the final step: eq reads `final`, the model is evaluated at step 1
    asked = []

    def evaluate(loader, variants):
        asked.append((loader, tuple(variants), model.weight.item()))
        return {f"{p}loss": model.weight.item() * 10 + i for i, p in enumerate(("", "eq/"))}

    final = {"test": {"step": 2, "test/loss": 50.0, "test/eq/loss": 21.0}}
    out = selection.evaluate(evaluate, {"val": "V", "test": "T"}, torch.device("cpu"), final)
    assert asked == [("T", ("model",), 1.0)]
    assert out["model"] == {
        "step": 1,
        "selected_on": "val/loss",
        "val": {"loss": 1.0},
        "test": {"loss": 10.0},
    }
    assert out["eq"] == {
        "step": 2,
        "selected_on": "val/eq/loss",
        "val": {"loss": 2.0},
        "test": {"loss": 21.0},
    }
    # without final scores both are evaluated, each at its own step
    asked.clear()
    selection.evaluate(evaluate, {"test": "T"}, torch.device("cpu"))
    assert asked == [("T", ("model",), 1.0), ("T", ("eq",), 2.0)]
