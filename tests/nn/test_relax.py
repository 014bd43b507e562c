import contextlib
import math

import pytest
import torch
from torch import nn

from ace.nn import GatedLayer, MLPBranch, equivariant, gates, relax, strip
from ace.nn.relaxed import reuse_outputs


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


class RadialScale(nn.Module):
    """f(x) = a(|x|) x on (..., 2): exactly SO(2)-equivariant, and without in/out_features."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x.norm(dim=-1, keepdim=True)) * x


class Pair(nn.Module):
    """A message-passing-like layer: (h, pos, scale=...) -> (h', pos', count)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 5)

    def forward(self, h: torch.Tensor, pos: torch.Tensor, scale: float = 1.0):
        return self.lin(h) * scale, pos * 2.0, h.shape[0]


class Pool(nn.Module):
    """(N, F) -> (F,): the default branch cannot match this output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(0)


class PairNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = Pair()

    def forward(self, h, pos):
        return self.layer(h, pos, scale=3.0)


def test_gates_are_scalar_parameters_named_by_module():
    model = relax(mlp(), where=nn.Linear, gate_init=0.5)
    named = gates(model)
    assert list(named) == ["0", "2"]
    for gate in named.values():
        assert isinstance(gate, nn.Parameter) and gate.shape == () and gate.item() == 0.5
        assert any(gate is p for p in model.parameters())
    assert isinstance(model[0], GatedLayer) and isinstance(model[1], nn.Tanh)
    assert "gate=0.5" in repr(model[0])


def test_forward_is_f_eq_plus_gate_times_f_neq():
    model = relax(mlp(), where=nn.Linear).eval()  # eval: no power iteration between the calls
    layer = model[0]
    with torch.no_grad():
        layer.gate.fill_(0.3)
    x = torch.randn(6, 3)
    torch.testing.assert_close(layer(x), layer.equivariant(x) + 0.3 * layer.branch(x))
    assert layer.branch.net[0].in_features == 3 and layer.branch.net[-1].out_features == 8


def test_gradients_reach_gate_and_branch():
    model = relax(mlp(), where=nn.Linear)
    model(torch.randn(4, 3)).square().sum().backward()
    assert all(g.grad is not None and g.grad != 0 for g in gates(model).values())
    assert model[0].branch.net[0].parametrizations.weight.original.grad is not None


def test_gate_zero_is_exactly_f_eq():
    model = relax(mlp(), where=nn.Linear, gate_init=0.0)
    x = torch.randn(5, 3)
    assert torch.equal(model(x), strip(model)(x))
    assert torch.equal(model(x), mlp()(x))  # same seed: the original weights


def test_equivariant_context_equals_strip_and_restores():
    model = relax(mlp(), where=nn.Linear).eval()
    model[2].branch_enabled = False  # a flag set by the user survives the context
    x = torch.randn(5, 3)
    relaxed = model(x)
    with equivariant(model) as inner:
        assert inner is model
        assert torch.equal(model(x), strip(model)(x))
        with equivariant(model):
            pass
        assert not model[0].branch_enabled  # the inner context restored the outer one's flags
    assert model[0].branch_enabled and not model[2].branch_enabled
    assert torch.equal(model(x), relaxed)
    assert not torch.allclose(relaxed, strip(model)(x))
    with pytest.raises(RuntimeError), equivariant(model):
        raise RuntimeError
    assert model[0].branch_enabled


def test_strip_copies_and_drops_gates_and_branches():
    model = relax(mlp(), where=nn.Linear)
    exact = strip(model)
    assert not any(isinstance(m, GatedLayer) for m in exact.modules())
    assert sum(isinstance(m, GatedLayer) for m in model.modules()) == 2  # original untouched
    assert [n for n, _ in exact.named_parameters()] == [n for n, _ in mlp().named_parameters()]
    assert exact[0].weight is not model[0].equivariant.weight
    assert torch.equal(exact[0].weight, model[0].equivariant.weight)


@pytest.mark.parametrize(
    "where",
    [
        nn.Linear,
        ["0", "2"],
        lambda name, m: isinstance(m, nn.Linear),
    ],
)
def test_where_forms(where):
    assert list(gates(relax(mlp(), where=where))) == ["0", "2"]


def test_where_single_name_and_nested_module():
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), nn.Linear(3, 1))
    relax(model, where="0.0")
    assert list(gates(model)) == ["0.0"] and isinstance(model[0][0], GatedLayer)


def test_shared_module_gets_one_gate():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    relax(model, where=nn.Linear)
    assert model[0] is model[2] and list(gates(model)) == ["0"]


def test_branch_factory_receives_name_module_and_arguments():
    seen = []

    class Bias(nn.Module):  # a learned constant: not rotation-equivariant
        def __init__(self, width):
            super().__init__()
            self.bias = nn.Parameter(torch.ones(width))

        def forward(self, x):
            return self.bias.expand(*x.shape[:-1], -1)

    def factory(name, module):
        seen.append((name, type(module)))
        return Bias(module.out_features)

    with pytest.raises(ValueError, match="cannot bound branch module.*Bias.*normalize='none'"):
        relax(mlp(), where=nn.Linear, branch=factory)
    seen.clear()
    model = relax(mlp(), where=nn.Linear, branch=factory, gate_init=2.0, normalize="none")
    assert seen == [("0", nn.Linear), ("2", nn.Linear)]
    x = torch.randn(4, 3)
    torch.testing.assert_close(model[0](x), model[0].equivariant(x) + 2.0)


def test_default_branch_sized_by_example():
    model = nn.Sequential(RadialScale(), RadialScale()).double()
    example = torch.randn(7, 5, 2, dtype=torch.float64)
    relax(model, where=RadialScale, hidden=16, example=example)
    branch = model[0].branch
    assert (
        isinstance(branch, MLPBranch) and branch.net[0].in_features == 2 and branch.net[0].out_features == 16
    )
    assert branch.net[0].weight.dtype == torch.float64 and model[0].gate.dtype == torch.float64
    assert model(example).shape == (7, 5, 2)


def test_a_default_branch_sized_from_in_and_out_features_takes_the_width_and_dtype_asked_for():
    branch = relax(mlp().double(), where=nn.Linear, hidden=5)[0].branch
    assert branch.net[0].out_features == 5 and branch.net[0].weight.dtype == torch.float64


def test_dry_run_keeps_mode_and_batch_norm_statistics():
    model = nn.Sequential(nn.BatchNorm1d(2), RadialScale())
    before = model[0].running_mean.clone()
    relax(model, where=RadialScale, example=torch.randn(8, 2) + 5.0)
    assert model.training and torch.equal(model[0].running_mean, before)


def test_tuple_outputs():
    torch.manual_seed(0)
    model = PairNet()
    h, pos = torch.randn(6, 4), torch.randn(6, 3)
    plain = model(h, pos)
    relax(model, where=Pair, outputs=(0, 1), example=(h, pos), gate_init=0.5)
    model.eval()
    layer = model.layer
    assert layer.outputs == (0, 1)
    out = model(h, pos)
    extra_h, extra_pos = layer.branch(h, pos)
    assert extra_h.shape == (6, 5) and extra_pos.shape == (6, 3)
    torch.testing.assert_close(out[0], plain[0] + 0.5 * extra_h)
    torch.testing.assert_close(out[1], plain[1] + 0.5 * extra_pos)
    assert out[2] == 6
    with equivariant(model):
        assert all(torch.equal(a, b) for a, b in zip(model(h, pos)[:2], plain[:2], strict=True))


def test_tuple_output_single_index():
    model = PairNet()
    h, pos = torch.randn(6, 4), torch.randn(6, 3)
    plain = model(h, pos)
    relax(model, where=Pair, outputs=1, example=(h, pos))
    out = model(h, pos)
    assert torch.equal(out[0], plain[0]) and not torch.allclose(out[1], plain[1])


def test_dict_example():
    model = PairNet()
    relax(model, where=Pair, outputs=(0,), example={"h": torch.randn(3, 4), "pos": torch.randn(3, 3)})
    assert model.layer.branch.net[-1].out_features == 5


@pytest.mark.parametrize(
    "model, kwargs, message",
    [
        (mlp(), {"where": nn.Conv1d}, "selects no submodule"),
        (mlp(), {"where": ["0", "5"]}, "5"),
        (mlp(), {"where": lambda name, m: True}, "model itself"),
        (nn.Sequential(nn.Sequential(nn.Linear(2, 2))), {"where": ["0", "0.0"]}, "0.0"),
        (nn.Sequential(RadialScale()), {"where": RadialScale}, "example="),
        (PairNet(), {"where": Pair, "example": (torch.randn(2, 4), torch.randn(2, 3))}, "outputs="),
        (
            PairNet(),
            {"where": Pair, "outputs": (5,), "example": (torch.randn(2, 4), torch.randn(2, 3))},
            "range",
        ),
        (
            PairNet(),
            {"where": Pair, "outputs": (2,), "example": (torch.randn(2, 4), torch.randn(2, 3))},
            "int",
        ),
        (nn.Sequential(Pool()), {"where": Pool, "example": torch.randn(3, 2)}, "leading shape"),
    ],
)
def test_errors(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        relax(model, **kwargs)


def test_layer_not_called_by_example():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = RadialScale()

        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="not called"):
        relax(Skip(), where=RadialScale, example=torch.randn(3, 2))


def test_relaxing_twice_is_an_error():
    model = relax(mlp(), where=["0"])
    with pytest.raises(ValueError, match="already relaxed"):
        relax(model, where=["2"])


def rotation(theta: float) -> torch.Tensor:
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def test_relaxed_is_not_equivariant_and_strip_is_exact():
    torch.manual_seed(1)
    model = nn.Sequential(RadialScale(), RadialScale()).double()
    x = torch.randn(16, 2, dtype=torch.float64)
    relax(model, where=RadialScale, example=x)
    exact = strip(model)
    R = rotation(0.7)  # rows are points: g.x = x R^T
    with torch.no_grad():
        relaxed_error = (model(x @ R.T) - model(x) @ R.T).abs().max()
        exact_error = (exact(x @ R.T) - exact(x) @ R.T).abs().max()
        with equivariant(model):
            context_error = (model(x @ R.T) - model(x) @ R.T).abs().max()
    assert relaxed_error > 1e-3
    assert exact_error < 1e-12 and context_error < 1e-12


def test_a_tuple_layer_relaxed_whole_scales_every_branch_entry_by_its_gate():
    """``outputs=None`` on a tuple output: each entry is ``f_eq + gamma * branch`` (a mutant that dropped the
    gate from this path survived the suite)."""

    class Both(nn.Module):
        def forward(self, a, b):
            return a, b

    class Branch(nn.Module):
        def forward(self, a, b):
            return torch.ones_like(a), 2 * torch.ones_like(b)

    layer = GatedLayer(Both(), Branch(), gate_init=0.25)
    a, b = torch.zeros(3), torch.zeros(2)
    out = layer(a, b)
    assert torch.equal(out[0], torch.full((3,), 0.25)) and torch.equal(out[1], torch.full((2,), 0.5))
    with torch.no_grad():
        layer.gate.zero_()
    assert all(torch.equal(o, z) for o, z in zip(layer(a, b), (a, b), strict=True))


def test_malformed_branches_and_settings_are_named():
    with pytest.raises(ValueError, match="relax: normalize must be one of"):
        relax(mlp(), where=nn.Linear, normalize="weight")
    x = (torch.randn(2, 4), torch.randn(2, 3))
    whole = GatedLayer(Pair(), MLPBranch(4, 5))  # f_eq returns 3 entries, the branch one tensor
    with pytest.raises(ValueError, match="the branch must return a tuple of 3 entries, like f_eq"):
        whole(*x)
    some = GatedLayer(Pair(), MLPBranch(4, (5, 3)), outputs=(0,))
    with pytest.raises(ValueError, match=r"branch returned 2 entries for outputs=\(0,\)"):
        some(*x)


def test_a_layer_without_a_float_argument_cannot_get_a_default_branch():
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(5, 2)

        def forward(self, i):
            return self.table(i)

    with pytest.raises(ValueError, match="layer '0' has no float tensor argument"):
        relax(nn.Sequential(Embed()), where=Embed, example=torch.tensor([1, 2]))


def counting(model: nn.Module) -> dict[str, int]:
    """Calls of every gated layer's f_eq and branch, by name (``"0.equivariant"``)."""
    calls: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, GatedLayer):
            for part in ("equivariant", "branch"):
                key = f"{name}.{part}"
                getattr(m, part).register_forward_hook(
                    lambda *_, key=key: calls.__setitem__(key, calls.get(key, 0) + 1)
                )
    return calls


def test_reuse_outputs_computes_each_shared_layer_once_and_bit_for_bit():
    torch.manual_seed(0)
    model = relax(
        nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)), nn.Linear
    )
    model.eval()
    x = torch.randn(16, 3)
    variants = [None, [], ["0"], ["2"], ["4"]]  # the model, f_eq, relaxed at one layer

    def outputs() -> list[torch.Tensor]:
        out = []
        for keep in variants:
            with (
                torch.no_grad(),
                equivariant(model, keep=keep) if keep is not None else contextlib.nullcontext(),
            ):
                out.append(model(x))
        return out

    alone = outputs()
    calls = counting(model)
    with reuse_outputs(model):
        shared = outputs()
    assert all(torch.equal(a, b) for a, b in zip(alone, shared, strict=True))
    # layer 0 once; layer 2 on the relaxed and on f_eq's activations; layer 4's f_eq on four inputs
    assert calls == {
        "0.equivariant": 1,
        "0.branch": 1,
        "2.equivariant": 2,
        "2.branch": 2,
        "4.equivariant": 4,
        "4.branch": 2,
    }
    assert all(m.kept is None for m in model.modules() if isinstance(m, GatedLayer))


def test_reuse_outputs_skips_calls_with_gradients_or_changed_in_place():
    torch.manual_seed(0)
    model = relax(nn.Sequential(nn.Linear(3, 4)), nn.Linear).eval()
    x = torch.randn(5, 3)
    calls = counting(model)
    with reuse_outputs(model), equivariant(model):  # the model's output is f_eq's, the kept tensor
        model(x).sum().backward()  # with gradients: nothing kept
        with torch.no_grad():
            first = model(x)
            assert model(x.clone()) is first and calls["0.equivariant"] == 2  # bitwise-equal arguments
            x[0, 0] = 1.0  # an argument changed in place: a new call
            second = model(x)
            second.add_(1.0)  # the kept output changed in place: computed again
            assert torch.allclose(model(x), second - 1.0) and calls["0.equivariant"] == 4
