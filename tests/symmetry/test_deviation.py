import pytest
import torch
from torch import nn
from torch_geometric.data import Batch, Data

from ace.symmetry import O3, SO2, SO3, Euclidean, Permutation, Symmetry, call_model
from ace.symmetry.deviation import _repeat_graph, equivariance_deviation

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def mlp(i, o):
    return nn.Sequential(nn.Linear(i, 16), nn.Tanh(), nn.Linear(16, o)).double()


class Radial(nn.Module):
    """f(x) = a(|x|) x: O(d)-equivariant on vectors."""

    def __init__(self):
        super().__init__()
        self.a = mlp(1, 1)

    def forward(self, x):
        return self.a(x.norm(dim=-1, keepdim=True)) * x


class Norm(nn.Module):
    """f(x) = a(|x|): invariant."""

    def __init__(self):
        super().__init__()
        self.a = mlp(1, 2)

    def forward(self, x):
        return self.a(x.norm(dim=-1, keepdim=True))


class DeepSets(nn.Module):
    """f(X)_i = W1 X_i + W2 mean_j X_j: permutation-equivariant on (B, N, F)."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Linear(4, 3).double(), nn.Linear(4, 3, bias=False).double()

    def forward(self, x):
        return self.w1(x) + self.w2(x.mean(1, keepdim=True))


class Centred(nn.Module):
    """f(P)_i = a(|p_i - mean P|) (p_i - mean P): E(3)-equivariant, positions in, vectors out."""

    def __init__(self):
        super().__init__()
        self.a = mlp(1, 1)

    def forward(self, pos, scale):
        c = pos - pos.mean(1, keepdim=True)
        return self.a(c.norm(dim=-1, keepdim=True)) * c * scale


class GraphNet(nn.Module):
    """An EGNN-like layer: node vectors sum_j (p_i - p_j) phi(|p_i - p_j|^2, x_i, x_j) and graph
    scalars sum_i |v_i|^2; E(3)- and permutation-equivariant unless ``breaking`` adds W pos."""

    def __init__(self, breaking=0.0):
        super().__init__()
        self.phi = mlp(5, 1)
        self.breaking = breaking

    def forward(self, data):
        src, dst = data.edge_index
        diff = data.pos[dst] - data.pos[src]
        w = self.phi(torch.cat([diff.square().sum(-1, keepdim=True), data.x[dst], data.x[src]], -1))
        v = torch.zeros_like(data.pos).index_add(0, dst, w * diff) + self.breaking * data.pos.flip(-1)
        batch = data.batch if data.batch is not None else torch.zeros(data.num_nodes, dtype=torch.long)
        num_graphs = int(batch.max()) + 1
        return v, torch.zeros(num_graphs, 1, dtype=v.dtype).index_add(
            0, batch, v.square().sum(-1, keepdim=True)
        )


def graphs(sizes=(3, 5, 4), seed=0):
    g = gen(seed)
    out = []
    for n in sizes:
        src, dst = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        keep = src != dst
        out.append(
            Data(
                pos=torch.randn(n, 3, generator=g, dtype=F64),
                x=torch.randn(n, 2, generator=g, dtype=F64),
                edge_index=torch.stack([src[keep], dst[keep]]),
                y=torch.randn(1, 3, generator=g, dtype=F64),
            )
        )
    return out


GRAPH_SYM = Symmetry(Euclidean(O3()), {"pos": "position", "x": "scalar"}, ("vector", "scalar"))
EXACT = [
    ("radial", Radial, Symmetry(O3(), "vector", "vector"), lambda: torch.randn(8, 3, dtype=F64)),
    ("radial-sets", Radial, Symmetry(SO3(), "vector", "vector"), lambda: torch.randn(8, 5, 3, dtype=F64)),
    ("planar", Radial, Symmetry(SO2(), "vector", "vector"), lambda: torch.randn(8, 2, dtype=F64)),
    ("norm", Norm, Symmetry(O3(), "vector", "scalar"), lambda: torch.randn(8, 3, dtype=F64)),
    (
        "deepsets",
        DeepSets,
        Symmetry(Permutation(), "scalar", "scalar"),
        lambda: torch.randn(8, 6, 4, dtype=F64),
    ),
    (
        "centred",
        Centred,
        Symmetry(Euclidean(O3()), ("position", "scalar"), "vector"),
        lambda: (torch.randn(8, 6, 3, dtype=F64), torch.rand(8, 1, 1, dtype=F64)),
    ),
    ("graph-e3", GraphNet, GRAPH_SYM, lambda: Batch.from_data_list(graphs())),
    ("graph-one", GraphNet, GRAPH_SYM, lambda: graphs((4,))[0]),
    (
        "graph-perm",
        GraphNet,
        Symmetry(Permutation(), {"pos": "vector"}, ("vector", "scalar")),
        lambda: Batch.from_data_list(graphs()),
    ),
]


@pytest.mark.parametrize("name, model, sym, inputs", EXACT, ids=[e[0] for e in EXACT])
def test_exactly_equivariant_models_have_zero_deviation(name, model, sym, inputs):
    torch.manual_seed(0)
    d = equivariance_deviation(model(), inputs(), sym, samples=3, generator=gen())
    assert d.shape == () and d.dtype == F64
    assert d < 1e-10


def test_generic_linear_map_deviates_and_has_a_gradient():
    model = nn.Linear(3, 3).double()
    x = torch.randn(16, 3, dtype=F64)
    d = equivariance_deviation(model, x, Symmetry(SO3(), "vector", "vector"), samples=4, generator=gen())
    assert d > 1e-2
    d.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.isfinite(grads).all() and grads.abs().sum() > 0


def test_graph_deviation_is_positive_for_a_breaking_model_and_differentiable():
    model = GraphNet(breaking=0.3)
    d = equivariance_deviation(model, Batch.from_data_list(graphs()), GRAPH_SYM, samples=2, generator=gen())
    assert d > 1e-3
    d.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.phi[0].weight.grad.abs().sum() > 0


def test_one_batched_forward_equals_the_loop_over_samples():
    torch.manual_seed(0)
    model, sym = nn.Linear(3, 3).double(), Symmetry(SO3(), "vector", "vector")
    x, k = torch.randn(5, 3, dtype=F64), 4
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    batched = equivariance_deviation(model, x, sym, samples=k, generator=gen(7))
    assert len(calls) == 2  # f(x) and one pass over the k transformed copies
    g = sym.sample(torch.cat([x] * k), gen(7))  # the elements the batched call drew
    loop = [
        (
            model(sym.transform_inputs(x, g[j * 5 : (j + 1) * 5]))
            - sym.transform_output(model(x), g[j * 5 : (j + 1) * 5])
        )
        .square()
        .sum(-1)
        .mean()
        for j in range(k)
    ]
    torch.testing.assert_close(batched, torch.stack(loop).mean())


def test_graph_k_fold_batch_matches_pyg_collation():
    batch = Batch.from_data_list(graphs())
    fast, slow = _repeat_graph(batch, 3, 3), Batch.from_data_list(batch.to_data_list() * 3)
    assert fast.num_graphs == 9
    for key in ("pos", "x", "edge_index", "y", "batch", "ptr"):
        assert torch.equal(fast[key], slow[key]), key
    for a, b in zip(fast.to_data_list(), slow.to_data_list(), strict=True):
        assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.pos, b.pos)
    model = GraphNet(breaking=0.3)
    d_fast = equivariance_deviation(model, batch, GRAPH_SYM, samples=3, generator=gen(1))
    d_slow = equivariance_deviation(model, slow, GRAPH_SYM, samples=1, generator=gen(1))
    torch.testing.assert_close(d_fast, d_slow)


def test_relative_mode_and_given_output():
    torch.manual_seed(0)
    model, sym = nn.Linear(3, 3).double(), Symmetry(SO3(), "vector", "vector")
    x = torch.randn(6, 3, dtype=F64)
    absolute = equivariance_deviation(model, x, sym, samples=2, generator=gen(3))
    relative = equivariance_deviation(model, x, sym, samples=2, relative=True, generator=gen(3))
    torch.testing.assert_close(relative, absolute / (model(x).square().sum(-1).mean() + 1e-12))
    given = equivariance_deviation(model, x, sym, samples=2, generator=gen(3), output=model(x))
    torch.testing.assert_close(given, absolute)
    with torch.no_grad():  # scaling f leaves the relative deviation unchanged
        model.weight.mul_(10), model.bias.mul_(10)
    scaled = equivariance_deviation(model, x, sym, samples=2, relative=True, generator=gen(3))
    torch.testing.assert_close(scaled, relative)


def test_output_fields_add_and_none_fields_are_skipped():
    torch.manual_seed(0)
    lin, x = nn.Linear(3, 3).double(), torch.randn(6, 3, dtype=F64)
    sym = Symmetry(SO3(), "vector", "vector")
    single = equivariance_deviation(lin, x, sym, samples=2, generator=gen(3))
    both = equivariance_deviation(
        lambda v: {"a": lin(v), "b": lin(v), "junk": torch.randn(6, 1)},
        x,
        Symmetry(SO3(), "vector", {"a": "vector", "b": "vector", "junk": "none"}),
        samples=2,
        generator=gen(3),
    )
    torch.testing.assert_close(both, 2 * single)


def test_dict_inputs_repeat_only_batched_tensors():
    def model(pos, shared):
        assert shared.shape == (2, 3)
        return pos + shared.sum()

    sym = Symmetry(SO3(), {"pos": "vector"}, "vector")
    d = equivariance_deviation(model, {"pos": torch.randn(5, 3), "shared": torch.ones(2, 3)}, sym, samples=3)
    assert d > 0
    assert call_model(model, {"pos": torch.zeros(5, 3), "shared": torch.zeros(2, 3)}).shape == (5, 3)


def test_samples_must_be_positive():
    with pytest.raises(ValueError, match="samples must be >= 1"):
        equivariance_deviation(
            Radial(), torch.randn(2, 3, dtype=F64), Symmetry(SO3(), "vector", "vector"), samples=0
        )


BROKEN = [
    ("cumsum-set", lambda x: x.cumsum(1), Symmetry(Permutation(), "scalar", "scalar"), torch.randn(4, 5, 2)),
    (
        "uncentred",
        lambda p, s: p * s,
        Symmetry(Euclidean(SO3()), ("position", "scalar"), "vector"),
        (torch.randn(4, 5, 3), torch.ones(4, 1, 1)),
    ),
    (
        "node-index",
        lambda d: (d.pos * torch.arange(d.num_nodes)[:, None], d.pos.sum(-1, keepdim=True)),
        Symmetry(Permutation(), {"pos": "vector"}, ("vector", "scalar")),
        Batch.from_data_list(graphs()),
    ),
]


@pytest.mark.parametrize("name, model, sym, inputs", BROKEN, ids=[b[0] for b in BROKEN])
def test_symmetry_breaking_models_deviate(name, model, sym, inputs):
    assert equivariance_deviation(model, inputs, sym, samples=2, generator=gen()) > 1e-3


def test_data_with_a_batch_vector_counts_as_a_batch():
    batch = Batch.from_data_list(graphs())
    data = Data(pos=batch.pos, x=batch.x, edge_index=batch.edge_index, batch=batch.batch)
    torch.manual_seed(0)
    model = GraphNet(breaking=0.3)
    d_data = equivariance_deviation(model, data, GRAPH_SYM, samples=2, generator=gen(5))
    torch.testing.assert_close(
        d_data, equivariance_deviation(model, batch, GRAPH_SYM, samples=2, generator=gen(5))
    )
    assert equivariance_deviation(GraphNet(), data, GRAPH_SYM, samples=2, generator=gen(5)) < 1e-10


def test_k_samples_of_a_single_graph_average_its_k_single_sample_deviations():
    """A single ``Data`` is evaluated in a loop over the k group elements: the mean, not the sum (a mutant
    that summed survived, as every such test used an exactly equivariant model)."""
    torch.manual_seed(0)
    model, data = GraphNet(breaking=0.3), graphs()[0]
    assert data.batch is None
    three = equivariance_deviation(model, data, GRAPH_SYM, samples=3, generator=gen(7))
    same_draws = gen(7)
    singles = [
        equivariance_deviation(model, data, GRAPH_SYM, samples=1, generator=same_draws) for _ in range(3)
    ]
    assert three > 1e-3
    torch.testing.assert_close(three, torch.stack(singles).mean())


def test_a_graph_batch_with_a_non_tensor_attribute_is_repeated_by_pyg():
    data = graphs((2, 3))
    for d, name in zip(data, "ab"):
        d.name = name
    fast = _repeat_graph(Batch.from_data_list(data), 3, 2)
    assert fast.num_graphs == 6 and fast.name == ["a", "b"] * 3
    assert torch.equal(fast.pos, torch.cat([Batch.from_data_list(data).pos] * 3))


def test_an_output_of_untransformed_fields_only_has_zero_deviation():
    model = nn.Linear(3, 3).double()
    x = torch.randn(4, 3, dtype=F64)
    assert equivariance_deviation(model, x, Symmetry(SO3(), "vector", "none"), generator=gen()).item() == 0.0
