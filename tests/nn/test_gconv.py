"""Grid groups and group convolutions: the actions are homomorphisms; every layer is exactly equivariant."""

import pytest
import torch
from torch import nn

import ace
from ace.nn.gconv import E4Block, GroupConv, GroupPool, LiftingConv, cost
from ace.symmetry import C4, D4, GroupElement

GROUPS = [C4(), D4()]


def every(group):
    return GroupElement(group.matrices(torch.float64))


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("kind, shape", [("image", (3, 5, 5)), ("regular", (2, None, 6, 6))])
def test_actions_compose_like_the_group(group, kind, shape):
    sym = ace.Symmetry(group, inputs=kind, output=kind)
    shape = tuple(group.order if s is None else s for s in shape)
    elements = every(group)
    for i in range(group.order):
        for j in range(group.order):
            x = torch.randn(1, *shape, dtype=torch.float64)
            gi, gj = elements[i : i + 1], elements[j : j + 1]
            both = sym.transform_inputs(sym.transform_inputs(x, gj), gi)
            assert torch.equal(sym.transform_inputs(x, gi @ gj), both)
    x = torch.randn(group.order, *shape, dtype=torch.float64)
    g = every(group)
    from ace.symmetry.diagnostics import inverse

    assert torch.equal(sym.transform_inputs(sym.transform_inputs(x, g), inverse(g)), x)


def lifted(group, model):
    return nn.Sequential(LiftingConv(group, 2, 3), model).double()


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(
    "name, build, output",
    [
        ("lifting", lambda G: LiftingConv(G, 2, 3).double(), "regular"),
        ("group conv", lambda G: lifted(G, GroupConv(G, 3, 4, 5)), "regular"),
        ("e4", lambda G: lifted(G, E4Block(G, 3)), "regular"),
        ("pool", lambda G: lifted(G, nn.Sequential(GroupConv(G, 3, 4), GroupPool())), "image"),
        (
            "invariant",
            lambda G: lifted(G, nn.Sequential(GroupPool(), nn.Flatten(2), Mean(), nn.Linear(3, 5))),
            "scalar",
        ),
    ],
)
def test_layers_are_exactly_equivariant_in_float64(group, name, build, output):
    torch.manual_seed(0)
    model = build(group)
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    sym = ace.Symmetry(group, inputs="image", output=output)
    error = ace.testing.assert_equivariant(model, x, sym, samples=4, atol=1e-12)
    assert error < 1e-12


class Mean(nn.Module):
    def forward(self, x):
        return x.mean(-1)


def test_a_plain_cnn_has_a_measurable_deviation():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 2, 3, padding=1)).double()
    x = torch.randn(8, 2, 8, 8, dtype=torch.float64)
    sym = ace.Symmetry(C4(), inputs="image", output="image")
    assert ace.equivariance_deviation(cnn, x, sym, samples=4, relative=True) > 1e-2


def test_a_group_conv_has_a_group_order_fewer_parameters_than_a_plain_conv_of_its_width():
    G = D4()
    group = cost(GroupConv(G, 4, 4), torch.randn(1, 4, 8, 16, 16))
    plain = cost(nn.Conv2d(4 * 8, 4 * 8, 3, padding=1), torch.randn(1, 32, 16, 16))
    assert plain["parameters"] - 32 == 8 * (group["parameters"] - 4)  # weights: |G| x fewer (biases apart)
    assert group["flops"] == plain["flops"]


def test_bad_shapes_are_named():
    sym = ace.Symmetry(C4(), inputs="image", output="image")
    g = every(C4())[:2]
    with pytest.raises(ValueError, match="field 'input'.*square grid.*H = W.*\\(2, 3, 5, 6\\)"):
        sym.transform_inputs(torch.randn(2, 3, 5, 6), g)
    reg = ace.Symmetry(D4(), inputs="regular", output="regular")
    with pytest.raises(ValueError, match="group axis of size 8.*\\(2, 3, 4, 5, 5\\)"):
        reg.transform_inputs(torch.randn(2, 3, 4, 5, 5), every(D4())[:2])
    with pytest.raises(ValueError, match="odd integer"):
        LiftingConv(C4(), 1, 1, kernel_size=4)
    with pytest.raises(ValueError, match="regular field of shape \\(B, C, 4, H, W\\) with C = 3"):
        GroupConv(C4(), 3, 3)(torch.randn(1, 3, 8, 5, 5))
    with pytest.raises(ValueError, match="kind 'pseudovector' is not defined for C4"):
        ace.Symmetry(C4(), inputs="pseudovector", output="image")
