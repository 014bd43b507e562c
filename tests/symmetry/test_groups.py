import math

import pytest
import torch

from ace.symmetry import O3, SO2, SO3, Cyclic, Euclidean, GroupElement, Permutation, SignFlip, Translation

LINEAR = [
    SO3(),
    O3(),
    SO2(),
    SO2(axis="x"),
    SO2(axis="z"),
    Cyclic(4),
    Cyclic(3, axis="y"),
    Translation(),
    Translation(dim=2, scale=0.5),
    Euclidean(O3()),
    Euclidean(SO2(), scale=2.0),
    SignFlip(3),
    SignFlip(2),
]
THREE_D = [g for g in LINEAR if g.dim == 3]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("group", LINEAR, ids=repr)
def test_samples_are_orthogonal_with_the_right_determinant(group):
    g = group.sample(64, gen(), dtype=torch.float64)
    R = g.matrix
    assert R.shape == (64, group.dim, group.dim) and R.dtype == torch.float64
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(group.dim, dtype=torch.float64).expand_as(R))
    det = torch.linalg.det(R)
    if isinstance(group, (O3, Euclidean)) and isinstance(getattr(group, "base", group), O3):
        assert set(det.round().tolist()) == {-1.0, 1.0}
    elif isinstance(group, SignFlip):
        assert set(det.round().tolist()) == ({-1.0, 1.0} if group.dim % 2 else {1.0})
    else:
        torch.testing.assert_close(det, torch.ones(64, dtype=torch.float64))


@pytest.mark.parametrize("group", LINEAR, ids=repr)
def test_sampling_is_reproducible_under_a_seeded_generator(group):
    a, b, c = group.sample(8, gen(1)), group.sample(8, gen(1)), group.sample(8, gen(2))
    assert torch.equal(a.matrix, b.matrix)
    assert a.translation is None or torch.equal(a.translation, b.translation)
    differs = not torch.equal(a.matrix, c.matrix) or (
        a.translation is not None and not torch.equal(a.translation, c.translation)
    )
    assert differs


def test_so3_is_haar_distributed():
    # Under the Haar measure E[R] = 0 and E[R_ij^2] = 1/3.
    R = SO3().sample(20000, gen(), dtype=torch.float64).matrix
    assert R.mean(0).abs().max() < 0.03
    torch.testing.assert_close(
        R.square().mean(0), torch.full((3, 3), 1 / 3, dtype=torch.float64), atol=0.02, rtol=0
    )


def test_plane_rotations_about_an_axis_fix_the_axis():
    for axis, e in (("x", 0), ("y", 1), ("z", 2)):
        R = SO2(axis=axis).sample(16, gen(), dtype=torch.float64).matrix
        torch.testing.assert_close(R[:, :, e], torch.eye(3, dtype=torch.float64)[e].expand(16, 3))


def test_cyclic_elements_have_order_n():
    for group in (Cyclic(5), Cyclic(6, axis="z")):
        R = group.sample(32, gen(), dtype=torch.float64).matrix
        eye = torch.eye(group.dim, dtype=torch.float64).expand_as(R)
        torch.testing.assert_close(torch.linalg.matrix_power(R, group.order), eye)
    angles = torch.atan2(
        Cyclic(4).sample(200, gen()).matrix[:, 1, 0], Cyclic(4).sample(200, gen()).matrix[:, 0, 0]
    )
    assert set((angles / (math.pi / 2)).round().remainder(4).tolist()) == {0.0, 1.0, 2.0, 3.0}


def test_translations_are_scaled_gaussians():
    g = Translation(dim=2, scale=3.0).sample(20000, gen(), dtype=torch.float64)
    torch.testing.assert_close(g.matrix, torch.eye(2, dtype=torch.float64).expand(20000, 2, 2))
    assert g.translation.shape == (20000, 2)
    assert abs(g.translation.std().item() - 3.0) < 0.1
    e = Euclidean(SO3(), scale=0.1).sample(5, gen())
    assert e.translation.shape == (5, 3) and e.translation.abs().max() < 1


def test_sign_flip_is_plus_or_minus_identity():
    R = SignFlip(3).sample(64, gen()).matrix
    sign = R[:, 0, 0]
    torch.testing.assert_close(R, sign[:, None, None] * torch.eye(3))
    assert set(sign.tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("group", THREE_D, ids=repr)
def test_builtin_representations(group):
    g = group.sample(16, gen(), dtype=torch.float64)
    R = g.matrix
    assert torch.equal(group.representation("vector", g), R)
    assert torch.equal(group.representation("position", g), R)
    pseudo = group.representation("pseudovector", g)
    torch.testing.assert_close(pseudo, torch.linalg.det(R)[:, None, None] * R)
    torch.testing.assert_close(torch.linalg.det(pseudo), torch.ones(16, dtype=torch.float64))
    torch.testing.assert_close(
        group.representation("scalar", g, width=5), torch.eye(5, dtype=torch.float64).expand(16, 5, 5)
    )


IRREPS = "2x0e+1x0o+1x1o+1x1e+1x2e"


@pytest.mark.parametrize(
    "group", [SO3(), O3(), SO2(axis="z"), Cyclic(3, axis="x"), SignFlip(3), Euclidean(O3())], ids=repr
)
def test_irreps_representations_are_orthogonal_homomorphisms(group):
    g1, g2 = group.sample(8, gen(1), dtype=torch.float64), group.sample(8, gen(2), dtype=torch.float64)
    D1, D2 = group.representation(IRREPS, g1), group.representation(IRREPS, g2)
    assert D1.shape == (8, 14, 14) and group.width(IRREPS) == 14
    eye = torch.eye(14, dtype=torch.float64).expand_as(D1)
    torch.testing.assert_close(D1 @ D1.transpose(1, 2), eye)
    torch.testing.assert_close(group.representation(IRREPS, g1 @ g2), D1 @ D2)
    det = torch.linalg.det(g1.matrix)
    torch.testing.assert_close(D1[:, 0, 0], torch.ones(8, dtype=torch.float64))  # 0e: invariant
    torch.testing.assert_close(D1[:, 2, 2], det)  # 0o: the sign of det(R)
    torch.testing.assert_close(D1[:, 6:9, 6:9], det[:, None, None] * D1[:, 3:6, 3:6])  # 1e = det * 1o


def test_unsuitable_kinds_fail_with_a_clear_message():
    with pytest.raises(
        ValueError, match=r"kind 'pseudovector' needs a group acting in 3-D, but SO2\(\) acts in 2-D"
    ):
        SO2().width("pseudovector")
    with pytest.raises(
        ValueError, match=r"irreps '1x1o' needs a group acting in 3-D, but Cyclic\(4\) acts in 2-D"
    ):
        Cyclic(4).representation("1x1o", Cyclic(4).sample(2))
    with pytest.raises(ValueError, match="unknown kind 'vektor'"):
        SO3().width("vektor")
    with pytest.raises(ValueError, match="axis must be one of"):
        SO2(axis="w")
    with pytest.raises(ValueError, match="order must be a positive integer"):
        Cyclic(0)
    with pytest.raises(ValueError, match="Euclidean needs a linear group"):
        Euclidean(Permutation())


def test_composition_acts_as_successive_actions():
    p = torch.randn(6, 3, dtype=torch.float64)
    g1, g2 = (
        Euclidean(O3()).sample(6, gen(1), dtype=torch.float64),
        Euclidean(O3()).sample(6, gen(2), dtype=torch.float64),
    )

    def act(g, x):
        return (g.matrix @ x.unsqueeze(-1)).squeeze(-1) + g.translation

    torch.testing.assert_close(act(g1 @ g2, p), act(g1, act(g2, p)))
    s = torch.randn(4, 5, 2)
    q1, q2 = Permutation().sample(4, gen(1), size=5), Permutation().sample(4, gen(2), size=5)

    def permute(g, x):
        return x[torch.arange(4)[:, None], g.permutation]

    assert torch.equal(permute(q1 @ q2, s), permute(q1, permute(q2, s)))
    assert torch.equal(g1[2:4].matrix, g1.matrix[2:4]) and len(g1[2:4]) == 2


def test_permutation_sampling():
    g = Permutation().sample(6, gen(), size=5)
    assert torch.equal(g.permutation.sort(dim=1).values, torch.arange(5).expand(6, 5))
    assert torch.equal(g.permutation, Permutation().sample(6, gen(), size=5).permutation)
    assert g.matrix is None and len(g) == 6
    sizes = torch.tensor([3, 1, 4])
    flat = Permutation().sample(3, gen(), size=sizes).permutation
    owner = torch.repeat_interleave(torch.arange(3), sizes)
    assert torch.equal(flat.sort().values, torch.arange(8)) and torch.equal(owner[flat], owner)
    torch.testing.assert_close(
        Permutation().representation("vector", g, width=3), torch.eye(3).expand(6, 3, 3)
    )
    assert Permutation().width("vector") is None and Permutation().width("1x1o") == 3
    with pytest.raises(ValueError, match="needs the set size"):
        Permutation().sample(2)


def test_reprs_and_equality():
    assert [repr(g) for g in LINEAR[:7]] == [
        "SO3()",
        "O3()",
        "SO2()",
        "SO2(axis='x')",
        "SO2(axis='z')",
        "Cyclic(4)",
        "Cyclic(3, axis='y')",
    ]
    assert repr(Translation()) == "Translation(dim=3, scale=1.0)"
    assert repr(Euclidean(O3())) == "Euclidean(O3(), scale=1.0)"
    assert repr(SignFlip(3)) == "SignFlip(3)" and repr(Permutation()) == "Permutation()"
    assert SO2(axis="z") == SO2(axis="z") != SO2() and hash(Euclidean(SO3())) == hash(Euclidean(SO3()))
    assert Cyclic(4) != SO2() and Euclidean(O3()) != Euclidean(SO3())


def test_element_dataclass_fields():
    g = SO3().sample(3)
    assert isinstance(g, GroupElement) and g.translation is None and g.permutation is None and len(g) == 3


def test_e3nn_vectors_use_the_cartesian_basis():
    g = O3().sample(4, gen(), dtype=torch.float64)
    torch.testing.assert_close(O3().representation("1x1o", g), g.matrix)
    torch.testing.assert_close(O3().representation("1x1e", g), O3().representation("pseudovector", g))


def test_composing_with_a_pure_rotation_keeps_the_translation_on_either_side():
    p = torch.randn(6, 3, dtype=torch.float64)
    moved, turned = (
        Euclidean(O3()).sample(6, gen(1), dtype=torch.float64),
        O3().sample(6, gen(2), dtype=torch.float64),
    )

    def act(g, x):
        x = (g.matrix @ x.unsqueeze(-1)).squeeze(-1)
        return x if g.translation is None else x + g.translation

    torch.testing.assert_close(act(moved @ turned, p), act(moved, act(turned, p)))
    torch.testing.assert_close(act(turned @ moved, p), act(turned, act(moved, p)))


def test_permutations_of_sets_can_be_indexed_but_elements_on_a_graph_batch_cannot():
    q = Permutation().sample(4, gen(), size=5)
    assert torch.equal(q[1:3].permutation, q.permutation[1:3]) and len(q[1:3]) == 2
    flat = Permutation().sample(2, gen(), size=torch.tensor([2, 3]))
    for use in (lambda: flat[0], lambda: flat @ flat):
        with pytest.raises(TypeError, match="act on a graph batch"):
            use()


def test_independent_sign_flips_flip_each_axis_on_its_own():
    g = SignFlip(3, independent=True).sample(64, gen(), dtype=torch.float64)
    diagonal = torch.diagonal(g.matrix, dim1=1, dim2=2)
    assert g.matrix.dtype == torch.float64 and torch.equal(g.matrix, torch.diag_embed(diagonal))
    assert set(diagonal.flatten().tolist()) == {-1.0, 1.0}
    assert not torch.equal(diagonal, diagonal[:, :1].expand(-1, 3))  # not one sign per element
    assert repr(SignFlip(3, independent=True)) == "SignFlip(3, independent=True)"


def test_the_scalar_representation_is_one_by_one_by_default():
    g = SO3().sample(4, gen(), dtype=torch.float64)
    assert torch.equal(SO3().representation("scalar", g), torch.ones(4, 1, 1, dtype=torch.float64))
