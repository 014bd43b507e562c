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
