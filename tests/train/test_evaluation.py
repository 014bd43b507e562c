"""The read-out's cost is the user's to choose: how often, and on how many batches, layers are measured."""

import contextlib

import pytest
import torch
from torch import nn

import ace
import ace.train.evaluation as evaluation
from ace.tasks.toy import RadialVectorLayer, RadialVectorNet, target
from ace.train import evaluate

SO2 = ace.Symmetry(ace.groups.SO2(), inputs="vector", output="vector")


def relaxed():
    torch.manual_seed(0)
    net = RadialVectorNet(hidden=16, layers=2)
    return ace.relax(
        net, where=lambda n, m: isinstance(m, RadialVectorLayer), hidden=16, example=torch.randn(4, 2)
    )


def data(seed, n=64):
    torch.manual_seed(seed)
    x = torch.randn(n, 2)
    return [(x[i : i + 16], target(x[i : i + 16])) for i in range(0, n, 16)]


def test_per_layer_deviations_on_the_first_batches_equal_those_batches_alone():
    model, val = relaxed(), data(1)
    kw = dict(symmetry=SO2, gate_names=["layers.0", "layers.1"], samples=2, seed=3)
    subsample = evaluate(model, val, nn.functional.mse_loss, layer_batches=1, **kw)
    first = evaluate(model, val[:1], nn.functional.mse_loss, **kw)
    whole = evaluate(model, val, nn.functional.mse_loss, **kw)
    assert subsample["deviation/layers.0"] == first["deviation/layers.0"]
    assert subsample["loss"] == whole["loss"] and subsample["deviation"] == whole["deviation"]
    assert "deviation/layers.0" not in evaluate(model, val, nn.functional.mse_loss, layer_batches=0, **kw)


def test_readout_every_zero_measures_the_layers_at_the_end_only():
    model = relaxed()
    trainer = ace.Trainer(
        model,
        nn.functional.mse_loss,
        torch.optim.Adam(ace.weights(model), lr=3e-3),
        symmetry=SO2,
        constraints=[ace.GateConstraint(equality=True)],
        readout_every=0,
        progress=False,
    )
    summary = trainer.fit(data(1), data(2), epochs=3, test_loader=data(3), print_summary=False)
    vals = [r for r in trainer.history if "val/loss" in r]
    assert ["val/deviation/layers.0" in r for r in vals] == [False, False, True]
    assert "test/deviation/layers.0" in trainer.state.test_scores
    assert all("relative_deviation" in row for row in summary["layers"].values())


def test_variants_of_one_function_are_evaluated_once_and_read_as_if_each_were():
    """With a layer's branch closed, f_eq and 'relaxed at that layer' are one function, computed once: each
    score is bit for bit what the variant evaluated alone gives (over several batches, whose group elements
    must still move on after a variant read from another's)."""
    model, val = relaxed(), data(1)
    kw = dict(symmetry=SO2, gate_names=["layers.0", "layers.1"], samples=2, seed=3)
    model.get_submodule("layers.1").branch_enabled = False  # closed, as ace's ClosedGates leaves it
    both = evaluate(model, val, nn.functional.mse_loss, **kw)
    alone = evaluate(model, val, nn.functional.mse_loss, variants=("model",), layer_batches=0, **kw)
    eq = evaluate(model, val, nn.functional.mse_loss, variants=("eq",), **kw)
    assert {k: both[k] for k in alone} == alone and {k: both[k] for k in eq} == eq
    assert both["deviation/layers.1"] == both["eq/deviation"] != both["deviation/layers.0"]
    with ace.equivariant(model, keep=["layers.0"]):  # the model relaxed at layers.0 alone
        only = evaluate(model, val, nn.functional.mse_loss, variants=("model",), layer_batches=0, **kw)
    assert both["deviation/layers.0"] == only["deviation"]
    model.get_submodule("layers.0").branch_enabled = False  # every gate closed: all variants are f_eq
    closed = evaluate(model, val, nn.functional.mse_loss, **kw)
    assert closed["loss"] == closed["eq/loss"] and closed["deviation"] == closed["eq/deviation"]
    assert closed["deviation/layers.0"] == closed["eq/deviation"]


def test_sharing_layers_between_variants_changes_no_bit(monkeypatch):
    """The evaluation reuses the layers its variants share (ace.nn.relaxed.reuse_outputs): every score is
    bit for bit what computing each variant in full gives."""
    model, val = relaxed(), data(1)
    kw = dict(symmetry=SO2, gate_names=["layers.0", "layers.1"], samples=2, seed=3)
    shared = evaluate(model, val, nn.functional.mse_loss, **kw)
    monkeypatch.setattr(evaluation, "reuse_outputs", lambda model: contextlib.nullcontext())
    assert evaluate(model, val, nn.functional.mse_loss, **kw) == shared


def test_each_evaluation_gives_each_branch_its_held_out_benefit():
    """``heldout/<layer>``: the loss with the other branches only, less the model's, on the read-out's
    batches; 0 for a closed branch; not a metric with a best value."""
    model, val = relaxed(), data(1)
    with torch.no_grad():
        for gate in ace.gates(model).values():
            gate.fill_(0.5)
    kw = dict(symmetry=SO2, gate_names=["layers.0", "layers.1"], samples=2, seed=3)
    scores = evaluate(model, val, nn.functional.mse_loss, layer_batches=2, **kw)
    model_loss = evaluate(model, val[:2], nn.functional.mse_loss, variants=("model",), layer_batches=0, **kw)
    with ace.equivariant(model, keep=["layers.1"]):  # layers.0's branch removed
        without = evaluate(model, val[:2], nn.functional.mse_loss, variants=("model",), layer_batches=0, **kw)
    assert scores["heldout/layers.0"] == pytest.approx(without["loss"] - model_loss["loss"], rel=1e-6)
    assert scores["heldout/layers.0"] != 0 and scores["heldout/layers.1"] != 0
    model.get_submodule("layers.1").branch_enabled = False
    assert evaluate(model, val, nn.functional.mse_loss, **kw)["heldout/layers.1"] == 0
    best: dict = {}
    evaluation.track_best(best, {"step": 1, **{f"val/{k}": v for k, v in scores.items()}}, 1)
    assert "val/loss" in best and not any("heldout" in k for k in best)


def test_each_evaluation_reads_the_whole_model_on_transformed_data():
    """``heldout/transformed``: the loss on a transformed copy of each batch (one group element a batch from a
    generator of its own) less the loss as it is; about 0 for f_eq; the other scores unchanged by it."""
    from ace.symmetry.diagnostics import orbit_average

    model, val = relaxed(), data(1)
    with torch.no_grad():
        for gate in ace.gates(model).values():
            gate.fill_(0.5)
    kw = dict(symmetry=SO2, gate_names=["layers.0", "layers.1"], samples=2, seed=3)
    scores = evaluate(model, val[:1], nn.functional.mse_loss, **kw)
    model.eval()
    with torch.no_grad():
        x, y = val[0]
        turned = orbit_average(model, x, SO2, 1, torch.Generator().manual_seed(4))
        expected = float(nn.functional.mse_loss(turned, y)) - float(nn.functional.mse_loss(model(x), y))
    assert scores["heldout/transformed"] == pytest.approx(expected, rel=1e-6) and expected != 0
    every = evaluate(model, val, nn.functional.mse_loss, **kw)
    without = evaluate(model, val, nn.functional.mse_loss, layer_batches=0, **kw)
    assert {k: every[k] for k in without} == without  # each batch's deviations drew the same group elements
    with ace.equivariant(model):
        assert abs(evaluate(model, val, nn.functional.mse_loss, **kw)["heldout/transformed"]) < 1e-6
