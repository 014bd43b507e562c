import pytest
import torch
from torch_geometric.data import Batch, Data

from ace.symmetry import O3, SO2, SO3, Euclidean, GroupElement, Permutation, Translation
from ace.symmetry.action import Symmetry, _apply_matrix, call_model, is_graph

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rotate(R, x):
    """x (n, ..., d) rotated by R (n, d, d)."""
    return torch.einsum("nij,n...j->n...i", R, x)


def graphs(sizes=(3, 5, 4), seed=0):
    g = gen(seed)
    out = []
    for n in sizes:
        src, dst = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        keep = src != dst
        out.append(
            Data(
                pos=torch.randn(n, 3, generator=g, dtype=F64),
                vel=torch.randn(n, 3, generator=g, dtype=F64),
                x=torch.randn(n, 2, generator=g, dtype=F64),
                edge_index=torch.stack([src[keep], dst[keep]]),
                y=torch.randn(1, 3, generator=g, dtype=F64),
            )
        )
    return out


def test_single_tensor_one_element_per_sample():
    sym = Symmetry(SO3(), "vector", "vector")
    x = torch.randn(4, 7, 3, dtype=F64)
    g = sym.sample(x, gen())
    assert g.matrix.shape == (4, 3, 3) and g.matrix.dtype == F64
    torch.testing.assert_close(sym.transform_inputs(x, g), rotate(g.matrix, x))
    torch.testing.assert_close(sym.transform_output(x[:, 0], g), rotate(g.matrix, x[:, 0]))
    assert torch.equal(sym.sample(x, gen(3)).matrix, sym.sample(x, gen(3)).matrix)


def test_tuple_inputs_positions_move_and_scalars_do_not():
    sym = Symmetry(Euclidean(O3()), ("position", "scalar", "vector", "none"), ("vector", "scalar"))
    pos, h, v, mask = (
        torch.randn(4, 6, 3, dtype=F64),
        torch.randn(4, 6, 5, dtype=F64),
        torch.randn(4, 3, dtype=F64),
        7,
    )
    g = sym.sample((pos, h, v, mask), gen())
    pos2, h2, v2, mask2 = sym.transform_inputs((pos, h, v, mask), g)
    torch.testing.assert_close(pos2, rotate(g.matrix, pos) + g.translation[:, None])
    assert torch.equal(h2, h) and mask2 == 7
    torch.testing.assert_close(v2, rotate(g.matrix, v))
    out = sym.transform_output((v, h), g)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], rotate(g.matrix, v))


def test_dict_inputs_named_fields_only_and_no_mutation():
    sym = Symmetry(O3(), {"a": "pseudovector", "b": "1x0e+1x1o"}, {"out": "vector", "aux": "none"})
    a, b, c = torch.randn(5, 3, dtype=F64), torch.randn(5, 4, dtype=F64), torch.randn(5, 3, dtype=F64)
    inputs = {"a": a, "b": b, "c": c}
    g = sym.sample(inputs, gen())
    out = sym.transform_inputs(inputs, g)
    det = torch.linalg.det(g.matrix)
    torch.testing.assert_close(out["a"], det[:, None] * rotate(g.matrix, a))
    torch.testing.assert_close(out["b"], rotate(O3().representation("1x0e+1x1o", g), b))
    assert out["c"] is c and inputs["a"] is a
    res = sym.transform_output({"out": a, "aux": "text"}, g)
    assert res["aux"] == "text"


def test_planar_groups_and_translation_only():
    sym = Symmetry(SO2(), {"p": "position", "s": "scalar"}, "scalar")
    p = torch.randn(3, 2, dtype=F64)
    g = sym.sample({"p": p, "s": torch.ones(3, 1)}, gen())
    torch.testing.assert_close(
        sym.transform_inputs({"p": p, "s": torch.ones(3, 1)}, g)["p"], rotate(g.matrix, p)
    )
    sym = Symmetry(Translation(), ("position", "vector"), "position")
    p, v = torch.randn(3, 3, dtype=F64), torch.randn(3, 3, dtype=F64)
    g = sym.sample((p, v), gen())
    p2, v2 = sym.transform_inputs((p, v), g)
    torch.testing.assert_close(p2, p + g.translation)
    torch.testing.assert_close(v2, v)


def test_permutation_of_tensor_sets():
    sym = Symmetry(
        Permutation(), {"points": "vector", "feat": "scalar", "glob": "scalar"}, ("scalar", "vector")
    )
    pts, feat, glob = torch.randn(4, 6, 3), torch.randn(4, 6, 2), torch.randn(4, 6)  # glob: (B, F), invariant
    g = sym.sample({"points": pts, "feat": feat, "glob": glob}, gen())
    assert g.permutation.shape == (4, 6)
    out = sym.transform_inputs({"points": pts, "feat": feat, "glob": glob}, g)
    for b in range(4):
        assert torch.equal(out["points"][b], pts[b, g.permutation[b]])
        assert torch.equal(out["feat"][b], feat[b, g.permutation[b]])
    assert torch.equal(out["glob"], glob)
    per_set, per_point = torch.randn(4, 5), torch.randn(4, 6, 3)
    res = sym.transform_output((per_set, per_point), g)
    assert torch.equal(res[0], per_set) and torch.equal(res[1][2], per_point[2, g.permutation[2]])


def test_single_data_is_one_graph():
    data = graphs((4,))[0]
    sym = Symmetry(Euclidean(SO3()), {"pos": "position", "vel": "vector", "y": "vector"}, "vector")
    g = sym.sample(data, gen())
    assert g.matrix.shape == (1, 3, 3) and torch.equal(g.batch, torch.zeros(4, dtype=torch.long))
    out = sym.transform_inputs(data, g)
    assert is_graph(out) and out is not data
    R, t = g.matrix[0], g.translation[0]
    torch.testing.assert_close(out.pos, data.pos @ R.T + t)
    torch.testing.assert_close(out.vel, data.vel @ R.T)
    torch.testing.assert_close(out.y, data.y @ R.T)  # graph-level field, same element
    assert out.x is data.x and out.edge_index is data.edge_index
    torch.testing.assert_close(sym.transform_output(data.vel, g), data.vel @ R.T)


@pytest.mark.parametrize("group", [Euclidean(O3()), SO3()], ids=repr)
def test_batch_result_equals_per_graph_transforms(group):
    data = graphs()
    batch = Batch.from_data_list(data)
    sym = Symmetry(
        group, {"pos": "position", "vel": "vector", "y": "vector"}, {"node": "vector", "graph": "vector"}
    )
    g = sym.sample(batch, gen())
    assert g.matrix.shape == (3, 3, 3)
    result = sym.transform_inputs(batch, g).to_data_list()
    outputs = sym.transform_output({"node": batch.vel, "graph": batch.y}, g)
    for i, d in enumerate(data):
        t = None if g.translation is None else g.translation[i : i + 1]
        gi = GroupElement(g.matrix[i : i + 1], t, batch=torch.zeros(d.num_nodes, dtype=torch.long))
        expected = sym.transform_inputs(d, gi)
        for key in ("pos", "vel", "y", "x", "edge_index"):
            torch.testing.assert_close(result[i][key], expected[key])
        single = sym.transform_output({"node": d.vel, "graph": d.y}, gi)
        torch.testing.assert_close(outputs["node"][batch.batch == i], single["node"])
        torch.testing.assert_close(outputs["graph"][i : i + 1], single["graph"])
    assert torch.equal(batch.pos, Batch.from_data_list(data).pos)  # the input batch is unchanged


def test_permutation_of_graph_nodes_within_each_graph():
    data = graphs()
    batch = Batch.from_data_list(data)
    sym = Symmetry(Permutation(), {"pos": "vector", "vel": "vector"}, "vector")
    g = sym.sample(batch, gen())
    perm = g.permutation
    assert torch.equal(batch.batch[perm], batch.batch) and not torch.equal(
        perm, torch.arange(batch.num_nodes)
    )
    out = sym.transform_inputs(batch, g)
    assert torch.equal(out.pos, batch.pos[perm]) and torch.equal(out.x, batch.x[perm])  # x moves too
    assert torch.equal(out.batch, batch.batch) and torch.equal(out.y, batch.y)

    def edges(d):  # edges as pairs of endpoint positions, independent of node labels
        return sorted(map(tuple, torch.cat([d.pos[d.edge_index[0]], d.pos[d.edge_index[1]]], 1).tolist()))

    assert edges(out) == edges(batch)
    for before, after in zip(Batch.from_data_list(data).to_data_list(), out.to_data_list(), strict=True):
        assert edges(after) == edges(before)
    torch.testing.assert_close(sym.transform_output(batch.vel, g), batch.vel[perm])
    torch.testing.assert_close(sym.transform_output(batch.y, g), batch.y)  # graph-level: invariant


def test_permutation_with_unsorted_batch_vector_stays_inside_graphs():
    batch = torch.tensor([1, 0, 1, 0, 0, 1, 1])
    data = Data(pos=torch.randn(7, 3), batch=batch, edge_index=torch.tensor([[0, 1], [2, 3]]))
    sym = Symmetry(Permutation(), {"pos": "vector"}, "scalar")
    g = sym.sample(data, gen())
    assert torch.equal(batch[g.permutation], batch)


def test_errors_name_the_field_and_the_expected_shape():
    sym = Symmetry(SO3(), {"pos": "position", "vel": "vector"}, "vector")
    good = {"pos": torch.randn(10, 3), "vel": torch.randn(10, 3)}
    sym.check(good, torch.randn(10, 3))
    with pytest.raises(
        ValueError, match=r"field 'vel': kind 'vector' under SO3\(\) needs last dim 3, got shape \(10, 2\)"
    ):
        sym.check({"pos": torch.randn(10, 3), "vel": torch.randn(10, 2)})
    with pytest.raises(
        ValueError, match=r"field 'vel' \(kind 'vector', shape \(\.\.\., 3\)\) is missing from the input"
    ):
        sym.check({"pos": torch.randn(10, 3)})
    with pytest.raises(ValueError, match=r"field 'output': kind 'vector' under SO3\(\) needs last dim 3"):
        sym.check(good, torch.randn(10, 4))
    with pytest.raises(ValueError, match=r"field 'vel': expected a leading batch dim of 10"):
        sym.check({"pos": torch.randn(10, 3), "vel": torch.randn(9, 3)})
    with pytest.raises(ValueError, match="need a dict or a torch_geometric Data, got Tensor"):
        sym.check(torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"kinds \('vector', 'scalar'\) need a tuple of 2 tensors, got 3"):
        Symmetry(SO3(), ("vector", "scalar"), "scalar").check((torch.randn(2, 3),) * 3)
    with pytest.raises(ValueError, match="a single kind 'vector' describes one tensor, got a tuple"):
        Symmetry(SO3(), "vector", "vector").check((torch.randn(2, 3),))
    batch = Batch.from_data_list(graphs())
    with pytest.raises(
        ValueError, match=r"field 'edge_attr': expected first dim num_nodes=12 or num_graphs=3"
    ):
        Symmetry(SO3(), {"pos": "vector", "edge_attr": "vector"}, "vector").check(
            Batch.from_data_list(
                [Data(**d.to_dict(), edge_attr=torch.randn(d.num_edges, 3)) for d in graphs()]
            )
        )
    with pytest.raises(
        ValueError, match=r"field 'output': kind 'vector' under O3\(\) needs last dim 3, got shape \(12, 2\)"
    ):
        Symmetry(O3(), {"pos": "vector"}, "vector").check(batch, batch.x)
    with pytest.raises(ValueError, match="Permutation needs a named input of shape"):
        Symmetry(Permutation(), "vector", "vector").sample(torch.randn(4, 3))


def test_construction_validates_kinds():
    with pytest.raises(ValueError, match="unknown kind 'vec'"):
        Symmetry(SO3(), {"x": "vec"}, "vector")
    with pytest.raises(ValueError, match=r"kind 'pseudovector' needs a group acting in 3-D"):
        Symmetry(SO2(), "vector", "pseudovector")
    with pytest.raises(TypeError, match="must be a kind string"):
        Symmetry(SO3(), 3, "vector")
    with pytest.raises(TypeError, match="group must be an ace.symmetry.Group"):
        Symmetry("SO3", "vector", "vector")


def test_repr():
    sym = Symmetry(Euclidean(SO3()), {"pos": "position", "vel": "vector"}, "vector")
    assert (
        repr(sym) == "Symmetry(Euclidean(SO3(), scale=1.0), inputs={'pos': 'position', 'vel': 'vector'}, "
        "output='vector')"
    )
    assert repr(Symmetry(SO3(), ["vector", "scalar"], ("vector",))).endswith(
        "inputs=('vector', 'scalar'), output=('vector',))"
    )


def test_call_model_conventions():
    def model(*args, **kwargs):
        return args, kwargs

    x = torch.ones(1)
    assert model(x) == call_model(model, x)
    assert call_model(model, (x, 2)) == ((x, 2), {})
    assert call_model(model, [x]) == ((x,), {})
    assert call_model(model, {"a": x}) == ((), {"a": x})
    data = Data(pos=x)
    assert call_model(model, data)[0][0] is data
    assert is_graph(data) and is_graph(Batch.from_data_list([data])) and not is_graph({"pos": x})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(64,), (64, 5), (100, 7, 4)])
@pytest.mark.parametrize("d", [2, 3])
def test_the_action_is_einsums_bit_for_bit(dtype, shape, d):
    """The action is one bmm, the one einsum plans around permutes: runs stay bit for bit as they were."""
    gen = torch.Generator().manual_seed(d)
    rho = torch.randn(shape[0], d, d, dtype=dtype, generator=gen)
    x = torch.randn(*shape, d, dtype=dtype, generator=gen, requires_grad=True)
    w = torch.randn(*shape, d, dtype=dtype, generator=gen)
    ours, theirs = _apply_matrix(rho, x), torch.einsum("nij,n...j->n...i", rho, x)
    assert torch.equal(ours, theirs)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), x)
    (g_theirs,) = torch.autograd.grad((theirs * w).sum(), x)
    assert torch.equal(g_ours, g_theirs)


def test_a_node_permutation_leaves_the_batch_layout_alone_even_when_ptr_has_one_entry_per_node():
    batch = Batch.from_data_list(graphs((1, 2)))  # 3 nodes, ptr of length 3
    sym = Symmetry(Permutation(), {"pos": "vector"}, "vector")
    out = sym.transform_inputs(batch, sym.sample(batch, gen()))
    assert torch.equal(out.ptr, batch.ptr) and torch.equal(out.batch, batch.batch)


def test_a_malformed_output_spec_is_named_as_the_output():
    with pytest.raises(TypeError, match="^output must be a kind string"):
        Symmetry(SO3(), "vector", 3)


def test_a_single_graph_with_one_named_field_gets_one_element_for_all_its_nodes():
    data = Data(pos=torch.randn(5, 3, dtype=F64))
    g = Symmetry(SO3(), {"pos": "vector"}, "vector").sample(data, gen())
    assert len(g) == 1 and g.matrix.dtype == F64 and torch.equal(g.batch, torch.zeros(5, dtype=torch.long))
