"""Sign-equivariant layers and independent sign flips: exact in float64."""

import pytest
import torch
from torch import nn

import ace
from ace.nn import SignEquivariantGate, SignEquivariantMessage, SignNet
from ace.symmetry import SignFlip

K = 6


def test_independent_sign_flips_are_diagonal_and_draw_each_sign():
    g = SignFlip(K, independent=True).sample(500, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(g.matrix, torch.diag_embed(torch.diagonal(g.matrix, dim1=1, dim2=2)))
    signs = torch.diagonal(g.matrix, dim1=1, dim2=2)
    assert set(signs.unique().tolist()) == {-1.0, 1.0} and abs(signs.mean()) < 0.1
    assert (signs[:, 0] != signs[:, 1]).any()  # columns flip on their own
    assert repr(SignFlip(K, independent=True)) == "SignFlip(6, independent=True)"


class Message(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = SignEquivariantMessage(K)
        self.edges = torch.tensor([[0, 1, 2, 3, 4, 1], [1, 2, 3, 4, 0, 3]])

    def forward(self, v):
        return self.layer(v, self.edges)


@pytest.mark.parametrize(
    "build, output",
    [(lambda: SignEquivariantGate(K), "vector"), (Message, "vector"), (lambda: SignNet(K), "scalar")],
    ids=["gate", "message", "signnet"],
)
def test_layers_are_exactly_sign_equivariant_or_invariant(build, output):
    torch.manual_seed(0)
    model = build().double()
    v = torch.randn(5, K, dtype=torch.float64)  # one graph of 5 nodes: one sign draw for all its rows
    sym = ace.Symmetry(SignFlip(K, independent=True), inputs="vector", output=output)

    class OneGraph(nn.Module):  # the group acts per sample: present the graph as a batch of one
        def forward(self, x):
            return model(x[0])[None]

    assert ace.testing.assert_equivariant(OneGraph(), v[None], sym, samples=8, atol=1e-12) < 1e-12


def test_a_plain_mlp_is_not_sign_equivariant():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(K, 16), nn.SiLU(), nn.Linear(16, K)).double()
    sym = ace.Symmetry(SignFlip(K, independent=True), inputs="vector", output="vector")
    assert ace.equivariance_deviation(mlp, torch.randn(32, K, dtype=torch.float64), sym, samples=4) > 1e-3


def test_one_sign_draw_per_graph_in_a_torch_geometric_batch():
    tg = pytest.importorskip("torch_geometric.data")
    torch.manual_seed(0)
    layer = SignEquivariantMessage(K).double()

    class OnGraphs(nn.Module):
        def forward(self, data):
            return layer(data.eig, data.edge_index)

    graphs = [
        tg.Data(
            eig=torch.randn(n, K, dtype=torch.float64),
            edge_index=torch.tensor([[0, 1, 2], [1, 2, 0]]),
            num_nodes=n,
        )
        for n in (3, 4, 5)
    ]
    batch = tg.Batch.from_data_list(graphs)
    sym = ace.Symmetry(SignFlip(K, independent=True), inputs={"eig": "vector"}, output="vector")
    assert ace.testing.assert_equivariant(OnGraphs(), batch, sym, samples=4, atol=1e-12) < 1e-12
    g = sym.sample(batch, torch.Generator().manual_seed(1))
    flipped = sym.transform_inputs(batch, g).eig / batch.eig
    for i in range(3):  # every node of a graph shares its graph's signs
        rows = flipped[batch.batch == i]
        assert torch.equal(rows, rows[:1].expand_as(rows))


def test_per_pair_scores_are_invariant_outputs_of_any_length():
    """A link predictor scores node pairs (neither one row per node nor per graph): kind "scalar" is invariant
    whatever its rows, under groups that do not permute."""
    tg = pytest.importorskip("torch_geometric.data")
    torch.manual_seed(0)
    layer = SignEquivariantMessage(K).double()
    pairs = torch.tensor([[0, 1, 4, 7, 5], [3, 2, 5, 8, 6]])  # within a graph: its own signs

    class Scores(nn.Module):
        def forward(self, data):
            v = layer(data.eig, data.edge_index)
            return (v[pairs[0]] * v[pairs[1]]).sum(-1)  # sign invariant: products of one column's entries

    graphs = [
        tg.Data(
            eig=torch.randn(n, K, dtype=torch.float64), edge_index=torch.tensor([[0, 1], [1, 2]]), num_nodes=n
        )
        for n in (4, 5)
    ]
    batch = tg.Batch.from_data_list(graphs)
    sym = ace.Symmetry(SignFlip(K, independent=True), inputs={"eig": "vector"}, output="scalar")
    assert ace.testing.assert_equivariant(Scores(), batch, sym, samples=4, atol=1e-12) < 1e-12
