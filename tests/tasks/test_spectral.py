"""The spectral task: graphs as documented, exactly sign-invariant scores, AUC, every config runs."""

import pytest
import torch
from run_kit import ROOT

pytest.importorskip("torch_geometric")

import ace  # noqa: E402
from ace.config import load_config  # noqa: E402
from ace.experiment import run  # noqa: E402
from ace.tasks import spectral  # noqa: E402

CONFIGS = ROOT / "configs"
#: every spectral config and the methods it is measured with in the README
METHODS = {
    "spectral": ("strict", "unconstrained", "ace", "ace_resilient", "scheduled"),
    "spectral_partial": ("strict", "unconstrained", "ace", "ace_resilient", "scheduled"),
    "spectral_dev": ("unconstrained", "scheduled", "ace_resilient"),
    "spectral_partial_dev": ("unconstrained", "scheduled", "ace_resilient"),
    "spectral_signnet": ("unconstrained",),
    "spectral_partial_signnet": ("unconstrained",),
}
FAST = {("spectral", "strict"), ("spectral", "ace"), ("spectral_signnet", "unconstrained")}
FAST |= {("spectral_dev", "ace_resilient")}  # the rest: slow
RUNS = [
    pytest.param(name, m, marks=() if (name, m) in FAST else pytest.mark.slow)
    for name, methods in METHODS.items()
    for m in methods
]
SMALL = dict(train_size=8, val_size=4, test_size=4)


@pytest.mark.parametrize("variant", spectral.VARIANTS)
def test_graphs_hold_out_real_edges_and_true_non_edges(variant):
    data = spectral.DataConfig(variant=variant, **SMALL)
    graph = spectral.make_graph(data, torch.Generator().manual_seed(0))
    assert graph.eig.shape == (24, 8) and graph.num_nodes == 24
    edges = {tuple(e) for e in graph.edge_index.T.tolist()}
    assert all((j, i) in edges for i, j in edges)  # undirected
    pairs = graph.pair_index.T.tolist()
    positives = [p for p, y in zip(pairs, graph.y.tolist()) if y == 1]
    negatives = [p for p, y in zip(pairs, graph.y.tolist()) if y == 0]
    assert len(negatives) >= len(positives) >= 1
    assert len(negatives) == len(positives) or variant == "partial"
    assert not any(tuple(p) in edges for p in positives + negatives)  # held out, not given to the model
    columns = graph.eig.double()
    assert torch.allclose(columns.T @ columns, torch.eye(8, dtype=torch.float64), atol=1e-5)  # orthonormal


def test_partial_graphs_sign_canonically_and_ask_for_the_first_copys_links():
    data = spectral.DataConfig(variant="partial", **SMALL)
    g = torch.Generator().manual_seed(1)
    second_copy_negatives = 0
    for _ in range(20):
        graph = spectral.make_graph(data, g)
        first = graph.eig[:12].sum(0)  # the canonical sign: the first copy's entries sum > 0, else the
        largest = graph.eig.gather(0, graph.eig.abs().argmax(0, keepdim=True))[0]  # largest entry is > 0
        assert ((first > 1e-5) | ((first.abs() < 1e-5) & (largest > 0))).all()
        pairs, y = graph.pair_index, graph.y
        assert (pairs[:, y == 1] < 12).all()  # every positive lies in the first copy
        second_copy_negatives += int((pairs[:, y == 0] >= 12).all(0).sum())
    assert second_copy_negatives > 0  # held-out links of the second copy are asked for, as negatives


@pytest.mark.parametrize("name", ["equivariant", "signnet"])
def test_scores_are_exactly_sign_invariant(name):
    t = spectral.build(spectral.DataConfig(**SMALL), spectral.ModelConfig(name=name), seed=0)
    from torch_geometric.data import Batch

    batch = Batch.from_data_list(t.train[:4])
    batch.eig = batch.eig.double()
    model = t.model.double()
    assert ace.testing.assert_equivariant(model, batch, t.symmetry, samples=4, atol=1e-12) < 1e-12


def test_a_plain_network_on_raw_eigenvectors_is_measurably_not_invariant():
    t = spectral.build(spectral.DataConfig(**SMALL), spectral.ModelConfig(name="mlp"), seed=0)
    from torch_geometric.data import Batch

    batch = Batch.from_data_list(t.train[:4])
    assert ace.equivariance_deviation(t.model, batch, t.symmetry, samples=4, relative=True) > 1e-4


def test_auc_known_answers():
    y = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert spectral.auc(torch.tensor([3.0, 2.0, 1.0, 0.0]), y) == 1.0
    assert spectral.auc(torch.tensor([0.0, 1.0, 2.0, 3.0]), y) == 0.0
    assert spectral.auc(torch.zeros(4), y) == 0.5


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="a graph of 8 nodes has 7 non-trivial eigenvectors, 8 asked for"):
        spectral.DataConfig(nodes=4, eigenvectors=8)
    with pytest.raises(ValueError, match="held_out"):
        spectral.DataConfig(held_out=1.5)


def test_one_config_per_data_variant():
    assert {p.stem for p in CONFIGS.glob("spectral*.yaml")} == set(METHODS)


@pytest.mark.parametrize(("name", "method"), RUNS)
def test_spectral_config_runs_a_few_steps(name, method, tmp_path):
    tiny = [
        "data.train_size=8",
        "data.val_size=4",
        "data.test_size=4",
        "train.batch_size=4",
        "train.max_steps=2",
        "train.epochs=0",
        "log.every=1",
        "log.progress=false",
    ]
    summary = run(load_config(CONFIGS / f"{name}.yaml", [*tiny, f"method={method}"]), tmp_path / "run")
    assert summary["steps"] == 2 and 0 <= summary["test"]["test/auc"] <= 1
