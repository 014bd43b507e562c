import pytest
import torch
from torch import nn
from torch_geometric.data import Batch, Data

from ace.symmetry import O3, SO3, Euclidean, Permutation, Symmetry
from ace.symmetry.testing import TOLERANCES, assert_equivariant

VECTOR = Symmetry(SO3(), "vector", "vector")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


class Radial(nn.Module):
    """f(x) = a(|x|) x, in float32 like a user's model."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.a(x.norm(dim=-1, keepdim=True)) * x


def test_passes_for_an_equivariant_model_in_float64_without_touching_it():
    model, x = Radial(), torch.randn(6, 3)
    before = [p.clone() for p in model.parameters()]
    worst = assert_equivariant(model, x, VECTOR, generator=gen())
    assert 0 <= worst < 1e-12
    assert all(
        p.dtype == torch.float32 and torch.equal(p, b)
        for p, b in zip(model.parameters(), before, strict=True)
    )
    assert x.dtype == torch.float32


def test_fails_for_a_generic_linear_map_with_the_measured_error():
    with pytest.raises(AssertionError) as info:
        assert_equivariant(nn.Linear(3, 3), torch.randn(6, 3), VECTOR, generator=gen())
    message = str(info.value)
    assert "Linear is not equivariant under Symmetry(SO3()" in message
    assert "max |f(g.x) - rho(g) f(x)| = " in message and "in 'output' exceeds" in message
    assert "torch.float64, 4 samples" in message


def test_tolerances_decide():
    def nearly(x):  # equivariant up to a 1e-6 perturbation
        return x + 1e-6 * x[:, :1]

    with pytest.raises(AssertionError, match=r"= \d\.\d+e-0[67] in 'output'"):
        assert_equivariant(nearly, torch.randn(4, 3), VECTOR, generator=gen())
    assert assert_equivariant(nearly, torch.randn(4, 3), VECTOR, atol=1e-4, generator=gen()) < 1e-4
    assert (
        assert_equivariant(Radial(), torch.randn(4, 3), VECTOR, dtype=torch.float32)
        < TOLERANCES[torch.float32][0]
    )


def test_runs_without_gradients():
    def model(x):
        assert not torch.is_grad_enabled()
        return x

    assert_equivariant(model, torch.randn(3, 3, requires_grad=True), VECTOR)


def test_dict_inputs_and_tuple_outputs():
    def model(pos, vel):
        c = pos - pos.mean(1, keepdim=True)
        return c + vel, (c * vel).sum(-1, keepdim=True)

    sym = Symmetry(Euclidean(O3()), {"pos": "position", "vel": "vector"}, ("vector", "scalar"))
    assert_equivariant(
        model, {"pos": torch.randn(2, 5, 3), "vel": torch.randn(2, 5, 3)}, sym, generator=gen()
    )

    def broken(pos, vel):
        return pos, vel.sum(-1, keepdim=True)

    with pytest.raises(AssertionError, match=r"in 'output\[0\]'"):
        assert_equivariant(
            broken, {"pos": torch.randn(2, 5, 3), "vel": torch.randn(2, 5, 3)}, sym, generator=gen()
        )


def test_graph_inputs_are_cast_and_checked():
    class Net(nn.Module):
        def forward(self, data):
            src, dst = data.edge_index
            assert data.pos.dtype == torch.float64 and data.edge_index.dtype == torch.long
            return torch.zeros_like(data.pos).index_add(0, dst, data.pos[dst] - data.pos[src])

    data = [Data(pos=torch.randn(n, 3), edge_index=torch.randint(0, n, (2, 2 * n))) for n in (3, 4)]
    batch = Batch.from_data_list(data)
    assert_equivariant(
        Net(), batch, Symmetry(Euclidean(O3()), {"pos": "position"}, "vector"), generator=gen()
    )
    assert_equivariant(Net(), data[0], Symmetry(Permutation(), {"pos": "vector"}, "vector"), generator=gen())
    assert batch.pos.dtype == torch.float32
